"""Task-arithmetic experts (``merge:`` in a registry): the weights are the formula, the merged
expert fuses like a model built by hand, the merge never holds a whole model, and bad
recipes fail before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
import yaml
from lm_eval.api.instance import Instance
from safetensors.torch import load_file

import reference
from dlf_plugin import loading, tiny_models
from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import RegistryError

WEIGHTS = {"expert-a1": 0.7, "expert-a2": -0.4}
CONTEXTS = [("Question: What is the capital of Varn?\nAnswer:", " Oskel"), ("The river Tesh flows", " north through the valley")]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DLF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "merges"


def registry_with(tmp_path, tiny_world, merge, name="ta") -> str:
    doc = yaml.safe_load(tiny_world["registry"].read_text())
    for spec in doc["models"].values():
        spec["path"] = str(tiny_world["root"] / spec["path"])
    doc["models"][name] = {"merge": merge}
    doc["pairs"]["ta"] = {"expert": name, "base": "small-a", "tasks": ["toy_qa"]}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def formula(root, base: str, weights: dict) -> dict[str, torch.Tensor]:
    """base + sum_i w_i (model_i - base) in float64, every tensor of the files at once."""
    states = {name: load_file(root / name / "model.safetensors") for name in [base, *weights]}
    return {
        key: states[base][key].double() + sum(w * (states[m][key].double() - states[base][key].double()) for m, w in weights.items())
        for key in states[base]
    }


def test_merged_expert_is_the_formula_and_fuses_like_a_model_built_by_hand(tmp_path, tiny_world, cache):
    path = registry_with(tmp_path, tiny_world, {"base": "small-a", "models": WEIGHTS})
    lm = DLFLM(registry=path, experts="ta+b", solver="static", batch_size="2")
    expected = formula(tiny_world["root"], "small-a", WEIGHTS)
    merged = lm.engine.models["ta"].model.state_dict()
    assert set(expected) <= set(merged)
    for key, value in expected.items():
        assert (merged[key].double() - value).abs().max() <= 1e-6, key

    # The same fusion with the merged expert built by hand from the formula.
    by_hand = transformers.AutoModelForCausalLM.from_pretrained(tiny_world["root"] / "small-a").eval()
    by_hand.load_state_dict({k: v.float() for k, v in expected.items()}, strict=False)
    models = {name: lm.engine.models[name].model for name in ("large", "small-a", "small-b", "expert-b")}
    models["ta"] = by_hand
    pairs = [("ta", "small-a", 1.0), ("expert-b", "small-b", 1.0)]
    results = lm.loglikelihood([Instance("loglikelihood", None, c, i) for i, c in enumerate(CONTEXTS)])
    for (context, continuation), (logprob, _) in zip(CONTEXTS, results):
        ctx, cont = lm._encode_pair(context, continuation)
        want, _ = reference.continuation_logprob(models, "large", pairs, ctx, cont, lm.engine.vocab_size)
        assert logprob == pytest.approx(want, abs=1e-4)

    record = lm.loaded["ta"].provenance
    assert record["kind"] == "merge"
    assert [m["weight"] for m in record["merge"]["models"]] == list(WEIGHTS.values())
    # Built once, into the cache, and reused.
    [folder] = cache.iterdir()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    DLFLM(registry=path, experts="ta", solver="static")
    assert [p.name for p in cache.iterdir()] == [folder.name]
    assert (folder / "model.safetensors").stat().st_mtime_ns == written


def test_merge_holds_one_tensor_at_a_time_not_a_model(tmp_path):
    """Peak resident memory of building merges of 1 and of 3 task vectors, each in a fresh
    process, over models of 75 tensors (37 MB): under the weights of one model plus one tensor (the
    issue's bound), in fact about two tensors, and not growing with the models merged."""
    tok = tiny_models.make_tokenizer()
    root = tmp_path / "models"
    for seed in range(4):
        model = tiny_models.make_llama(vocab_size=2000, seed=seed, hidden_size=256, layers=8, heads=4, kv_heads=4, intermediate_size=1024)
        tiny_models.save(model, tok, root / f"m{seed}")
    script = textwrap.dedent(
        """
        import ctypes, json, os, sys
        from pathlib import Path
        import yaml
        from dlf_plugin import merging
        from dlf_plugin.registry import load_registry

        root, count = Path(sys.argv[1]), int(sys.argv[2])
        doc = {"name": "m", "models": {f"m{i}": {"path": str(root / f"m{i}")} for i in range(4)}, "large": "m0"}
        doc["models"]["ta"] = {"merge": {"base": "m0", "models": {f"m{i}": 0.3 for i in range(1, 1 + count)}}}
        (root / f"r{count}.yaml").write_text(yaml.safe_dump(doc))
        spec = load_registry(root / f"r{count}.yaml").models["ta"]
        def rss(field):
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
        os.environ["DLF_CACHE"] = sys.argv[3] + "-warm"  # a first merge maps the code it runs
        merging.build(spec, root / f"r{count}.yaml")
        os.environ["DLF_CACHE"] = sys.argv[3]
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        open("/proc/self/clear_refs", "w").write("5")
        before = rss("VmRSS")
        merging.build(spec, root / f"r{count}.yaml")
        print(json.dumps({"peak": rss("VmHWM") - before}))
        """
    )
    peaks = {}
    for count in (1, 3):
        run = subprocess.run([sys.executable, "-c", script, str(root), str(count), str(tmp_path / f"cache{count}")],
                             capture_output=True, text=True, check=True)
        peaks[count] = json.loads(run.stdout.strip().splitlines()[-1])["peak"]
    tensors = load_file(root / "m0" / "model.safetensors")
    weights = sum(t.numel() * t.element_size() for t in tensors.values())
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    assert len(tensors) >= 70 and weights > 15 * largest
    assert peaks[3] <= weights + largest, (peaks, weights, largest)
    assert peaks[3] <= 3 * largest, (peaks, largest)
    assert peaks[3] <= 1.1 * peaks[1] + 2**20, peaks


@pytest.mark.parametrize(
    "merge, message",
    [
        ({"base": "small-a", "models": {"expert-zz": 1.0}}, r"models.ta.merge.models: 'expert-zz' is not a key of models"),
        ({"base": "small-a", "models": {"expert-a1": "half"}}, r"models.ta.merge.models.expert-a1 must be a number"),
        ({"base": "small-a", "models": {"expert-a1": float("nan")}}, r"models.ta.merge.models.expert-a1 must be a number"),
        ({"base": "small-a", "models": {}}, r"models.ta.merge.models is empty"),
        ({"models": {"expert-a1": 1.0}}, r"models.ta.merge is missing required key 'base'"),
        ({"base": "small-a", "models": {"expert-a1": 1.0}, "method": "ties"}, r"unknown key\(s\) method in models.ta.merge"),
        ({"base": "small-a", "models": {"small-a": 1.0}}, r"models.ta.merge.models lists the merge base 'small-a'"),
        ({"base": "small-a", "models": {"expert-b": 1.0}}, r"tensor .* is \[323, 24\] in expert-b .* but \[320, 32\] in the base small-a"),
    ],
)
def test_bad_merge_recipes_fail_before_any_model_loads(tmp_path, tiny_world, cache, monkeypatch, merge, message):
    monkeypatch.setattr(loading, "load_model", lambda spec, *a: pytest.fail(f"model {spec.name} loaded before the error"))
    path = registry_with(tmp_path, tiny_world, merge)
    with pytest.raises(RegistryError, match=message) as info:
        DLFLM(registry=path, experts="ta")
    assert path in str(info.value)
    assert not cache.exists()


def test_merge_of_a_hub_model_or_with_a_path_is_refused(tmp_path, tiny_world):
    doc_path = registry_with(tmp_path, tiny_world, {"base": "small-a", "models": {"hubby": 1.0}})
    doc = yaml.safe_load(open(doc_path))
    doc["models"]["hubby"] = {"hub": "org/model"}
    open(doc_path, "w").write(yaml.safe_dump(doc))
    with pytest.raises(RegistryError, match=r"models.ta.merge.models: 'hubby' must be a local checkpoint"):
        DLFLM(registry=doc_path, experts="ta")
    doc["models"]["ta"]["path"] = "somewhere"
    open(doc_path, "w").write(yaml.safe_dump(doc))
    with pytest.raises(RegistryError, match=r"models.ta must have exactly one of path .* merge .* or server"):
        DLFLM(registry=doc_path, experts="ta")


def test_an_interrupted_merge_leaves_nothing_behind(tmp_path, tiny_world, cache, monkeypatch):
    from dlf_plugin import merging

    path = registry_with(tmp_path, tiny_world, {"base": "small-a", "models": WEIGHTS})

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(merging, "write_merge", fail)
    with pytest.raises(KeyboardInterrupt):
        DLFLM(registry=path, experts="ta")
    assert list(cache.iterdir()) == []
