"""Bad input: a clear error naming the file, key or argument, raised before any model loads."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from dlf_plugin import loading
from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import RegistryError, load_registry
from dlf_plugin.solvers.base import SolverOptionError


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if any model's weights are loaded."""
    calls = []

    def refuse(spec, *args, **kwargs):
        calls.append(spec.name)
        raise AssertionError(f"model {spec.name} was loaded before the error")

    monkeypatch.setattr(loading, "load_model", refuse)
    return calls


def write_registry(tmp_path, tiny_world, edit) -> str:
    doc = yaml.safe_load(tiny_world["registry"].read_text())
    for spec in doc["models"].values():
        spec["path"] = str(tiny_world["root"] / spec["path"])
    edit(doc)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def build(registry, **kwargs):
    return DLFLM(registry=registry, **kwargs)


def test_missing_registry_file(tmp_path, no_model_loads):
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(RegistryError, match=f"registry file {missing} does not exist"):
        build(str(missing))


def test_unknown_shipped_registry_name(no_model_loads):
    with pytest.raises(RegistryError, match=r"no shipped registry named 'nope'.*toy"):
        build("nope")


def test_yaml_syntax_error(tmp_path, no_model_loads):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodels: {a: [1, 2\n")
    with pytest.raises(RegistryError, match=f"registry file {path} is not valid YAML"):
        build(str(path))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(colour="blue"), r"unknown key\(s\) colour in the top level"),
        (lambda d: d["models"]["large"].update(revison="x"), r"unknown key\(s\) revison in models.large"),
        (lambda d: d["pairs"]["a1"].update(weight=2), r"unknown key\(s\) weight in pairs.a1"),
        (lambda d: d["pairs"]["a1"].update(base="small-z"), r"pairs.a1.base: 'small-z' is not a key of models"),
        (lambda d: d.update(large="huge"), r"large: 'huge' is not a key of models"),
        (lambda d: d["models"]["large"].update(hub="org/x"), r"models.large must have exactly one of path"),
        (lambda d: d["models"]["large"].update(dtype="float8"), r"models.large.dtype: 'float8' is not one of"),
        (lambda d: d["models"]["large"].update(trust_remote_code="yes"), r"models.large.trust_remote_code must be true or false"),
    ],
)
def test_invalid_registry_content_names_file_and_key(tmp_path, tiny_world, no_model_loads, edit, message):
    path = write_registry(tmp_path, tiny_world, edit)
    with pytest.raises(RegistryError, match=message) as info:
        build(path, experts="a1")
    assert path in str(info.value)


def test_expert_not_in_registry(tiny_world, no_model_loads):
    with pytest.raises(RegistryError, match=r"experts: 'gsm8k' is not an expert pair of registry .*valid names: a1, a2, b, foreign"):
        build(str(tiny_world["registry"]), experts="a1+gsm8k")


def test_pair_whose_tokenizer_differs(tiny_world, no_model_loads):
    with pytest.raises(RegistryError, match=r"tokenizer of models.foreign differs from the large model's"):
        build(str(tiny_world["registry"]), experts="foreign")


def test_placeholder_model(tmp_path, tiny_world, no_model_loads):
    def edit(doc):
        doc["models"]["expert-a1"] = {"placeholder": "unpublished checkpoint"}

    path = write_registry(tmp_path, tiny_world, edit)
    with pytest.raises(RegistryError, match=r"models.expert-a1 is a placeholder \(unpublished checkpoint\)"):
        build(path, experts="a1")


def test_pickled_weights_refused_unless_allowed(tmp_path, tiny_world, no_model_loads):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_world["root"] / "expert-a1", folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")

    def edit(doc):
        doc["models"]["expert-a1"] = {"path": str(folder)}

    with pytest.raises(RegistryError, match=r"models.expert-a1.path .* has no .safetensors weights.*allow_pickle"):
        build(write_registry(tmp_path, tiny_world, edit), experts="a1")


def test_unknown_solver(tiny_world, no_model_loads):
    with pytest.raises(SolverOptionError, match=r"solver='telepathy' is not a registered solver; choose one of: .*static"):
        build(str(tiny_world["registry"]), experts="a1", solver="telepathy")


@pytest.mark.parametrize("value", [-1, "-0.5", "nan", float("nan"), "inf", "heavy"])
def test_bad_static_weight(tiny_world, no_model_loads, value):
    with pytest.raises(SolverOptionError, match=r"model_args weight="):
        build(str(tiny_world["registry"]), experts="a1", solver="static", weight=value)


def test_bad_per_pair_weights(tiny_world, no_model_loads):
    with pytest.raises(SolverOptionError, match=r"weights='zz:1.0'.*one of the chosen experts \(a1\)"):
        build(str(tiny_world["registry"]), experts="a1", solver="static", weights="zz:1.0")
    with pytest.raises(SolverOptionError, match=r"weights \(a1\)"):
        build(str(tiny_world["registry"]), experts="a1", solver="static", weights="a1:-2")


def test_unknown_model_arg(tiny_world, no_model_loads):
    with pytest.raises(SolverOptionError, match=r"unknown key\(s\) parallelize; dlf accepts registry, experts"):
        build(str(tiny_world["registry"]), experts="a1", parallelize=True)


def test_device_inside_model_args(tiny_world, no_model_loads):
    args = f"registry={tiny_world['registry']},experts=a1,device=cpu"
    with pytest.raises(RegistryError, match=r"model_args: 'device' is not a dlf model argument.*placement="):
        DLFLM.create_from_arg_string(args, {"batch_size": 1, "device": None})
    with pytest.raises(RegistryError, match=r"'device' is not a dlf model argument"):
        DLFLM.create_from_arg_obj({"registry": str(tiny_world["registry"]), "device": "cpu"}, {})


def test_batch_size_in_model_args_and_from_lm_eval(tiny_world, no_model_loads):
    """lm-eval's command line passes --batch_size (1 unless given) beside model_args; a
    batch_size in model_args too used to end in Python's "got multiple values" TypeError."""
    args = f"registry={tiny_world['registry']},experts=a1,batch_size=auto"
    with pytest.raises(RegistryError, match=r"model_args: batch_size=auto is also given by lm-eval as 1 \(--batch_size\); give it once, as --batch_size auto"):
        DLFLM.create_from_arg_string(args, {"batch_size": 1, "max_batch_size": None, "device": None})
    with pytest.raises(RegistryError, match=r"max_batch_size=8 is also given by lm-eval as 64"):
        DLFLM.create_from_arg_obj({"registry": str(tiny_world["registry"]), "max_batch_size": 8}, {"max_batch_size": 64})


def test_cuda_placement_without_cuda(tiny_world, no_model_loads):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RegistryError, match=r"model large is placed on 'cuda:0' but torch has no CUDA"):
        build(str(tiny_world["registry"]), experts="a1", placement="cuda:0")


def test_bad_dtype_override(tiny_world, no_model_loads):
    with pytest.raises(RegistryError, match=r"model_args dtype='float64' is not one of"):
        build(str(tiny_world["registry"]), experts="a1", dtype="float64")


def test_bad_route(tiny_world, no_model_loads):
    with pytest.raises(RegistryError, match=r"model_args route='tasks' is not one of none, task"):
        build(str(tiny_world["registry"]), experts="a1", route="tasks")


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "lots"])
def test_bad_fusion_memory(tiny_world, no_model_loads, value):
    with pytest.raises(RegistryError, match=rf"model_args fusion_memory={value!r} must be a positive whole number"):
        build(str(tiny_world["registry"]), experts="a1", fusion_memory=value)


@pytest.mark.parametrize("value", ["fast", ""])
def test_bad_solver_schedule(tiny_world, no_model_loads, value):
    from dlf_plugin.solvers.base import SolverOptionError

    with pytest.raises(SolverOptionError, match=r"model_args schedule=.* \(solver 'dlf'\) must be one of auto, adaptive, fixed"):
        build(str(tiny_world["registry"]), experts="a1", schedule=value)


def test_registry_loads_without_torch(tiny_world):
    """Reading a registry imports no torch: it must run before anything heavy."""
    import subprocess
    import sys

    code = (
        "import sys; from dlf_plugin.registry import load_registry; "
        f"r = load_registry({str(tiny_world['registry'])!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(r.pairs))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['a1', 'a2', 'b', 'foreign']"


def test_shipped_registries_are_valid():
    toy = load_registry("toy")
    assert toy.large == "large-base" and set(toy.pairs) == {"qa", "fill", "num", "table"}
    paper = load_registry("paper")
    assert paper.models[paper.large].location == "meta-llama/Llama-2-13b-hf"
    assert {paper.pairs[p].base for p in paper.pairs} == {"llama-2-7b", "tinyllama-1.1b"}
    assert all(paper.models[p.expert].placeholder for p in paper.pairs.values())


def test_chat_pair_whose_expert_has_no_template(tmp_path, tiny_world, no_model_loads):
    def edit(doc):
        doc["pairs"]["a1"]["chat_template"] = True

    with pytest.raises(RegistryError, match=r"edited\.yaml: pairs\.a1 has chat_template: true, but the tokenizer of its expert expert-a1 .* has no chat template"):
        build(write_registry(tmp_path, tiny_world, edit), experts="a1")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shots="some"), r"model_args shots='some' is not one of all, large"),
        (dict(shots="large", route="prompt"), r"route=prompt reads one prompt for every pair; it cannot be combined with shots=large"),
    ],
)
def test_bad_shots(tiny_world, no_model_loads, kwargs, message):
    with pytest.raises(RegistryError, match=message):
        build(tiny_world["registry"], experts="a1+a2", solver="static", **kwargs)


def test_raw_pairs_under_the_large_models_chat_template_are_reported(tiny_world, caplog):
    import logging

    from lm_eval.api.instance import Instance

    lm = build(tiny_world["registry"], experts="a1", solver="static")
    lm._chat_template_applied = True  # as lm-eval's apply_chat_template call sets it
    request = [Instance("loglikelihood", None, ("The river", " Tesh"), 0)]
    with caplog.at_level(logging.WARNING, logger="dlf_plugin.lm"):
        lm.loglikelihood(request)
        lm.loglikelihood(request)
    warnings = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert len(warnings) == 1  # once per model
    assert "expert pairs a1" in warnings[0] and "(chat_template: false) read it too" in warnings[0]


def _hub_registry(tmp_path, tiny_world, repo: str) -> str:
    def edit(doc):
        doc["models"]["expert-a1"] = {"hub": repo, "tokenizer": doc["models"]["small-a"]["path"]}

    return write_registry(tmp_path, tiny_world, edit)


def test_offline_hub_model_missing_from_the_cache_fails_at_once(tmp_path, tiny_world, monkeypatch, no_model_loads):
    """HF_HUB_OFFLINE=1 and a hub model not in the cache: an error naming it, before any
    tokenizer or model loads (not after transformers' retries)."""
    import transformers
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("a tokenizer was loaded before the error")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_tokenizer)
    registry = _hub_registry(tmp_path, tiny_world, "some-org/missing-expert")
    with pytest.raises(RegistryError, match=r"edited\.yaml: models\.expert-a1 is the hub model 'some-org/missing-expert'.*HF_HUB_OFFLINE"):
        build(registry, experts="a1")
    # In the cache (config.json of the main revision), the same registry passes the check
    # and reaches the tokenizers.
    snapshot = tmp_path / "hub-cache" / "models--some-org--missing-expert" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    with pytest.raises(AssertionError, match="a tokenizer was loaded"):
        build(registry, experts="a1")
    # Online, nothing is checked up front.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(AssertionError, match="a tokenizer was loaded"):
        build(registry, experts="a1")


def _copy_model(tmp_path, tiny_world, name: str, as_name: str):
    folder = tmp_path / as_name
    shutil.copytree(tiny_world["root"] / name, folder)
    return folder


def _use_folder(tmp_path, tiny_world, model: str, folder) -> str:
    def edit(doc):
        doc["models"][model] = {"path": str(folder)}

    return write_registry(tmp_path, tiny_world, edit)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), r"has (\d+) bytes where its header accounts for (?!\1)\d+"),
        (lambda f: f.write_bytes((10**9).to_bytes(8, "little") + f.read_bytes()[8:]), r"declares a 1000000000-byte header"),
        (lambda f: f.write_bytes(f.read_bytes()[:8] + b"{oops" + f.read_bytes()[13:]), r"has a header that is not a safetensors header"),
        (lambda f: f.write_bytes(b"\x01\x02"), r"has 2 bytes, fewer than the 8"),
    ],
)
def test_corrupt_or_truncated_weights_name_model_key_and_file(tmp_path, tiny_world, no_model_loads, damage, message):
    folder = _copy_model(tmp_path, tiny_world, "expert-a1", "damaged")
    damage(folder / "model.safetensors")
    with pytest.raises(RegistryError, match=rf"edited\.yaml: models\.expert-a1\.path: weight file {folder / 'model.safetensors'} {message}"):
        build(_use_folder(tmp_path, tiny_world, "expert-a1", folder), experts="a1")


def test_model_folder_without_tokenizer_files(tmp_path, tiny_world, no_model_loads):
    folder = _copy_model(tmp_path, tiny_world, "expert-a1", "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(RegistryError, match=rf"models\.expert-a1\.path {folder} has no tokenizer files .*models\.expert-a1\.tokenizer"):
        build(_use_folder(tmp_path, tiny_world, "expert-a1", folder), experts="a1")


def test_output_layer_smaller_than_the_tokenizer_found_before_weights_load(tmp_path, tiny_world, no_model_loads):
    import json

    folder = _copy_model(tmp_path, tiny_world, "expert-a1", "short-head")
    config = json.loads((folder / "config.json").read_text())
    tokens = config["vocab_size"]
    config["vocab_size"] = tokens - 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RegistryError, match=rf"models\.expert-a1 \({folder}\) has an output layer of {tokens - 5} rows .* tokenizer has {tokens} tokens"):
        build(_use_folder(tmp_path, tiny_world, "expert-a1", folder), experts="a1")


def test_nan_weights_found_at_load_unless_the_registry_opts_out(tmp_path, tiny_world):
    import safetensors.torch

    from dlf_plugin.backends import ModelFault

    folder = _copy_model(tmp_path, tiny_world, "expert-a1", "nan-weights")
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    name = next(n for n in weights if "embed_tokens" in n)
    weights[name][-1, 0] = float("nan")  # the last token's embedding: no probe or prompt here reads it
    safetensors.torch.save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    registry = _use_folder(tmp_path, tiny_world, "expert-a1", folder)
    with pytest.raises(ModelFault, match=rf"model expert-a1 \({folder}\): weight tensor\(s\) {name} hold NaN or infinite values"):
        build(registry, experts="a1")

    def opt_out(doc):
        doc["models"]["expert-a1"] = {"path": str(folder), "check_weights": False}

    lm = build(write_registry(tmp_path, tiny_world, opt_out), experts="a1")
    assert torch.isnan(lm.loaded["expert-a1"].model.get_input_embeddings().weight[-1, 0])


@pytest.mark.parametrize(
    "args,message",
    [
        ({"batch_size": "abc"}, r"model_args batch_size='abc' must be a positive whole number"),
        ({"batch_size": 0}, r"model_args batch_size=0 must be a positive whole number"),
        ({"batch_size": "auto:x"}, r"batch_size \(the N of auto:N\)='x'"),
        ({"max_batch_size": "x"}, r"model_args max_batch_size='x'"),
        ({"max_length": -5}, r"model_args max_length=-5 must be a positive whole number"),
        ({"placement": "gpu9"}, r"model_args placement='gpu9' is not a device"),
        ({"add_bos_token": "maybe"}, r"model_args add_bos_token='maybe' must be True or False"),
        ({"logits_cache": "no"}, r"model_args logits_cache='no' must be True or False"),
        ({"prefix_token_id": "abc"}, r"model_args prefix_token_id='abc' must be a token id"),
        ({"experts": "a1++a2"}, r"model_args experts='a1\+\+a2' has an empty pair name"),
        ({"experts": "+"}, r"model_args experts='\+' has an empty pair name"),
        ({"experts": "a1+a1"}, r"model_args experts: 'a1' is given twice"),
        ({"route": "prompt", "route_tokens": "-1"}, r"model_args route_tokens='-1' must be a whole number >= 0"),
    ],
)
def test_model_args_checked_before_models_load(tiny_world, no_model_loads, args, message):
    kwargs = {"experts": "a1", **args}
    with pytest.raises(RegistryError, match=message):
        build(str(tiny_world["registry"]), **kwargs)


def test_trace_path_that_cannot_be_written(tmp_path, tiny_world, no_model_loads):
    with pytest.raises(RegistryError, match=rf"model_args trace='{tmp_path}' is a directory"):
        build(str(tiny_world["registry"]), experts="a1", trace=str(tmp_path))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RegistryError, match=rf"model_args trace='{blocker}/t.jsonl': {blocker} is not a writable folder"):
        build(str(tiny_world["registry"]), experts="a1", trace=str(blocker / "t.jsonl"))


def test_requests_that_cannot_run_are_named_before_any_runs(tiny_world):
    from lm_eval.api.instance import Instance

    from dlf_plugin.arguments import RequestError

    lm = build(str(tiny_world["registry"]), experts="a1", solver="static")
    good = Instance("loglikelihood", None, ("The river", " Tesh"), 0, metadata=("toy_qa", 3, 1))
    empty = Instance("loglikelihood", None, ("", ""), 1, metadata=("toy_qa", 5, 1))
    calls = []
    lm._loglikelihood_tokens = lambda *a, **k: calls.append(a)  # nothing may run before the error
    with pytest.raises(RequestError, match=r"request 1 \(task toy_qa, doc_id 5\): the continuation is empty"):
        lm.loglikelihood([good, empty])
    assert calls == []
    for kwargs, message in [
        ({"max_gen_toks": -1}, r"gen_kwargs max_gen_toks=-1 must be at least 1"),
        ({"max_gen_toks": "many"}, r"gen_kwargs max_gen_toks='many' must be a whole number"),
        ({"until": [1, 2]}, r"gen_kwargs until=\[1, 2\] must be a string or a list of strings"),
        ({"top_p": 0.0}, r"gen_kwargs top_p=0.0 must be in \(0, 1\]"),
        ({"temperature": -1}, r"gen_kwargs temperature=-1 must be at least 0.0"),
    ]:
        request = Instance("generate_until", None, ("The", kwargs), 0, metadata=("toy_gen", 9, 1))
        with pytest.raises(RequestError, match=rf"request 0 \(task toy_gen, doc_id 9\): {message}"):
            lm.generate_until([request])


def test_weight_check_tells_overflowing_sums_from_nan():
    """The check sums each tensor first; a sum that overflows on finite weights is not an error."""
    from types import SimpleNamespace

    from dlf_plugin.backends import ModelFault

    spec = SimpleNamespace(name="m", location="/m")
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(3e38)  # finite; the float32 sum is inf
    loading.check_finite_weights(spec, layer)
    with torch.no_grad():
        layer.bias[1] = float("-inf")
    with pytest.raises(ModelFault, match=r"model m \(/m\): weight tensor\(s\) bias hold NaN"):
        loading.check_finite_weights(spec, layer)
