"""Speculative fused decoding (``speculate=k``): the same tokens as plain fused greedy
decoding, with fewer large-model passes where the drafting expert agrees with the fusion."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance

import reference
from dlf_plugin.arguments import RequestError
from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import RegistryError

REPO = Path(__file__).resolve().parent.parent
PROMPTS = {  # the toy tasks' prompts (tasks/toy/*.yaml)
    "toy_qa": "Question: What is the capital of {}?\nAnswer:",
    "toy_fill": "Fill in the blank.\nThe emblem of {} is the ___.\nBlank:",
    "toy_num": "Record: founding of {}.\n####",
    "toy_table": "kingdom | ruler\n{} |",
}


def toy_requests(count: int, until=("\n",), max_gen_toks: int = 12):
    """Dev kingdoms' prompts of every seen task, interleaved (ragged lengths, rows that agree
    with the drafter more or less)."""
    rows = []
    for task, prompt in PROMPTS.items():
        lines = (REPO / "tasks" / "toy" / "data" / "dev" / f"{task}.jsonl").read_text().splitlines()[:count]
        rows += [prompt.format(json.loads(line)["entity"]) for line in lines]
    kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", None, (text, dict(kwargs)), i) for i, text in enumerate(rows)]


def example_solver():
    sys.path.insert(0, str(REPO / "tests" / "example_solver_plugin"))
    from dlf_example_solver import AgreementSolver

    return AgreementSolver


@pytest.mark.parametrize("solver", ["static", "dlf-grid", "dlf", "plugin"])
def test_same_tokens_as_plain_fused_greedy_with_ragged_batches_and_stop_strings(solver, monkeypatch):
    """Toy world, pairs qa + fill (qa's expert drafts), 16 prompts in batches of 8 with each
    row's own stop strings: the text equals plain decoding's for k = 2 and 4, with drafts
    both accepted and rejected."""
    if solver == "plugin":
        from dlf_plugin import hooks

        monkeypatch.setattr(hooks, "get_solvers", lambda: {"agreement": (example_solver(), "example")})
        solver = "agreement"
    plain = DLFLM(registry="toy", experts="qa+fill", solver=solver, batch_size=8)
    # Stop strings that cut rows at different places: "\n", and a letter some answers hold.
    requests = toy_requests(4, until=("\n", "e"))
    expected = plain.generate_until(requests)
    assert len({len(text) for text in expected}) > 2
    for k in (2, 4):
        fast = DLFLM(registry="toy", experts="qa+fill", solver=solver, batch_size=8, speculate=k)
        totals = {"accepted": 0, "drafted": 0}
        generate = fast.engine.generate_speculative

        def counting(*args, generate=generate, engine=fast.engine, **kwargs):
            out = generate(*args, **kwargs)
            for key in totals:
                totals[key] += engine.speculation[key]
            return out

        fast.engine.generate_speculative = counting
        assert fast.generate_until(toy_requests(4, until=("\n", "e"))) == expected
        # Drafts were accepted, and some rejected: both paths ran.
        assert 0 < totals["accepted"] < totals["drafted"]


def test_k_one_is_plain_decoding_one_large_pass_per_token(tiny_world):
    plain = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="dlf", batch_size=4)
    one = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="dlf", batch_size=4, speculate=1)
    requests = toy_requests(2, until=(), max_gen_toks=10)
    assert one.generate_until(requests) == plain.generate_until(requests)
    context, mask = plain.tok_batch_encode(["The river Tesh flows", "Lorem"])
    out = plain.engine.generate_speculative(context, mask, 6, plain.eot_token_id, 0, draft=1)
    assert plain.engine.speculation["rounds"] == out.shape[1] - context.shape[1] - 1


def test_masked_drafts_equal_recomputing_every_prefix(tiny_world, tiny_models_loaded):
    """Rejected drafts stay in the caches, masked: the tokens equal a brute force that
    recomputes every prefix from scratch in float64 (static weights, two pairs, k = 3)."""
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="static", batch_size=4)
    prompts = ["The river Tesh flows", "Question: What is the capital of Varn?\nAnswer:", "Lorem"]
    context, mask = lm.tok_batch_encode(prompts)
    out = lm.engine.generate_speculative(context, mask, 12, lm.eot_token_id, 0, draft=3)
    pairs = [("expert-a1", "small-a", 1.0), ("expert-b", "small-b", 1.0)]
    for row, prompt in enumerate(prompts):
        expected = reference.greedy_tokens(tiny_models_loaded, "large", pairs, lm.tok_encode(prompt), lm.engine.vocab_size, 12, lm.eot_token_id)
        got = out[row, context.shape[1] :].tolist()[: len(expected)]
        assert got == expected, (prompt, got, expected)


def test_sampling_and_bad_speculate_values_are_refused(tiny_world):
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1", speculate=3)
    sampled = [Instance("generate_until", None, ("Lorem", {"until": [], "max_gen_toks": 3, "do_sample": True, "temperature": 0.8}), 0)]
    with pytest.raises(RequestError, match="speculate: sampling .* is refused"):
        lm.generate_until(sampled)
    with pytest.raises(RegistryError, match="speculate needs at least one expert pair"):
        DLFLM(registry=str(tiny_world["registry"]), experts="", speculate=2)
    with pytest.raises(RegistryError, match="speculate"):
        DLFLM(registry=str(tiny_world["registry"]), experts="a1", speculate="two")


def test_trace_marks_each_token_drafted_or_not_and_matches_plain_traces(tmp_path):
    """The trace of a speculative run has the plain run's lines (request, position, token,
    weights), plus ``drafted``: true for accepted drafts, false for fused tokens at a
    disagreement and for each generation's first token (from the prefill)."""
    from dlf_plugin import trace

    runs = {}
    for k in (0, 3):
        path = tmp_path / f"k{k}.jsonl"
        lm = DLFLM(registry="toy", experts="qa", solver="dlf", batch_size=8, speculate=k, trace=str(path))
        lm.generate_until(toy_requests(2))
        runs[k] = [r for r in trace.read(path) if r["kind"] == "generate"]
    key = lambda r: (r["request"], r["position"])  # noqa: E731
    plain, fast = sorted(runs[0], key=key), sorted(runs[3], key=key)
    assert [key(r) + (r["token"],) for r in fast] == [key(r) + (r["token"],) for r in plain]
    for a, b in zip(fast, plain):
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)
    assert all("drafted" not in r for r in plain)
    assert not any(r["drafted"] for r in fast if r["position"] == 0)
    assert 0 < sum(r["drafted"] for r in fast) < len(fast)
