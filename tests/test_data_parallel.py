"""Data parallelism: two CPU processes (``torchrun``, gloo; ``accelerate launch`` sets up the
same environment on GPUs) share the requests out and give what one process gives, in one
results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def lm_eval_args(registry: Path, out: Path) -> list[str]:
    """Batch size 1: each request runs alone in both runs, so the numbers can match to 1e-5
    (batches of other shapes round float32 differently: ~2e-4 on these -177 loglikelihoods).
    8 documents: an odd count makes lm-eval pad one rank with a repeated request, whose answer
    it then appends to that document's logged responses."""
    return [
        "-m", "lm_eval", "--model", "dlf",
        "--model_args", f"registry={registry},experts=a1+b,solver=dlf,trace={out / 'trace.jsonl'}", "--batch_size", "1",
        "--tasks", "toy_qa,toy_mc", "--include_path", str(REPO / "tasks" / "toy"), "--limit", "8",
        "--log_samples", "--output_path", str(out),
    ]


def samples(out: Path) -> tuple[list[Path], dict]:
    results = sorted(out.rglob("results_*.json"))
    by_task = {}
    for path in sorted(out.rglob("samples_*.jsonl")):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        by_task[task] = {r["doc_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    return results, by_task


def test_two_processes_equal_one(tiny_world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *lm_eval_args(tiny_world["registry"], one)], check=True, capture_output=True, env=env, cwd=tmp_path)
    # torchrun: accelerate launch starts several CPU processes only from a config file (or mpirun).
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    run = subprocess.run([*launch, *lm_eval_args(tiny_world["registry"], two)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    # The requests were shared out: each process traced its own generations, together all.
    from dlf_plugin import trace

    def generated(path):
        return {(r["prompt"], r["token"]) for r in trace.read(path) if r["kind"] == "generate" and "prompt" in r}

    alone, first, second = generated(one / "trace.jsonl"), generated(two / "trace.jsonl"), generated(two / "trace.rank1.jsonl")
    assert first and second and first | second == alone and len(first) + len(second) == len(alone)
    results_one, samples_one = samples(one)
    results_two, samples_two = samples(two)
    assert len(results_one) == 1 and len(results_two) == 1  # rank 0 alone writes
    config = json.loads(results_two[0].read_text())
    assert config["config"]["dlf"]["pairs"][0]["name"] == "a1"
    assert set(samples_two) == set(samples_one) == {"toy_qa", "toy_mc"}
    for task in samples_one:
        assert sorted(samples_two[task]) == sorted(samples_one[task]) == list(range(8))
        for doc, record in samples_one[task].items():
            theirs = samples_two[task][doc]["resps"]
            if task == "toy_qa":  # generations: identical text
                assert theirs == record["resps"]
            else:  # loglikelihoods of each choice
                ours = [float(r[0][0]) for r in record["resps"]]
                assert [float(r[0][0]) for r in theirs] == pytest.approx(ours, abs=1e-5)
    metrics = json.loads(results_one[0].read_text())["results"]
    assert json.loads(results_two[0].read_text())["results"]["toy_mc"]["acc,none"] == metrics["toy_mc"]["acc,none"]


def test_placement_is_refused_under_data_parallelism(tiny_world, monkeypatch):
    """Each process places every model on its own device; an explicit placement is an error
    (checked by faking a second process)."""
    from dlf_plugin import lm as lm_module
    from dlf_plugin.registry import RegistryError

    class Fake:
        num_processes, device = 2, "cpu"

    monkeypatch.setattr(lm_module, "_data_parallel", lambda: Fake())
    with pytest.raises(RegistryError, match="placement='cpu' under data parallelism"):
        lm_module.DLFLM(registry=str(tiny_world["registry"]), experts="a1", placement="cpu")
