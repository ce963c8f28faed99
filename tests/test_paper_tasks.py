"""The paper's benchmark configs, run offline on committed samples through lm-eval.

A scripted LM answers with fixed text (generation) or fixed scores (loglikelihood), so
the expected metric of every task is known by hand; the prompts are checked verbatim.
"""

from __future__ import annotations

from pathlib import Path

import lm_eval
import pytest
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

REPO = Path(__file__).resolve().parent.parent


class ScriptedLM(LM):
    """Generations by a key found in the prompt; loglikelihood favours the scripted choice."""

    def __init__(self, generations: dict[str, str], preferred: dict[str, str]):
        super().__init__()
        self.generations, self.preferred = generations, preferred
        self.prompts: list[str] = []

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for request in requests:
            context = request.args[0]
            self.prompts.append(context)
            out.append(next(text for key, text in self.generations.items() if key in context))
        return out

    def loglikelihood(self, requests, disable_tqdm=False):
        out = []
        for request in requests:
            context, continuation = request.args
            self.prompts.append(context)
            choice = next((c for key, c in self.preferred.items() if key in context), None)
            out.append((0.0 if continuation.strip() == choice else -5.0, False))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def run(tasks, lm):
    result = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(REPO / "tasks")))
    return result["results"]


def test_gsm8k_prompt_and_last_number_exact_match():
    lm = ScriptedLM(
        {
            "baker": " She sold 18 - 4 = 14 loaves. The answer is 14.",
            "Tom reads": " He read 60 pages, then 20 more, so 75.",
            "pens": " 1,250 * 2 = $2,500",
        },
        {},
    )
    results = run(["dlf_gsm8k_offline"], lm)
    assert results["dlf_gsm8k_offline"]["exact_match,last-number"] == pytest.approx(2 / 3)
    assert (
        "Answer the following question.\n\nQuestion: A baker fills 6 trays with 3 loaves each and sells all but "
        "4 loaves. How many loaves did she sell?\nAnswer:"
    ) in lm.prompts


def test_triviaqa_first_line_matches_any_alias():
    lm = ScriptedLM({"Red Planet": " Mars\nIt is the fourth planet.", "gold": " Gold", "Hamlet": " shakespeare"}, {})
    results = run(["dlf_triviaqa_offline"], lm)
    assert results["dlf_triviaqa_offline"]["exact_match,first-line"] == pytest.approx(2 / 3)
    assert "Question: Which planet is known as the Red Planet?\nAnswer:" in lm.prompts


def test_truthfulqa_mc1_accuracy():
    lm = ScriptedLM(
        {},
        {
            "chewing gum": "It passes through your digestive system.",
            "Great Wall": "Yes, it is the only structure visible from the Moon.",
            "goldfish": "No, goldfish can remember things for months.",
        },
    )
    results = run(["dlf_truthfulqa_mc_offline"], lm)
    assert results["dlf_truthfulqa_mc_offline"]["acc,none"] == pytest.approx(2 / 3)
    assert "Q: What happens if you swallow chewing gum?\nA:" in lm.prompts


def test_cnn_dailymail_rouge2():
    lm = ScriptedLM(
        {
            "railway station": " The council voted to open a library in the old railway station.\nThe library should open next year.\n",
            "white whale": " Completely different words entirely.",
        },
        {},
    )
    results = run(["dlf_cnn_dailymail_offline"], lm)
    assert results["dlf_cnn_dailymail_offline"]["rouge2,none"] == pytest.approx(0.5)  # 1.0 and 0.0
    assert any(p.startswith("Summarize the following article.\n\nArticle: The town council") and p.endswith("\n\nSummary:") for p in lm.prompts)


def test_pubmedqa_and_mmlu_accuracy_and_prompts():
    lm = ScriptedLM({}, {"Abstract:": "yes", "multiple choice question": "B"})
    results = run(["dlf_pubmedqa_offline", "dlf_mmlu_offline"], lm)
    assert results["dlf_pubmedqa_offline"]["acc,none"] == pytest.approx(1 / 3)  # answers yes, no, maybe
    assert results["dlf_mmlu_offline"]["acc,none"] == pytest.approx(1 / 3)  # answers B, C, C
    assert (
        "Abstract: Adults who walked 30 minutes daily for twelve weeks were compared with controls. Resting heart "
        "rate fell by 6 beats per minute in the walking group only.\nQuestion: Does regular walking lower resting "
        "heart rate in adults?\nAnswer:"
    ) in lm.prompts
    assert (
        "The following is a multiple choice question about college mathematics.\n\nWhat is the derivative of x^2 "
        "with respect to x?\nA. x\nB. 2x\nC. x^2\nD. 2\nAnswer:"
    ) in lm.prompts


def test_hub_configs_name_the_paper_datasets():
    """The hub variants carry the same prompts (the offline ones include them) and real dataset ids."""
    import yaml

    expected = {
        "dlf_gsm8k": ("openai/gsm8k", "main"),
        "dlf_triviaqa": ("mandarjoshi/trivia_qa", "rc.nocontext"),
        "dlf_truthfulqa_mc": ("truthfulqa/truthful_qa", "multiple_choice"),
        "dlf_cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0"),
        "dlf_pubmedqa": ("qiaojin/PubMedQA", "pqa_labeled"),
        "dlf_mmlu": ("cais/mmlu", "all"),
    }

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    for name, (path, config) in expected.items():
        hub = yaml.load((REPO / "tasks" / "paper" / f"{name}.yaml").read_text(), Loader=Loader)
        offline = yaml.load((REPO / "tasks" / "paper" / f"{name}_offline.yaml").read_text(), Loader=Loader)
        assert (hub["dataset_path"], hub["dataset_name"], hub["num_fewshot"]) == (path, config, 0)
        assert offline["include"] == f"{name}.yaml" and offline["task"] == f"{name}_offline"
        if hub["output_type"] == "generate_until":
            assert hub["generation_kwargs"]["do_sample"] is False
    assert yaml.load((REPO / "tasks/paper/dlf_gsm8k.yaml").read_text(), Loader=Loader)["generation_kwargs"]["max_gen_toks"] == 512
    assert yaml.load((REPO / "tasks/paper/dlf_triviaqa.yaml").read_text(), Loader=Loader)["generation_kwargs"] == {
        "until": ["\n\n"], "max_gen_toks": 20, "do_sample": False, "temperature": 0.0
    }


def test_paper_registry_pairs_list_the_task_configs_they_are_for():
    """route=task matches lm-eval task names: every dlf_* name a pair of registry/paper.yaml lists
    is a config in tasks/paper, hub and offline variants alike, and the unseen tasks are listed by none."""
    from dlf_plugin.registry import load_registry

    configs = {p.stem for p in (REPO / "tasks" / "paper").glob("dlf_*.yaml")}
    listed = {t for pair in load_registry("paper").pairs.values() for t in pair.tasks if t.startswith("dlf_")}
    seen = {"dlf_gsm8k", "dlf_truthfulqa_mc", "dlf_triviaqa", "dlf_cnn_dailymail"}
    assert listed == seen | {f"{t}_offline" for t in seen}
    assert listed <= configs
    assert not {c for c in configs if "pubmedqa" in c or "mmlu" in c} & listed
