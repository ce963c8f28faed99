"""Per-token traces: what is written matches what was generated and scored, and the plot renders."""

from __future__ import annotations

import pytest
import torch
from lm_eval.api.instance import Instance

from dlf_plugin import trace as trace_module
from dlf_plugin.fusion import FusionInputs, dlf_loss
from dlf_plugin.lm import DLFLM

PROMPTS = ["The river Tesh", "Question: What is the capital of Varn?\nAnswer:"]


def test_generation_trace_matches_generation_and_teacher_forced_scoring(tiny_world, tmp_path):
    path = tmp_path / "trace.jsonl"
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="dlf", trace=str(path), batch_size=2)
    outputs = lm.generate_until([Instance("generate_until", None, (p, {"until": [], "max_gen_toks": 7}), i) for i, p in enumerate(PROMPTS)])
    records = trace_module.read(path)
    generated = [r for r in records if r["kind"] == "generate"]
    by_request = {}
    for r in generated:
        by_request.setdefault(r["request"], []).append(r)
    assert sorted(by_request) == [0, 1]
    prompts = {rows[0]["prompt"]: rows for rows in by_request.values()}
    assert set(prompts) == set(lm.tok_decode(lm.tok_encode(p)) for p in PROMPTS)
    for prompt, output in zip(PROMPTS, outputs):
        rows = prompts[lm.tok_decode(lm.tok_encode(prompt))]
        assert [r["position"] for r in rows] == list(range(len(rows)))
        tokens = [r["token"] for r in rows]
        assert lm.tok_decode(tokens) == output
        assert all(set(r["weights"]) == {"a1", "b"} for r in rows)
        assert all(0.0 <= w <= 2.0 for r in rows for w in r["weights"].values())
        # Teacher-forced scoring of the same tokens solves the same problems: same weights.
        before = len(trace_module.read(path))
        lm._loglikelihood_tokens([((prompt, output), lm.tok_encode(prompt), tokens)])
        scored = trace_module.read(path)[before:]
        assert [r["token"] for r in scored] == tokens and scored[0]["prompt"] == prompt
        for g, s in zip(rows, scored):
            assert s["kind"] == "score"
            for pair in ("a1", "b"):
                assert s["weights"][pair] == pytest.approx(g["weights"][pair], abs=1e-3)
            assert s["loss"] == pytest.approx(g["loss"], rel=1e-3, abs=1e-6)


def test_trace_loss_is_the_objective_at_the_traced_weights(tiny_world, tmp_path):
    path = tmp_path / "static.jsonl"
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="static", weight=0.7, trace=str(path))
    ctx = lm.tok_encode("The river")
    cont = lm.tok_encode(" Tesh flows north")[1:]
    lm._loglikelihood_tokens([(("The river", " Tesh flows north"), ctx, cont)])
    records = trace_module.read(path)
    assert [r["token"] for r in records] == cont
    assert all(r["weights"] == {"a1": pytest.approx(0.7), "b": pytest.approx(0.7)} for r in records)
    # Independent recomputation of the loss at the last position, from fresh model calls.
    models = {n: lm.engine.models[n].model for n in lm.engine.forward_order}
    tokens = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        last = {n: m(tokens).logits[0, -1, : lm.engine.vocab_size].double() for n, m in models.items()}
    inputs = FusionInputs(
        last["large"][None], torch.stack([last["small-a"], last["small-b"]])[None],
        torch.stack([last["expert-a1"], last["expert-b"]])[None], torch.ones(1, dtype=torch.bool),
    )
    expected = float(dlf_loss(inputs, torch.tensor([[0.7, 0.7]], dtype=torch.float64)))
    assert records[-1]["loss"] == pytest.approx(expected, rel=1e-4)


def test_plot_command_renders_the_weights(tiny_world, tmp_path):
    import matplotlib.image

    path = tmp_path / "trace.jsonl"
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="dlf-joint", trace=str(path))
    lm.generate_until([Instance("generate_until", None, ("The river", {"until": [], "max_gen_toks": 12}), 0)])
    out = tmp_path / "weights.png"
    trace_module.main([str(path), "--request", "0", "--out", str(out)])
    image = matplotlib.image.imread(out)
    assert image.shape[0] == 352 and image.shape[1] >= 660  # 3.2 in x >= 6 in at 110 dpi
    assert float(image[..., :3].std()) > 0.05  # not blank
    with pytest.raises(SystemExit, match=r"no generate trace for request 5; requests in the file: \[0\]"):
        trace_module.main([str(path), "--request", "5", "--out", str(out)])


def test_a_trace_that_cannot_be_written_completely_stops_the_run(tiny_world, tmp_path):
    """A write cut short (a file size limit, as a full disk) is an error, and the file keeps
    only the whole lines of the steps written before."""
    import json
    import resource
    import signal

    path = tmp_path / "trace.jsonl"
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="static", trace=str(path), batch_size=1)
    requests = [Instance("generate_until", None, (p, {"until": [], "max_gen_toks": 12}), i) for i, p in enumerate(PROMPTS)]
    lm.generate_until(requests[:1])
    first = path.read_text()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(first.encode()) + 300, limits[1]))  # room for part of the next batch only
    try:
        with pytest.raises(trace_module.TraceNotWritten, match=rf"model_args trace='{path}': the trace could not be written \(OSError\(27"):
            lm.generate_until(requests[1:])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    text = path.read_text()
    assert text.startswith(first) and text.endswith("\n") and len(text.encode()) <= len(first.encode()) + 300
    assert all(json.loads(line) for line in text.splitlines())  # whole lines only: no line cut short
