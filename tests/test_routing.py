"""route=task (experts=auto): each lm-eval task fused with the pairs whose registry ``tasks`` list it, in one run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lm_eval
import pytest
import yaml
from lm_eval.tasks import TaskManager

from dlf_plugin.lm import DLFLM

REPO = Path(__file__).resolve().parent.parent
TASKS = ["toy_qa", "toy_mc", "toy_num"]
# The tiny registry's pairs: a1 and b list toy_qa, a2 lists toy_mc, none lists toy_num.
EXPECTED = {"toy_qa": ["a1", "b"], "toy_mc": ["a2"], "toy_num": ["a1", "a2", "b"]}


@pytest.fixture(scope="module")
def registry(tiny_world) -> Path:
    """The tiny registry without its pair of foreign vocabulary (auto loads every pair)."""
    doc = yaml.safe_load(tiny_world["registry"].read_text())
    del doc["pairs"]["foreign"], doc["models"]["foreign"]
    path = tiny_world["root"] / "routed.yaml"
    path.write_text(yaml.safe_dump({**doc, "name": "routed"}, sort_keys=False))
    return path


def run(registry: Path, experts: str, tasks: list[str], **kwargs) -> dict:
    lm = DLFLM(registry=str(registry), experts=experts, solver="dlf", batch_size=4, **kwargs)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=5, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(REPO / "tasks" / "toy")),
    )


def responses(out: dict, task: str) -> list:
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_auto_equals_each_task_run_with_its_own_pairs(registry, tmp_path):
    trace = tmp_path / "trace.jsonl"
    routed = run(registry, "auto", TASKS, trace=str(trace))
    assert routed["config"]["dlf"]["route"] == "task"
    assert routed["config"]["dlf"]["routes"] == EXPECTED
    for task, pairs in EXPECTED.items():
        alone = run(registry, "+".join(pairs), [task])
        assert [p["name"] for p in alone["config"]["dlf"]["pairs"]] == pairs
        assert alone["config"]["dlf"]["route"] == "none" and "routes" not in alone["config"]["dlf"]
        got, want = responses(routed, task), responses(alone, task)
        if task == "toy_mc":  # loglikelihoods: equal to float rounding
            flat = [(ll, greedy) for doc in got for ((ll, greedy),) in doc]
            assert flat == [(pytest.approx(ll, abs=1e-5), greedy) for doc in want for ((ll, greedy),) in doc]
        else:
            assert got == want, task
    # Routing changed something: toy_mc fused with every pair scores otherwise than with a2 alone.
    every = run(registry, "all", ["toy_mc"])
    assert [r[0][0][0] for r in responses(every, "toy_mc")] != pytest.approx(
        [r[0][0][0] for r in responses(routed, "toy_mc")], abs=1e-5)
    # The trace names, on every line, just the pairs that request was fused with.
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    keys_by_prompt = {}
    for line in lines:
        if "prompt" in line:
            keys_by_prompt[line["prompt"][:12]] = sorted(line["weights"])
    assert keys_by_prompt["Question: Wh"] == EXPECTED["toy_qa"]
    assert keys_by_prompt["Record: foun"] == EXPECTED["toy_num"]
    assert keys_by_prompt["Pick the lan"] == EXPECTED["toy_mc"]


def test_route_among_the_chosen_pairs_only(registry):
    """experts=a2+a1,route=task: toy_qa gets a1 alone (b, which lists it too, is not chosen);
    toy_num, listed by neither, gets both, in the order chosen."""
    routed = run(registry, "a2+a1", ["toy_qa", "toy_num"], route="task")
    assert routed["config"]["dlf"]["routes"] == {"toy_qa": ["a1"], "toy_num": ["a2", "a1"]}
    assert responses(routed, "toy_qa") == responses(run(registry, "a1", ["toy_qa"]), "toy_qa")
    assert responses(routed, "toy_num") == responses(run(registry, "a2+a1", ["toy_num"]), "toy_num")


def test_route_from_lm_eval_model_args(registry):
    """lm-eval's model_args parser turns "none" into None; both values still mean what they say."""
    for value, routed in (("none", False), ("task", True)):
        lm = DLFLM.create_from_arg_string(f"registry={registry},experts=a1,route={value}")
        assert lm.routed is routed
        assert lm.get_model_info()["dlf"]["route"] == value


@pytest.mark.parametrize("last", [3, 0])
def test_prompt_evidence_batched_equals_alone_and_a_brute_force(tiny_world, tiny_models_loaded, last):
    """route=prompt's evidence, log p_E - log p_S over a prompt's last tokens (0: all), for a
    ragged batch equals each prompt alone and a float64 brute force with the models' own forward."""
    import torch

    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+a2+b", route="prompt", route_tokens=last, batch_size=4)
    prompts = ["The river Tesh", "Question: What is the capital of Varn?\nAnswer:", "A", "Lorem ipsum dolor sit amet"]
    encoded = [lm.tok_encode(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(map(len, encoded)), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    batched = lm.engine.pair_evidence(ids, [len(t) for t in encoded], last=last)
    for row, tokens in enumerate(encoded):
        alone = lm.engine.pair_evidence(torch.tensor([tokens]), [len(tokens)], last=last)
        assert torch.allclose(batched[row], alone[0], atol=1e-5)
        one = torch.tensor([tokens])

        def logp(name):
            model = copy.deepcopy(tiny_models_loaded[name]).double()
            with torch.no_grad():
                logits = model(one).logits[0, :, : lm.engine.vocab_size].log_softmax(-1)
            return sum(float(logits[t - 1, tokens[t]]) for t in range(max(len(tokens) - last, 1) if last else 1, len(tokens)))

        expected = [logp(pair.expert) - logp(pair.base) for pair in lm.engine.pairs]
        assert torch.allclose(batched[row].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4), (row, batched[row], expected)
