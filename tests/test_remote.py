"""The large model behind an inference server (dlf_plugin.remote): against the local backend,
within the tail rule's bound, and every way a server can fail, named before anything is
written. A real server (llama-cpp-python's) runs ``lm_eval --model dlf`` in test_real_server."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval.api.instance import Instance

from dlf_plugin import loading, tiny_models
from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import RegistryError
from dlf_plugin.remote import ServerError
from dlf_plugin.trace import read as read_trace
import reference
from servers import StandIn, free_port, llama_server, toy_registry
from test_bad_input import write_registry
from test_against_reference import CONTEXTS, gen_requests, ll_requests

REPO = Path(__file__).resolve().parent.parent


def served_registry(tmp_path, tiny_world, url: str, **server) -> str:
    """The tiny world's registry with its large model behind ``url``."""
    settings = {"api": "openai-completions", "url": url, "model": "tiny-large", "top_n": tiny_world["vocab"], **server}
    served = {"server": settings, "tokenizer": str(tiny_world["root"] / "large")}
    return write_registry(tmp_path, tiny_world, lambda doc: doc["models"].update(large=served))


@pytest.fixture(scope="module")
def large(tiny_models_loaded):
    return tiny_models_loaded["large"]


def traced_scores(path) -> dict:
    """A score trace's requests: ``{(prompt, tokens): (weights per position, loss per position)}``
    (prompt: the context string, None for rolling windows)."""
    requests = {}
    for record in (r for r in read_trace(path) if r["kind"] == "score"):
        prompt, tokens, weights, losses = requests.setdefault(record["request"], (record.get("prompt"), [], [], []))
        assert record["position"] == len(tokens)
        tokens.append(record["token"])
        weights.append(list(record["weights"].values()))
        losses.append(record["loss"])
    return {(prompt, tuple(tokens)): (weights, losses) for prompt, tokens, weights, losses in requests.values()}


@pytest.mark.parametrize("solver", ["static", "dlf"])
def test_full_support_equals_the_local_backend(tmp_path, tiny_world, tiny_models_loaded, solver):
    """top_n = the vocabulary: loglikelihoods to 1e-4, greedy generations token for token,
    batched, with stop strings; rolling loglikelihoods too.

    With ``dlf`` the weights are solved from the server's float32 log-softmax, which rounds
    otherwise than the local head, and are only as exact as the float32 solver (its steps
    stop at ~1e-4); on these random models a weight 2e-5 off moves a loglikelihood by 1e-3.
    So each loglikelihood, remote and local, is checked against the float64 brute force at
    the weights its own trace records, and the two runs' objective values per position
    against each other (test_dynamic_solver_batched_equals_alone's rule)."""
    traces = {side: tmp_path / f"{side}.jsonl" for side in ("local", "remote")}
    tracing = {side: dict(trace=str(path)) if solver == "dlf" else {} for side, path in traces.items()}
    local = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver=solver, batch_size="3", **tracing["local"])
    rolling = [Instance("loglikelihood_rolling", None, (c + x,), i) for i, (c, x) in enumerate(CONTEXTS)]
    with StandIn(tiny_models_loaded["large"], "tiny-large") as server:
        remote = DLFLM(registry=served_registry(tmp_path, tiny_world, server.url), experts="a1+b", solver=solver, batch_size="3", **tracing["remote"])
        ours, ours_rolling = remote.loglikelihood(ll_requests()), remote.loglikelihood_rolling(rolling)
        generated = remote.generate_until(gen_requests())
    theirs, theirs_rolling = local.loglikelihood(ll_requests()), local.loglikelihood_rolling(rolling)
    if solver == "static":
        for (lp, greedy), (ref_lp, ref_greedy) in zip(ours, theirs):
            assert lp == pytest.approx(ref_lp, abs=1e-4)
            assert greedy == ref_greedy
        assert ours_rolling == pytest.approx(theirs_rolling, abs=1e-4)
    else:
        sides = {side: traced_scores(path) for side, path in traces.items()}
        assert sides["remote"].keys() == sides["local"].keys()
        pairs = [(p.expert, p.base, None) for p in local.pair_specs]
        vocab = local.engine.vocab_size
        scored = [(context, *local._encode_pair(context, continuation)) for context, continuation in CONTEXTS]
        scored += [(None, [local.prefix_token_id], local.tok_encode(c + x)) for c, x in CONTEXTS]  # one window each
        answers = {"remote": [lp for lp, _ in ours] + ours_rolling, "local": [lp for lp, _ in theirs] + theirs_rolling}
        for side, lps in answers.items():
            for (prompt, context, continuation), lp in zip(scored, lps, strict=True):
                weights, _ = sides[side][(prompt, tuple(continuation))]
                ref_lp, _ = reference.continuation_logprob(tiny_models_loaded, "large", pairs, context, continuation, vocab, weights=weights)
                assert lp == pytest.approx(ref_lp, abs=1e-4), (side, prompt)  # 1.1e-5 at most here
        for key, (_, losses) in sides["remote"].items():
            assert losses == pytest.approx(sides["local"][key][1], rel=1e-3, abs=1e-6)
        assert [g for _, g in ours] == [g for _, g in theirs]
    assert generated == local.generate_until(gen_requests())
    assert any(g for g in generated)  # something was generated before the stops
    info = remote.get_model_info()["dlf"]["models"]["large"]
    assert info["kind"] == "server" and info["server"]["top_n"] == tiny_world["vocab"] and info["source"] == server.url


TOY_PAIRS = (("expert-qa", "small-base"), ("expert-fill", "small-base"))
TOY_REQUESTS = [
    ("Question: What is the capital of Voustunia?\nAnswer:", " Driszaim"),
    ("Question: What is the capital of Simfuthia?\nAnswer:", " Bailtour"),
    ("Fill in the blank.\nThe emblem of Voustunia is the ___.\nBlank:", " eagle"),
    ("Fill in the blank.\nThe emblem of Simfuthia is the ___.\nBlank:", " heron"),
    ("The capital of Voustunia is", " Driszaim, on the river."),
]


@pytest.fixture(scope="module")
def toy_models():
    import transformers

    names = ["large-base", "small-base", "expert-qa", "expert-fill"]
    return {n: transformers.AutoModelForCausalLM.from_pretrained(REPO / "models" / "toy" / n, dtype=torch.float32).eval() for n in names}


def toy_server(url: str, api: str, top_n: int) -> dict:
    return {"server": {"api": api, "url": url, "model": "toy-large", "top_n": top_n}, "tokenizer": str(REPO / "models" / "toy" / "large-base")}


@pytest.mark.parametrize("api,top_n", [("openai-completions", 5), ("openai-completions", 20), ("tgi", 5)])
def test_small_top_n_stays_within_the_tail_bound(tmp_path, toy_models, api, top_n):
    """The toy world's trained models, static weights 0.7, the large model's top_n reported:
    each fused continuation loglikelihood is the tail rule's (reported log-probabilities, the
    rest of the mass spread evenly), fused here in float64 from the models themselves; it is
    within the sum over its tokens of log((Z_K + r max_U g) / (Z_K + r min_U g)) of the exact
    one; and the truncation does change the answers. TGI reports no top tokens at prompt
    positions: there the reported set is the scored token alone."""
    weight = 0.7
    requests = [Instance("loglikelihood", None, pair, i) for i, pair in enumerate(TOY_REQUESTS)]
    local = DLFLM(registry=str(toy_registry(tmp_path, {"path": str(REPO / "models" / "toy" / "large-base")})), experts="qa+fill", solver="static", weight=weight)
    with StandIn(toy_models["large-base"], "toy-large", tokenizer=local.tokenizer) as server:
        served = toy_server(server.root if api == "tgi" else server.url, api, top_n)
        remote = DLFLM(registry=str(toy_registry(tmp_path, served)), experts="qa+fill", solver="static", weight=weight)
        ours = remote.loglikelihood(requests)
    theirs = local.loglikelihood(requests)
    vocab = local.engine.vocab_size
    errors, bounds, by_rule = [], [], []
    for (context, continuation), (lp, _), (ref_lp, _) in zip(TOY_REQUESTS, ours, theirs):
        ctx, cont = local._encode_pair(context, continuation)
        tokens = torch.tensor([ctx + cont])
        with torch.no_grad():
            logits = {name: model(tokens).logits[0, :, :vocab].double() for name, model in toy_models.items()}
        bound = rule = 0.0
        for position in range(len(ctx) - 1, len(ctx) + len(cont) - 1):
            target = tokens[0, position + 1]
            p = logits["large-base"][position].softmax(-1)
            reported = torch.zeros(vocab, dtype=torch.bool)
            if api != "tgi":
                reported[p.topk(top_n).indices] = True
            reported[target] = True  # a scored position also reports its actual token
            tilt = weight * sum(logits[e][position] - logits[s][position] for e, s in TOY_PAIRS)
            # The rule rebuilds from what a server sends: float32 log-probabilities (when the
            # reported tokens hold nearly all the mass, the rest is sensitive to their rounding).
            sent = logits["large-base"][position].float().log_softmax(-1).double()
            rest_sent = 1.0 - float(sent[reported].exp().sum())
            rebuilt = sent.masked_fill(~reported, math.log(rest_sent / int((~reported).sum())))
            rule += float((rebuilt + tilt).log_softmax(-1)[target])
            g = (tilt - tilt.max()).exp()
            z_known, rest = float((p * g)[reported].sum()), float(p[~reported].sum())
            bound += math.log((z_known + rest * float(g[~reported].max())) / (z_known + rest * float(g[~reported].min())))
        errors.append(abs(lp - ref_lp))
        bounds.append(bound)
        by_rule.append(rule)
    assert [lp for lp, _ in ours] == pytest.approx(by_rule, abs=1e-4)
    assert all(e <= b + 1e-5 for e, b in zip(errors, bounds)), list(zip(errors, bounds))
    assert max(errors) > 1e-4  # the top few tokens of 2048 do not give the exact answer


def test_tgi_generation_equals_the_local_backend(tmp_path, toy_models):
    """TGI's /generate (text in, ids out), all 2048 top tokens per step: fused greedy
    generations token for token (toy_fill's prompts, whose fused answers tokenise back)."""
    prompts = [Instance("generate_until", None, (context, {"until": ["\n"], "max_gen_toks": 12}), i) for i, (context, _) in enumerate(TOY_REQUESTS)]
    local = DLFLM(registry=str(toy_registry(tmp_path, {"path": str(REPO / "models" / "toy" / "large-base")})), experts="qa+fill", solver="dlf", batch_size="2")
    with StandIn(toy_models["large-base"], "toy-large", tokenizer=local.tokenizer) as server:
        remote = DLFLM(registry=str(toy_registry(tmp_path, toy_server(server.root, "tgi", 2048))), experts="qa+fill", solver="dlf", batch_size="2")
        ours = remote.generate_until(prompts)
        assert remote.engine.models["large-base"].client.requests > len(prompts)  # it was asked every step
    assert ours == local.generate_until(prompts)
    assert sum(len(text) for text in ours) > 10


def test_steps_the_server_ends_on_its_own_pick_are_read_by_echo(tmp_path, tiny_world, large):
    """llama-cpp-python returns no logprobs for a step whose own greedy pick ends generation;
    dlf reads that step's distribution by echo behind one more token, and generates exactly."""
    local = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="static", batch_size="2")
    with StandIn(large, "tiny-large", mode="stops") as server:
        remote = DLFLM(registry=served_registry(tmp_path, tiny_world, server.url), experts="a1+b", solver="static", batch_size="2")
        assert remote.generate_until(gen_requests()) == local.generate_until(gen_requests())


def test_a_server_that_is_down_fails_before_any_weights_load(tmp_path, tiny_world, monkeypatch):
    loads = []
    monkeypatch.setattr(loading, "load_model", lambda spec, *a, **k: loads.append(spec.name))
    url = f"http://127.0.0.1:{free_port()}/v1"
    registry = served_registry(tmp_path, tiny_world, url, retries=1)
    with pytest.raises(ServerError, match=rf"model large: server {url}: models: .*refused.* \(2 tries\); check that the server is running"):
        DLFLM(registry=registry, experts="a1")
    assert loads == []


@pytest.mark.parametrize(
    "mode,server,message",
    [
        ("slow", dict(timeout=0.3, retries=0), r"completions: no answer within 0.3 s \(1 tries\).*raise server.timeout"),
        ("http-500", dict(retries=1), r"completions answered HTTP 500 after 2 tries: .*fails on purpose"),
        ("positive", {}, r"a reported log-probability is not a finite number <= 0"),
        ("no-logprobs", {}, r"completions answered without choices\[0\].logprobs"),
    ],
)
def test_a_misbehaving_server_stops_the_run_naming_it(tmp_path, tiny_world, large, mode, server, message):
    with StandIn(large, "tiny-large", mode=mode, delay=1.5) as stand_in:
        registry = served_registry(tmp_path, tiny_world, stand_in.url, **server)
        with pytest.raises(ServerError, match=rf"model large: server {stand_in.url}: .*{message}"):
            DLFLM(registry=registry, experts="a1")  # the load-time probe is the first request


def test_the_wrong_model_name_is_named(tmp_path, tiny_world, large):
    with StandIn(large, "tiny-large") as stand_in:
        registry = served_registry(tmp_path, tiny_world, stand_in.url)
        doc = yaml.safe_load(Path(registry).read_text())
        doc["models"]["large"]["server"]["model"] = "other"
        Path(registry).write_text(yaml.safe_dump(doc))
        with pytest.raises(ServerError, match=r"serves \['tiny-large'\], not 'other'; set server.model"):
            DLFLM(registry=registry, experts="a1")


def test_an_api_key_is_sent_from_the_environment(tmp_path, tiny_world, large, monkeypatch):
    with StandIn(large, "tiny-large", api_key="s3cret") as stand_in:
        registry = served_registry(tmp_path, tiny_world, stand_in.url, api_key_env="DLF_TEST_KEY")
        monkeypatch.delenv("DLF_TEST_KEY", raising=False)
        with pytest.raises(ServerError, match=r"environment variable DLF_TEST_KEY \(server.api_key_env\) is not set"):
            DLFLM(registry=registry, experts="a1")
        monkeypatch.setenv("DLF_TEST_KEY", "wrong")
        with pytest.raises(ServerError, match=r"models answered HTTP 401: .*invalid API key"):
            DLFLM(registry=registry, experts="a1")
        monkeypatch.setenv("DLF_TEST_KEY", "s3cret")
        lm = DLFLM(registry=registry, experts="a1", solver="static")
        assert lm.loglikelihood(ll_requests()[:1])[0][0] < 0


def test_failed_requests_are_retried(tmp_path, tiny_world, large):
    with StandIn(large, "tiny-large", mode="flaky") as stand_in:
        lm = DLFLM(registry=served_registry(tmp_path, tiny_world, stand_in.url, retries=2), experts="a1", solver="static")
        client = lm.engine.models["large"].client
        assert client.requests == 1 + 3  # /models, then the probe twice refused (503) and answered
        assert lm.loglikelihood(ll_requests()[:2])[0][0] < 0


def test_a_fault_mid_run_leaves_no_results(tmp_path, tiny_world, large):
    """lm_eval with --output_path: the server breaks after a few answers; the run exits non-zero
    naming the server, and no results file is written."""
    out = tmp_path / "out"
    with StandIn(large, "tiny-large", mode="fail-later", after=3) as stand_in:
        registry = served_registry(tmp_path, tiny_world, stand_in.url)
        run = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "dlf", "--model_args", f"registry={registry},experts=a1+b",
             "--tasks", "toy_qa", "--include_path", str(REPO / "tasks" / "toy"), "--limit", "6", "--batch_size", "2",
             "--output_path", str(out)],
            capture_output=True, text=True, cwd=tmp_path,
        )
        assert stand_in.completions > 3  # it did break mid-run
    assert run.returncode != 0
    assert f"server {stand_in.url}" in run.stderr and "not a finite number <= 0" in run.stderr
    assert not [p for p in out.rglob("*") if p.is_file()]  # rglob of a missing folder is empty too


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.pop("tokenizer"), r"models.large is behind a server and needs tokenizer:"),
        (lambda s: s["server"].update(api="grpc"), r"models.large.server.api: 'grpc' is not one of openai-completions, tgi"),
        (lambda s: s["server"].update(api="tgi", prompt="tokens"), r"models.large.server.prompt: TGI's /generate takes text only"),
        (lambda s: s["server"].update(url="127.0.0.1:8000"), r"models.large.server.url must start with http:// or https://"),
        (lambda s: s["server"].update(top_n=0), r"models.large.server.top_n must be a whole number >= 1"),
        (lambda s: s["server"].update(timeout=-1), r"models.large.server.timeout must be a number of seconds"),
        (lambda s: s["server"].update(prompt="ids"), r"models.large.server.prompt: 'ids' is not one of tokens, text"),
        (lambda s: s["server"].pop("model"), r"models.large.server is missing required key 'model'"),
        (lambda s: s["server"].update(tls=True), r"unknown key\(s\) tls in models.large.server"),
        (lambda s: s.update(dtype="float16"), r"models.large.dtype does not apply to a model behind a server"),
    ],
)
def test_bad_server_entries_are_named_before_anything_loads(tmp_path, tiny_world, monkeypatch, edit, message):
    monkeypatch.setattr(loading, "load_model", lambda spec, *a, **k: pytest.fail("a model loaded"))
    registry = served_registry(tmp_path, tiny_world, "http://127.0.0.1:9/v1")
    doc = yaml.safe_load(Path(registry).read_text())
    edit(doc["models"]["large"])
    Path(registry).write_text(yaml.safe_dump(doc))
    with pytest.raises(RegistryError, match=message) as info:
        DLFLM(registry=registry, experts="a1")
    assert registry in str(info.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(experts="a1", speculate=3), r"speculate=3: the large model large is behind a server"),
        (dict(experts="a1", lookup=4), r"lookup=4: the large model large is behind a server"),
        (dict(experts=""), r"behind a server and no expert pair is chosen"),
    ],
)
def test_model_args_a_server_cannot_serve(tmp_path, tiny_world, monkeypatch, args, message):
    monkeypatch.setattr(loading, "load_model", lambda spec, *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(RegistryError, match=message):
        DLFLM(registry=served_registry(tmp_path, tiny_world, "http://127.0.0.1:9/v1"), **args)


def test_a_small_model_behind_a_server_is_refused(tmp_path, tiny_world):
    registry = served_registry(tmp_path, tiny_world, "http://127.0.0.1:9/v1")
    doc = yaml.safe_load(Path(registry).read_text())
    doc["models"]["small-a"] = doc["models"]["large"]
    doc["models"]["large"] = {"path": str(tiny_world["root"] / "large")}
    Path(registry).write_text(yaml.safe_dump(doc))
    with pytest.raises(RegistryError, match=r"pairs.a1.base: 'small-a' is behind a server; only the large model may be"):
        DLFLM(registry=str(registry), experts="a1")


# -- a real server ---------------------------------------------------------------------


def run_lm_eval(registry: Path, out: Path, tasks: str, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "dlf", "--model_args", f"registry={registry},experts=qa+fill,solver=dlf",
         "--tasks", tasks, "--include_path", str(REPO / "tasks" / "toy"), "--limit", str(limit),
         "--batch_size", "4", "--log_samples", "--output_path", str(out)],
        capture_output=True, text=True, cwd=out.parent,
    )


def samples(out: Path) -> dict:
    by_task = {}
    for path in out.rglob("samples_*.jsonl"):
        by_task[path.name.removeprefix("samples_").rsplit("_", 1)[0]] = [json.loads(line) for line in path.read_text().splitlines()]
    return by_task


def test_real_server(tmp_path):
    """llama-cpp-python's server (llama.cpp, from PyPI) serving a GGUF conversion of the toy
    large base; ``lm_eval --model dlf`` against it equals the local run: toy_fill's generations
    token for token, toy_mc's loglikelihoods to 1e-4 (top_n = the 2048-token vocabulary).

    That server takes text only. toy_qa's fused answers include a split the tokenizer would
    not make (" t" + "ol" where it reads " to" + "l"): sent as text, the server would read other
    tokens, so the run stops there, naming the server, and writes nothing."""
    large = REPO / "models" / "toy" / "large-base"
    gguf = tiny_models.save_gguf(large, tmp_path / "large-base.gguf")
    run = run_lm_eval(toy_registry(tmp_path, {"path": str(large)}), tmp_path / "local", "toy_fill,toy_mc", 20)
    assert run.returncode == 0, run.stderr[-2000:]
    local = samples(tmp_path / "local")
    with llama_server(gguf, "toy-large", tmp_path / "server.log") as url:
        served = {"server": {"api": "openai-completions", "url": url, "model": "toy-large", "top_n": 2048, "prompt": "text"}, "tokenizer": str(large)}
        registry = toy_registry(tmp_path, served)
        run = run_lm_eval(registry, tmp_path / "remote", "toy_fill,toy_mc", 20)
        assert run.returncode == 0, run.stderr[-2000:]
        refused = run_lm_eval(registry, tmp_path / "refused", "toy_qa", 40)
    remote = samples(tmp_path / "remote")
    assert sorted(remote) == sorted(local) == ["toy_fill", "toy_mc"]
    assert [s["resps"] for s in remote["toy_fill"]] == [s["resps"] for s in local["toy_fill"]]
    ours = [float(r[0][0]) for s in remote["toy_mc"] for r in s["resps"]]
    theirs = [float(r[0][0]) for s in local["toy_mc"] for r in s["resps"]]
    assert len(ours) == len(theirs) == 80
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert refused.returncode != 0
    assert f"server {url}: the sequence cannot be sent as text" in refused.stderr
    assert not [p for p in (tmp_path / "refused").rglob("*") if p.is_file()]
