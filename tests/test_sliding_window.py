"""Sliding-window attention (Mistral, Gemma 2 and 3, Qwen 2 with use_sliding_window, Phi-3, ...).

dlf hands every model a 4D attention mask of its own (no device sync a step), and transformers
uses such a mask as it is: the window is dlf's to apply. Here three architectures with windows
of 5 tokens read prompts of several windows: a Mistral large model (every layer slides), a
Qwen 2 small base (a full layer, then a sliding one) and a Gemma 2 expert (sliding and full
alternating, logits soft-capped). Scores and greedy tokens, batched with ragged prompts and
speculative rounds whose refused drafts stay masked in the caches, are checked against the
float64 brute force of tests/reference.py, which runs each model's own forward over every
unpadded prefix and so builds its masks the transformers way.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from lm_eval.api.instance import Instance

import reference
from dlf_plugin import loading, tiny_models
from dlf_plugin.backends import ModelFault
from dlf_plugin.lm import DLFLM

WINDOW = 5
PROMPTS = [
    "Question: What is the capital of the kingdom of Varn?\nAnswer:",
    "The river Tesh",
    "the quick brown fox jumps over the lazy dog and then the fox",
    "Lorem ipsum dolor sit amet",
]
CONTEXTS = [
    ("The river Tesh flows north through the valley of", " Amor and reaches the sea"),
    ("Lorem ipsum", " dolor sit amet, consectetur adipiscing"),
    ("Answer the following question.\n\nQuestion: Mira has 3 apples and buys", " 4 more. How many now?"),
]
NEW = 12


def _configs(vocab: int, ids: dict) -> dict:
    shape = dict(vocab_size=vocab, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **ids)
    return {
        "large": transformers.MistralConfig(hidden_size=48, intermediate_size=96, sliding_window=WINDOW, tie_word_embeddings=False, **shape),
        "small": transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
            tie_word_embeddings=False, **shape,
        ),
        "expert": transformers.Gemma2Config(hidden_size=32, intermediate_size=64, head_dim=8, sliding_window=WINDOW, **shape),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sliding_world")
    tok = tiny_models.make_tokenizer()
    configs = _configs(len(tok), dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    models = {}
    for seed, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # models that disagree clearly, so that fusion changes the winner
            model.get_output_embeddings().weight.normal_(0.0, 0.5)
        tiny_models.save(model, tok, root / name)
        models[name] = transformers.AutoModelForCausalLM.from_pretrained(root / name).eval()
    assert models["small"].config.layer_types == ["full_attention", "sliding_attention"]
    assert models["expert"].config.layer_types == ["sliding_attention", "full_attention"]
    assert getattr(models["large"].config, "layer_types", None) is None and models["large"].config.sliding_window == WINDOW
    registry = {
        "name": "sliding",
        "defaults": {"dtype": "float32", "device": "cpu"},
        "models": {name: {"path": name} for name in configs},
        "large": "large",
        "pairs": {"p": {"expert": "expert", "base": "small", "tasks": []}},
    }
    (root / "sliding.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
    return {"root": root, "registry": str(root / "sliding.yaml"), "models": models}


def _lm(world, **kwargs) -> DLFLM:
    return DLFLM(registry=world["registry"], experts="p", solver="static", weight=0.7, **kwargs)


PAIRS = [("expert", "small", 0.7)]


def test_scores_past_the_window_equal_brute_force(world):
    lm = _lm(world, batch_size=3)
    ours = lm.loglikelihood([Instance("loglikelihood", None, pair, i) for i, pair in enumerate(CONTEXTS)])
    for (context, continuation), (logprob, greedy) in zip(CONTEXTS, ours):
        ctx, cont = lm._encode_pair(context, continuation)
        assert len(ctx) + len(cont) > 3 * WINDOW
        expected, expected_greedy = reference.continuation_logprob(world["models"], "large", PAIRS, ctx, cont, lm.engine.vocab_size)
        assert logprob == pytest.approx(expected, abs=1e-4, rel=1e-5)
        assert greedy == expected_greedy


@pytest.mark.parametrize("speculate, slots", [(0, None), (3, None), (3, 2)])
def test_greedy_tokens_past_the_window_equal_brute_force(world, taken_over, first_prompt_stops_after, speculate, slots):
    """A ragged batch (left padding), decoded plainly and in speculative rounds of 3: a
    refused draft stays in the caches, masked, and must take no place in the window. With
    2 rows for the prompts (the first stopping after 4 tokens), those that take over a
    stopped row's caches (its older columns masked) must not count them in the window
    either."""
    lm = _lm(world, batch_size=4, speculate=speculate)
    if slots:
        lm._slots = slots
        first_prompt_stops_after(lm.engine, 4)
    context, mask = lm.tok_batch_encode(PROMPTS)
    assert mask[:, 0].tolist().count(0) >= 2  # padded rows
    seen = []  # (row, position, fused logits) of every token emitted

    def observe(fused, rows, fused_rows, tokens, positions, drafted):
        seen.extend((r, t, fused.logits[f].clone()) for r, f, t in zip(rows, fused_rows, positions))

    lm.engine.observer = observe
    out = lm._model_generate(context, context.shape[1] + NEW, stop=[], attention_mask=mask, do_sample=False)
    vocab = lm.engine.vocab_size
    expected = [reference.greedy_tokens(world["models"], "large", PAIRS, lm.tok_encode(p), vocab, NEW, lm.eot_token_id) for p in PROMPTS]
    if slots:
        expected[0] = expected[0][:4]
    for row, tokens in enumerate(expected):
        assert out[row, context.shape[1] :].tolist()[: len(tokens)] == tokens, row
    # Each emitted token's fused logits, not only its argmax: a window a few tokens short
    # moves them without always changing the winner.
    assert len(seen) == sum(map(len, expected))
    for row, position, logits in seen:
        prefix = lm.tok_encode(PROMPTS[row]) + out[row, context.shape[1] : context.shape[1] + position].tolist()
        assert torch.allclose(logits.double(), reference.fused_logits(world["models"], "large", PAIRS, prefix, vocab), atol=1e-4), (row, position)
    if speculate:
        drafted, accepted = lm.engine.speculation["drafted"], lm.engine.speculation["accepted"]
        assert 0 < accepted < drafted  # rounds that kept drafts, and refused ones left in the caches
        assert lm.engine.speculation["prefills"] == (2 if slots else 1) and bool(taken_over) == bool(slots)


@pytest.mark.parametrize(
    "layer_types, window, message",
    [
        (["chunked_attention", "full_attention"], WINDOW, "has layers of kind chunked_attention"),
        (["sliding_attention", "full_attention"], None, "sliding_window is None"),
    ],
    ids=["unknown-kind", "no-window"],
)
def test_layers_dlf_cannot_mask_are_refused_before_weights_load(world, tmp_path, monkeypatch, layer_types, window, message):
    """A kind of layer whose mask dlf does not build (Llama 4's chunked attention, say) would
    be attended without its restriction: refused from the config, naming the model."""
    registry = yaml.safe_load(open(world["registry"]))
    for name in registry["models"]:
        registry["models"][name]["path"] = str(world["root"] / name)
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in (world["root"] / "small").iterdir():
        (odd / f.name).write_bytes(f.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    config.update(layer_types=layer_types, sliding_window=window, use_sliding_window=window is not None)
    (odd / "config.json").write_text(json.dumps(config))
    registry["models"]["small"]["path"] = str(odd)
    (tmp_path / "odd.yaml").write_text(yaml.safe_dump(registry))

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the configs were checked")

    monkeypatch.setattr(loading, "load_model", no_weights)
    with pytest.raises(ModelFault, match=f"model small .*{message}"):
        DLFLM(registry=str(tmp_path / "odd.yaml"), experts="p", solver="static")
