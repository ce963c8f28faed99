"""Prompt views (DESIGN.md section 7): a chat-template expert, shots for the large model only.

Every expectation is built by hand: the chat rendering written out as a string, the
zero-shot prompt typed from the document, the fusion recomputed by tests/reference.py
(float64, no cache, each pair reading its own tokens).
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from lm_eval.api.instance import Instance

import reference
from dlf_plugin.lm import DLFLM

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_VIEW = "chat:expert-chat"
WEIGHTS = {"a1": 0.7, "chat": 1.3, "b": 0.9}


def chat(text: str) -> str:
    """The chat view of a one-message prompt, by hand."""
    return f"<|user|>{text}\n<|assistant|>"


CONTEXTS = [
    ("Question: What is the capital of Varn?\nAnswer:", " Oskel"),
    ("The river Tesh flows", " north through the valley"),
    ("Lorem", " ipsum dolor sit amet"),
]


@pytest.fixture(scope="module")
def chat_world(tiny_world, tmp_path_factory):
    """The tiny world plus ``expert-chat`` (expert-a2's weights, a chat template in its
    tokenizer config) and a pair ``chat`` over small-a, which the raw pair a1 shares."""
    root = tmp_path_factory.mktemp("chat_world")
    folder = root / "expert-chat"
    shutil.copytree(tiny_world["root"] / "expert-a2", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    doc = yaml.safe_load(tiny_world["registry"].read_text())
    doc["models"] = {name: {"path": str(tiny_world["root"] / spec["path"])} for name, spec in doc["models"].items()}
    doc["models"]["expert-chat"] = {"path": str(folder)}
    doc["pairs"]["chat"] = {"expert": "expert-chat", "base": "small-a", "tasks": ["toy_qa"], "chat_template": True}
    (root / "chat.yaml").write_text(yaml.safe_dump(doc))
    return root / "chat.yaml"


@pytest.fixture(scope="module")
def models(tiny_models_loaded):
    loaded = dict(tiny_models_loaded)
    loaded["expert-chat"] = loaded["expert-a2"]  # same weights
    return loaded


def _weights(names: str) -> str:
    return "+".join(f"{n}:{WEIGHTS[n]}" for n in names.split("+"))


def _pairs(lm):
    return [(p.expert, p.base, WEIGHTS[p.name]) for p in lm.pair_specs]


def _requests(kind, items, views):
    out = []
    for i, args in enumerate(items):
        request = Instance(kind, None, args, i)
        request.dlf_views = views(args[0])
        out.append(request)
    return out


def test_chat_expert_loglikelihoods_equal_brute_force(chat_world, models):
    lm = DLFLM(registry=str(chat_world), experts="a1+chat", solver="static", weights=_weights("a1+chat"), batch_size="2")
    assert [v.name for v in lm.views.views] == ["large", CHAT_VIEW]
    # small-a reads both views: raw for a1, the chat template for chat.
    assert lm.views.runners == {"large": "large", "small-a": "small-a", "expert-a1": "expert-a1",
                                "small-a@chat:expert-chat": "small-a", "expert-chat": "expert-chat"}
    results = lm.loglikelihood(_requests("loglikelihood", CONTEXTS, lambda c: {CHAT_VIEW: chat(c)}))
    for (context, continuation), (logprob, greedy) in zip(CONTEXTS, results):
        ctx, cont = lm._encode_pair(context, continuation)
        own = lm.tok_encode(chat(context))
        expected = reference.continuation_logprob(models, "large", _pairs(lm), ctx, cont, lm.engine.vocab_size, pair_contexts=[ctx, own])
        assert logprob == pytest.approx(expected[0], abs=1e-4, rel=1e-5)
        assert greedy == expected[1]
        # Views matter here: reading the raw prompt everywhere gives another answer.
        plain = reference.continuation_logprob(models, "large", _pairs(lm), ctx, cont, lm.engine.vocab_size)
        assert abs(plain[0] - logprob) > 1e-3
    described = {v["name"]: v for v in lm.get_model_info()["dlf"]["views"]}
    assert described[CHAT_VIEW]["models"] == ["small-a", "expert-chat"] and described[CHAT_VIEW]["chat_template"] == "expert-chat"
    assert described["large"]["models"] == ["large", "small-a", "expert-a1"] and described["large"]["chat_template"] is None
    assert described[CHAT_VIEW]["chat_template_sha256"] and all(v["boundary_differs"] == 0 for v in described.values())


@pytest.mark.parametrize("speculate, batch", [(0, "3"), (3, "3"), (3, "2")])
def test_chat_expert_greedy_tokens_equal_brute_force(chat_world, models, taken_over, first_prompt_stops_after, speculate, batch):
    # chat first: with speculate its expert drafts, reading its own view. Batch 2: the
    # longest prompt (lm-eval's first) stops after 3 tokens, and the shortest takes over
    # its row, in both views' caches, while the third runs on.
    lm = DLFLM(registry=str(chat_world), experts="chat+a1", solver="static", weights=_weights("chat+a1"), batch_size=batch, speculate=speculate)
    if batch == "2":
        first_prompt_stops_after(lm.engine, 3)
    prompts = ["Question: What is the capital of Varn?\nAnswer:", "The", "the quick brown fox jumps over"]
    new = 9
    got = lm.generate_until(_requests("generate_until", [(p, {"until": [], "max_gen_toks": new}) for p in prompts], lambda c: {CHAT_VIEW: chat(c)}))
    longest = max(prompts, key=lambda p: len(lm.tok_encode(p)))
    for prompt, text in zip(prompts, got):
        own = lm.tok_encode(chat(prompt))
        tokens = reference.greedy_tokens(models, "large", _pairs(lm), lm.tok_encode(prompt), lm.engine.vocab_size, new, lm.eot_token_id, pair_prompts=[own, lm.tok_encode(prompt)])
        if batch == "2" and prompt == longest:
            tokens = tokens[:3]
        assert text == lm.tok_decode([t for t in tokens if t != lm.eot_token_id])
    if batch == "2":
        assert lm.get_model_info()["dlf"]["speculation"]["prefills"] == 2 and taken_over


def test_shots_to_the_large_model_only_equal_brute_force(tiny_world, models):
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="static", weights=_weights("a1+b"), batch_size="2", shots="large")
    assert [v.name for v in lm.views.views] == ["large", "zero-shot"]
    shots = "Question: What is the capital of Mord?\nAnswer: Kelt\n\nQuestion: What is the capital of Sarn?\nAnswer: Ivo\n\n"
    questions = [("Question: What is the capital of Varn?\nAnswer:", " Oskel"), ("Question: Who rules Tesh?\nAnswer:", " Queen Ama")]
    requests = _requests("loglikelihood", [(shots + q, a) for q, a in questions], lambda c: {"zero-shot": c[len(shots):]})
    results = lm.loglikelihood(requests)
    for (question, answer), (logprob, greedy) in zip(questions, results):
        ctx, cont = lm._encode_pair(shots + question, answer)
        zero = lm.tok_encode(question)
        expected = reference.continuation_logprob(models, "large", _pairs(lm), ctx, cont, lm.engine.vocab_size, pair_contexts=[zero, zero])
        assert logprob == pytest.approx(expected[0], abs=1e-4, rel=1e-5)
        assert greedy == expected[1]
    assert lm.get_model_info()["dlf"]["shots"] == "large"


def test_a_view_whose_boundary_tokenises_otherwise_reads_view_0s_continuation(chat_world, models):
    lm = DLFLM(registry=str(chat_world), experts="chat", solver="static", weights=_weights("chat"), batch_size="2")
    context, continuation, view_text = "Answer:", "er flows", "The riv"  # "riv" + "er" merges in the view's own tokenisation
    ctx, cont = lm._encode_pair(context, continuation)
    own = lm.tok_encode(view_text)
    assert lm.tok_encode(view_text + continuation) != own + cont  # the premise
    [(logprob, _)] = lm.loglikelihood(_requests("loglikelihood", [(context, continuation)], lambda c: {CHAT_VIEW: view_text}))
    expected = reference.continuation_logprob(models, "large", _pairs(lm), ctx, cont, lm.engine.vocab_size, pair_contexts=[own])
    assert logprob == pytest.approx(expected[0], abs=1e-4, rel=1e-5)
    described = {v["name"]: v["boundary_differs"] for v in lm.get_model_info()["dlf"]["views"]}
    assert described == {"large": 0, CHAT_VIEW: 1}


def test_requests_without_their_views_are_refused(chat_world):
    from dlf_plugin.arguments import RequestError

    lm = DLFLM(registry=str(chat_world), experts="chat", solver="static", batch_size="2")
    plain = [Instance("loglikelihood", None, CONTEXTS[0], 0)]
    with pytest.raises(RequestError, match=r"request 0 \(task \?, doc_id \?\) carries no rendering for prompt view\(s\) chat:expert-chat"):
        lm.loglikelihood(plain)


def test_lm_eval_tasks_render_every_view_with_the_same_demonstrations(chat_world, tmp_path):
    """Through lm-eval's own task building (a toy task, 2 shots): the chat view is the
    expert's template around view 0's prompt, shots and all; the zero-shot views are the
    document's question typed by hand; view 0 is what lm-eval builds without dlf."""
    from lm_eval.tasks import TaskManager

    from dlf_plugin import views
    from dlf_plugin.resources import data_root

    def build_requests():
        manager = TaskManager(include_path=str(data_root() / "tasks" / "toy"))
        task = manager.load_task_or_group(["toy_qa_dev"])["toy_qa_dev"]
        task.set_config(key="num_fewshot", value=2)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=4)
        return task.instances

    views.record({})
    bare = [i.args[0] for i in build_requests()]
    DLFLM(registry=str(chat_world), experts="a1+chat", solver="static", shots="large", batch_size="2")
    built = build_requests()
    assert [i.args[0] for i in built] == bare  # the demonstrations drawn are lm-eval's own
    for instance in built:
        question = f"Question: What is the capital of {instance.doc['entity']}?\nAnswer:"
        assert instance.args[0].endswith("\n\n" + question) and instance.args[0].count("Question:") == 3
        assert instance.dlf_views == {"zero-shot": question, "chat:expert-chat, zero-shot": chat(question)}
    lm = DLFLM(registry=str(chat_world), experts="a1+chat", solver="static", batch_size="2")
    for instance, context in zip(build_requests(), bare):
        assert instance.dlf_views == {CHAT_VIEW: chat(context)}
    # Requests rendered for other views (as --cache_requests would keep them) are refused.
    from dlf_plugin.arguments import RequestError

    built[0].arguments = (built[0].args[0], {"until": [], "max_gen_toks": 2})
    built[0].dlf_views[CHAT_VIEW] = "anything"
    with pytest.raises(RequestError, match=r"request 0 \(task toy_qa_dev, doc_id 0\) was rendered for other prompt views"):
        lm.generate_until(built[:1])
    views.record({})


def test_a_num_fewshot_run_shows_the_demonstrations_to_the_large_model_only():
    """lm-eval end to end on the toy world (2 shots, shots=large): the large model's prompts
    hold the demonstrations, the pair's hold the question alone; the results say so."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from dlf_plugin.resources import data_root

    lm = DLFLM(registry="toy", experts="qa", shots="large", batch_size=4)
    seen = []
    generate = lm.engine.generate
    lm.engine.generate = lambda ids, mask, *a, **k: seen.append((ids, mask)) or generate(ids, mask, *a, **k)
    manager = TaskManager(include_path=str(data_root() / "tasks" / "toy"))
    out = lm_eval.simple_evaluate(model=lm, tasks=["toy_qa_dev"], task_manager=manager, limit=4, num_fewshot=2, log_samples=True, bootstrap_iters=0)
    (large, zero), (large_mask, zero_mask) = seen[0]
    for row in range(4):
        assert lm.tok_decode(large[row][large_mask[row].bool()].tolist()).count("Question:") == 3
        text = lm.tok_decode(zero[row][zero_mask[row].bool()].tolist(), skip_special_tokens=True)
        assert text.startswith("Question: What is the capital of ") and text.count("Question:") == 1
    recorded = out["config"]["dlf"]
    assert recorded["shots"] == "large"
    assert [(v["name"], v["shots"], v["models"]) for v in recorded["views"]] == [("large", True, ["large-base"]), ("zero-shot", False, ["small-base", "expert-qa"])]
