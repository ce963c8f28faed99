"""What dlf's load-time checks cost, beside the load they guard, measured side by side.

    python bench/load_checks.py [--repeats 5]

Two registries: the shipped toy one (six 0.2M-2M-parameter models) and one made here of
Llama-shaped random checkpoints (a ~105M large base and two ~20M small models,
vocabulary 32,000, saved as safetensors). Per registry, the median time of each check and
of loading the models (``from_pretrained``) they guard.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dlf_plugin import loading, tiny_models
from dlf_plugin.backends import LocalModel
from dlf_plugin.registry import load_registry

LARGE = dict(hidden_size=768, layers=8, heads=12, kv_heads=12, intermediate_size=2048)
SMALL = dict(hidden_size=256, layers=4, heads=4, kv_heads=4, intermediate_size=688)


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_registry(label: str, registry_path: str, pairs: list[str], repeats: int) -> None:
    registry = load_registry(registry_path)
    specs = registry.models_for(registry.select(pairs))
    tokenizers = loading.load_tokenizers(specs, registry.path)
    tokens = len(tokenizers[registry.large])
    models = {s.name: loading.load_model(s, "cpu", None, s.dtype, registry.path).model for s in specs}
    unchecked = [s.__class__(**{**s.__dict__, "check_weights": False}) for s in specs]
    probe = torch.tensor([tokenizers[registry.large].encode("dlf checks each output layer")[:8]])
    backends = {n: LocalModel(n, m, tokens, torch.device("cpu")) for n, m in models.items()}
    params = sum(p.numel() for m in models.values() for p in m.parameters())
    rows = {
        "registry file (strict YAML, aliases bounded, types)": lambda: load_registry(registry_path),
        "safetensors headers and tokenizer files": lambda: loading.check_sources(specs, registry.path),
        "output vocabulary from each config.json": lambda: loading.check_output_vocabularies(specs, tokens, registry.path),
        "NaN/inf in every weight": lambda: [loading.check_finite_weights(s, models[s.name]) for s in specs],
        "each split head against its own forward (8 tokens)": lambda: [b.check_head(probe) for b in backends.values()],
    }
    load = median_time(lambda: [loading.load_model(s, "cpu", None, s.dtype, registry.path) for s in unchecked], repeats)
    print(f"\n{label}: {len(specs)} models, {params / 1e6:.1f}M parameters; loading them (from_pretrained, no checks) {load * 1e3:.1f} ms")
    total = 0.0
    for name, fn in rows.items():
        seconds = median_time(fn, repeats)
        total += seconds
        print(f"  {name:<52} {seconds * 1e3:8.2f} ms  ({seconds / load:6.1%} of the load)")
    print(f"  {'all checks':<52} {total * 1e3:8.2f} ms  ({total / load:6.1%} of the load)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    bench_registry("toy registry", "toy", ["qa", "fill"], args.repeats)
    with tempfile.TemporaryDirectory() as root:
        tok = tiny_models.make_tokenizer()
        doc = {"name": "bench", "defaults": {"dtype": "float32", "device": "cpu"}, "models": {}, "large": "large",
               "pairs": {"p": {"expert": "expert", "base": "small"}}}
        for seed, (name, shape) in enumerate([("large", LARGE), ("small", SMALL), ("expert", SMALL)]):
            model = tiny_models.make_llama(vocab_size=32000, seed=seed, **shape)
            model.resize_token_embeddings(32000)
            tiny_models.save(model, tok, Path(root) / name)
            doc["models"][name] = {"path": name}
        path = Path(root) / "bench.yaml"
        path.write_text(yaml.safe_dump(doc))
        bench_registry("Llama-shaped random checkpoints, vocabulary 32,000", str(path), ["p"], args.repeats)


if __name__ == "__main__":
    main()
