"""ROUGE-2 for the summarisation task (the rouge-score package ships with lm-eval)."""

from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)


def rouge2_results(doc, results):
    """lm-eval process_results: ROUGE-2 F1 of the generation against the reference highlights."""
    return {"rouge2": _SCORER.score(doc["highlights"], results[0].strip())["rouge2"].fmeasure}
