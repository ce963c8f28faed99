"""Writes the models of registry/toy.yaml into models/toy/ (seeded, deterministic).

These are randomly initialised Llama models with a shared byte-level tokenizer: they
exercise the whole path (from_pretrained, fusion, lm-eval) offline, but know nothing.
The trained toy world of weak-to-strong transfer replaces them.

    python scripts/make_demo_models.py
"""

from pathlib import Path

from dlf_plugin import tiny_models

OUT = Path(__file__).resolve().parent.parent / "models" / "toy"
SHAPES = {
    "large-base": dict(seed=11, hidden_size=64, layers=4, heads=4, kv_heads=2),
    "small-base": dict(seed=12, hidden_size=32, layers=2),
    "expert-qa": dict(seed=13, hidden_size=32, layers=2),
    "expert-mc": dict(seed=14, hidden_size=32, layers=2),
}


def main() -> None:
    tok = tiny_models.make_tokenizer()
    for name, shape in SHAPES.items():
        model = tiny_models.make_llama(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape
        )
        tiny_models.save(model, tok, OUT / name)
        print("wrote", OUT / name)


if __name__ == "__main__":
    main()
