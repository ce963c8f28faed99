"""dlf against lm-eval's own HFLM and against brute-force fusion (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

import reference
from dlf_plugin.lm import DLFLM

CONTEXTS = [
    ("Question: What is the capital of Varn?\nAnswer:", " Oskel"),
    ("The river Tesh flows", " north through the valley"),
    ("Lorem", " ipsum dolor sit amet, consectetur"),
    ("Answer the following question.\n\nQuestion: Mira has 3 apples", " and buys 4 more."),
    ("The river Tesh flows", " south"),
    ("Q", "uick brown fox"),
]
PROMPTS = [
    "Question: What is the capital of Varn?\nAnswer:",
    "The",
    "the quick brown fox jumps over the lazy dog and then",
    "Lorem ipsum",
]
UNTIL = {"until": ["\n\n", "fox"], "max_gen_toks": 14, "do_sample": False}


def ll_requests():
    return [Instance("loglikelihood", None, pair, i) for i, pair in enumerate(CONTEXTS)]


def gen_requests(kwargs=UNTIL):
    return [Instance("generate_until", None, (p, dict(kwargs)), i) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def hflm(tiny_world):
    return HFLM(pretrained=str(tiny_world["root"] / "large"), device="cpu", batch_size=3, dtype="float32")


@pytest.fixture(scope="module")
def dlf_two_pairs(tiny_world):
    return DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", batch_size="3", solver="static")


@pytest.fixture(scope="module")
def dlf_one_pair(tiny_world):
    return DLFLM(registry=str(tiny_world["registry"]), experts="a1", batch_size="4", solver="static", weight=0.7)


@pytest.mark.parametrize("args", [dict(experts=""), dict(experts="a1+b", solver="static", weight=0.0)], ids=["no-experts", "weight-0"])
def test_equals_hflm_when_nothing_is_fused(tiny_world, hflm, args):
    lm = DLFLM(registry=str(tiny_world["registry"]), batch_size="2", **args)
    ours = lm.loglikelihood(ll_requests())
    theirs = hflm.loglikelihood(ll_requests())
    for (lp, greedy), (ref_lp, ref_greedy) in zip(ours, theirs):
        assert lp == pytest.approx(ref_lp, abs=1e-5)
        assert greedy == ref_greedy
    rolling = [Instance("loglikelihood_rolling", None, (c + x,), i) for i, (c, x) in enumerate(CONTEXTS)]
    assert lm.loglikelihood_rolling(rolling) == pytest.approx(hflm.loglikelihood_rolling(rolling), abs=1e-4)
    assert lm.generate_until(gen_requests()) == hflm.generate_until(gen_requests())


def _pairs_with_weights(lm: DLFLM, weights):
    return [(p.expert, p.base, w) for p, w in zip(lm.pair_specs, weights)]


@pytest.mark.parametrize("which,weights", [("one", [0.7]), ("two", [1.0, 1.0])])
def test_fused_loglikelihood_equals_brute_force(tiny_world, tiny_models_loaded, dlf_one_pair, dlf_two_pairs, which, weights):
    lm = dlf_one_pair if which == "one" else dlf_two_pairs
    ours = lm.loglikelihood(ll_requests())
    pairs = _pairs_with_weights(lm, weights)
    greedy_seen = False
    for (context, continuation), (lp, greedy) in zip(CONTEXTS, ours):
        ctx, cont = lm._encode_pair(context, continuation)
        ref_lp, ref_greedy = reference.continuation_logprob(
            tiny_models_loaded, "large", pairs, ctx, cont, lm.engine.vocab_size
        )
        assert lp == pytest.approx(ref_lp, abs=1e-4, rel=1e-5)
        assert greedy == ref_greedy
        greedy_seen |= ref_greedy
    # One-token continuation that is the fused argmax, so is_greedy is exercised as True.
    ctx = lm.tok_encode("The river")
    best = int(reference.fused_logits(tiny_models_loaded, "large", pairs, ctx, lm.engine.vocab_size).argmax())
    text = lm.tok_decode([best], skip_special_tokens=False)
    [(lp, greedy)] = lm._loglikelihood_tokens([(("The river", text), ctx, [best])])
    assert greedy


@pytest.mark.parametrize("which,weights", [("one", [0.7]), ("two", [1.0, 1.0])])
def test_fused_greedy_tokens_equal_brute_force(tiny_models_loaded, dlf_one_pair, dlf_two_pairs, which, weights):
    lm = dlf_one_pair if which == "one" else dlf_two_pairs
    pairs = _pairs_with_weights(lm, weights)
    context, mask = lm.tok_batch_encode(PROMPTS)
    out = lm._model_generate(context, context.shape[1] + 10, stop=[], attention_mask=mask, do_sample=False)
    eos = lm.eot_token_id
    for row, prompt in enumerate(PROMPTS):
        expected = reference.greedy_tokens(
            tiny_models_loaded, "large", pairs, lm.tok_encode(prompt), lm.engine.vocab_size, 10, eos
        )
        got = out[row, context.shape[1] :].tolist()[: len(expected)]
        assert got == expected
        # After EOS a row holds only padding.
        if expected[-1] == eos:
            assert set(out[row, context.shape[1] + len(expected) :].tolist()) <= {lm.tokenizer.pad_token_id}


def test_generate_until_stops_each_row_at_its_stop_string(tiny_models_loaded, dlf_two_pairs):
    lm = dlf_two_pairs
    pairs = _pairs_with_weights(lm, [1.0, 1.0])
    max_new = 14
    expected = [
        lm.tok_decode(
            reference.greedy_tokens(tiny_models_loaded, "large", pairs, lm.tok_encode(p), lm.engine.vocab_size, max_new, lm.eot_token_id)
        )
        for p in PROMPTS
    ]
    stop = expected[0][4:7]  # text row 0 really produces, a few tokens in
    assert stop and len(expected[0]) > 7
    kwargs = {"until": [stop], "max_gen_toks": max_new, "do_sample": False}
    results = lm.generate_until(gen_requests(kwargs))
    assert results == [full.split(stop)[0] for full in expected]
    assert any(stop not in full for full in expected), "some row must run on past row 0's stop"

    # In the engine, a stopped row is padded from the step it stopped at, the others go on.
    context, mask = lm.tok_batch_encode(PROMPTS)
    stop_at = {0: 2, 2: 5}

    def stop_check(rows, generated):
        return {r for r, ids in zip(rows, generated) if stop_at.get(r) == len(ids)}

    from dlf_plugin.engine import Sampling

    out = lm.engine.generate(
        context, mask, 8, Sampling(), lm.eot_token_id, lm.tokenizer.pad_token_id, stop_check
    )[:, context.shape[1] :]
    for row, prompt in enumerate(PROMPTS):
        ref = reference.greedy_tokens(tiny_models_loaded, "large", pairs, lm.tok_encode(prompt), lm.engine.vocab_size, 8, lm.eot_token_id)
        n = min(stop_at.get(row, 8), len(ref))
        assert out[row, :n].tolist() == ref[:n]
        assert set(out[row, n:].tolist()) <= {lm.tokenizer.pad_token_id}


def test_ragged_batch_equals_each_row_alone(tiny_world):
    batched = DLFLM(registry=str(tiny_world["registry"]), experts="a1+a2+b", batch_size="4", solver="static")
    alone = DLFLM(registry=str(tiny_world["registry"]), experts="a1+a2+b", batch_size="1", solver="static")
    for (lp, greedy), (lp1, greedy1) in zip(batched.loglikelihood(ll_requests()), alone.loglikelihood(ll_requests())):
        # float32 rounding of differently shaped batches: relative 1e-6 of log-probs near -300
        assert lp == pytest.approx(lp1, rel=1e-6, abs=1e-5)
        assert greedy == greedy1
    assert batched.generate_until(gen_requests()) == alone.generate_until(gen_requests())


def test_cached_decoding_equals_recomputation(dlf_two_pairs):
    """Every cached step's fused logits equal a fresh teacher-forced pass over the whole prefix."""
    lm = dlf_two_pairs
    context, mask = lm.tok_batch_encode(PROMPTS)
    steps = []
    lm.engine.observer = lambda fused, *emitted: steps.append(fused.logits.clone())
    try:
        out = lm._model_generate(context, context.shape[1] + 6, stop=[], attention_mask=mask, do_sample=False)
    finally:
        lm.engine.observer = None
    for row in range(len(PROMPTS)):
        pad = int((mask[row] == 0).sum())
        for step, cached in enumerate(steps):
            prefix = out[row, pad : context.shape[1] + step].unsqueeze(0)
            positions = torch.zeros_like(prefix, dtype=torch.bool)
            positions[0, -1] = True
            every_token = torch.arange(lm.engine.vocab_size).unsqueeze(0)
            fresh = lm.engine.score(prefix, positions, every_token).logprobs[0]
            if int(out[row, context.shape[1] + step - 1]) == lm.eot_token_id and step > 0:
                break
            assert torch.allclose(cached[row].log_softmax(-1), fresh, atol=1e-4), (row, step)


def test_padded_vocabulary_rows_never_win(tiny_world, dlf_two_pairs):
    """Pair b's models have 3 extra output rows with huge logits; fusion must drop them."""
    assert dlf_two_pairs.engine.vocab_size == tiny_world["vocab"]
    context, mask = dlf_two_pairs.tok_batch_encode(PROMPTS)
    out = dlf_two_pairs._model_generate(context, context.shape[1] + 8, stop=[], attention_mask=mask)
    assert int(out.max()) < tiny_world["vocab"]


def test_sampling_honours_temperature_and_top_p(dlf_two_pairs):
    from dlf_plugin.engine import Sampling, choose_tokens

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(4000, 1)
    torch.manual_seed(0)
    top = choose_tokens(logits, Sampling(do_sample=True, temperature=1.0, top_p=0.6))
    # softmax([0,1,2,3]) = .032 .087 .237 .644: top_p 0.6 keeps only token 3.
    assert set(top.tolist()) == {3}
    hot = choose_tokens(logits, Sampling(do_sample=True, temperature=100.0))
    counts = torch.bincount(hot, minlength=4).double() / len(hot)
    assert counts.min() > 0.2  # near uniform at high temperature
    assert choose_tokens(logits[:2], Sampling()).tolist() == [3, 3]


def test_dynamic_solver_batched_equals_alone(tiny_world, tmp_path):
    """The default solver works per row: in a batch or alone, a position gets the same optimum.

    Its argmin can jump between two near-equal basins on float32 noise (padding changes
    the logits by ~1e-6), so the objective value is compared, not the argmin itself.
    """
    from dlf_plugin.trace import read

    traces = {}
    for size in ("4", "1"):
        path = tmp_path / f"trace-{size}.jsonl"
        lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+a2+b", batch_size=size, solver="dlf", trace=str(path))
        lm.loglikelihood(ll_requests())
        records, prompt = {}, None
        for record in read(path):
            prompt = record.get("prompt", prompt)
            records[(prompt, record["position"])] = record
        traces[size] = records
    assert traces["4"].keys() == traces["1"].keys() and len(traces["4"]) > 20
    for key, batched in traces["4"].items():
        assert batched["loss"] == pytest.approx(traces["1"][key]["loss"], rel=1e-3, abs=1e-6)


def test_shared_small_base_runs_once_per_step(tiny_world):
    """Pairs a1 and a2 share small-a: per decoding step, every model runs exactly once."""
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+a2+b", solver="static")
    assert lm.engine.forward_order == ["large", "small-a", "small-b", "expert-a1", "expert-a2", "expert-b"]
    calls = dict.fromkeys(lm.engine.models, 0)
    handles = [
        m.model.base_model.register_forward_pre_hook(lambda module, args, name=name: calls.__setitem__(name, calls[name] + 1))
        for name, m in lm.engine.models.items()
    ]
    try:
        context, mask = lm.tok_batch_encode(PROMPTS)
        lm._model_generate(context, context.shape[1] + 5, stop=[], attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == dict.fromkeys(lm.engine.models, 5)  # prefill + 4 cached steps each
