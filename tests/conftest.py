"""A tiny world of real checkpoints, built once per test session (no downloads).

    large      Llama, hidden 48, 3 layers               (the large base)
    small-a    Llama, hidden 32, shared by pairs a1, a2
    expert-a1, expert-a2   same shape as small-a, other seeds
    small-b    Llama, hidden 24, vocabulary padded by 3 rows
    expert-b   same shape as small-b
    foreign    a model whose tokenizer has other merges (bad input)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads and lose much to oversubscription on small machines
# (set before torch loads, so that lm_eval subprocesses inherit it too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dlf_plugin import tiny_models  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAD_ROWS = 3


def _build(root: Path) -> dict:
    tok = tiny_models.make_tokenizer()
    vocab = len(tok)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    shapes = {
        "large": dict(vocab_size=vocab, seed=1, hidden_size=48, layers=3, heads=4, kv_heads=2),
        "small-a": dict(vocab_size=vocab, seed=2, hidden_size=32),
        "expert-a1": dict(vocab_size=vocab, seed=3, hidden_size=32),
        "expert-a2": dict(vocab_size=vocab, seed=4, hidden_size=32),
        "small-b": dict(vocab_size=vocab + PAD_ROWS, seed=5, hidden_size=24, heads=2, kv_heads=1),
        "expert-b": dict(vocab_size=vocab + PAD_ROWS, seed=6, hidden_size=24, heads=2, kv_heads=1),
    }
    for name, shape in shapes.items():
        model = tiny_models.make_llama(**shape, **ids)
        if shape["vocab_size"] > vocab:
            # Padding rows that would win every argmax if fusion ever let them through.
            model.lm_head.weight.data[vocab:] = 50.0
        tiny_models.save(model, tok, root / name)
    foreign_tok = tiny_models.make_tokenizer(corpus=["zebra yak xylophone " * 20, "quartz vortex jumbo " * 20])
    tiny_models.save(tiny_models.make_llama(vocab_size=len(foreign_tok), seed=7, **ids), foreign_tok, root / "foreign")
    registry = {
        "name": "tiny",
        "defaults": {"dtype": "float32", "device": "cpu"},
        "models": {name: {"path": name} for name in [*shapes, "foreign"]},
        "large": "large",
        "pairs": {
            "a1": {"expert": "expert-a1", "base": "small-a", "tasks": ["toy_qa"]},
            "a2": {"expert": "expert-a2", "base": "small-a", "tasks": ["toy_mc"]},
            "b": {"expert": "expert-b", "base": "small-b", "tasks": ["toy_qa"]},
            "foreign": {"expert": "foreign", "base": "small-a", "tasks": []},
        },
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
    return {"root": root, "registry": root / "tiny.yaml", "tokenizer": tok, "vocab": vocab}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict:
    return _build(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def tiny_models_loaded(tiny_world) -> dict:
    """Every tiny model loaded once, float32 on CPU: {name: model}."""
    import transformers

    names = ["large", "small-a", "expert-a1", "expert-a2", "small-b", "expert-b"]
    return {n: transformers.AutoModelForCausalLM.from_pretrained(tiny_world["root"] / n).eval() for n in names}


@pytest.fixture
def taken_over(monkeypatch) -> list:
    """Each time a free speculative row takes over a prefilled prompt's caches
    (``generate_speculative`` with slots), the row."""
    from dlf_plugin import engine

    takes, take_over = [], engine._Rows.take_over
    monkeypatch.setattr(engine._Rows, "take_over", lambda self, slot, *a: takes.append(slot) or take_over(self, slot, *a))
    return takes


@pytest.fixture
def first_prompt_stops_after(monkeypatch):
    """``apply(engine, n)``: from now, the engine's speculative generations stop their first
    prompt after n tokens, besides their own stops (the rows then finish at different
    rounds, and a row frees while others run)."""

    def apply(engine, tokens: int) -> None:
        generate = engine.generate_speculative

        def early(*args, stop_check=None, **kwargs):
            def check(rows, made):
                stopped = {r for r, t in zip(rows, made) if r == 0 and len(t) >= tokens}
                return stopped | (stop_check(rows, made) if stop_check else set())

            return generate(*args, stop_check=check, **kwargs)

        monkeypatch.setattr(engine, "generate_speculative", early)

    return apply
