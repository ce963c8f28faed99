"""Fused decoding against the cost of its models, measured side by side in one run.

    python bench/decode.py [--batches 1 8 32] [--prompt 128] [--new 128] [--device cpu]

Models are Llama-shaped and random (made here, nothing downloaded): a large base of
about 100M parameters and small ones of about 20M, vocabulary 32,000. Per batch size,
per generated token (prefill included, amortised over the new tokens):

  (a) each model alone, transformers' ``generate`` with its KV cache
  (b) the sum of (a)
  (c) dlf, ``static`` solver          (d) dlf, default solver (``dlf``)
  (e) a fused loop without KV cache (the DExperts-style baseline; recomputes every prefix)

then the ratios c/b, d/b and e/d, a four-pair run on one shared small base (forward
passes counted per step), peak memory beside weights + KV caches, and fused
multiple-choice scoring against the models' own teacher-forced passes.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
import transformers

from dlf_plugin import tiny_models
from dlf_plugin.engine import FusionEngine, Pair, Sampling
from dlf_plugin.solvers.dlf import ExactSolver
from dlf_plugin.solvers.static import StaticSolver

VOCAB = 32000
LARGE = dict(hidden_size=768, layers=8, heads=12, kv_heads=12, intermediate_size=2048)  # ~105M
SMALL = dict(hidden_size=256, layers=4, heads=4, kv_heads=4, intermediate_size=688)  # ~20M
NEVER = -1  # an EOS id no token has: every run generates exactly --new tokens


def build(kind: str, seed: int, device: str) -> transformers.PreTrainedModel:
    shape = LARGE if kind == "large" else SMALL
    model = tiny_models.make_llama(vocab_size=VOCAB, seed=seed, max_positions=1024, **shape)
    with torch.no_grad():
        # Logits with a spread like a trained model's (std ~3), not a random init's.
        model.lm_head.weight.normal_(0.0, 3.0 / shape["hidden_size"] ** 0.5, generator=torch.Generator().manual_seed(seed))
    return model.to(device).eval()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompts(batch: int, length: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    return ids.to(device), torch.ones_like(ids, device=device)


def hf_generate(model, ids, mask, new: int):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
        use_cache=True, pad_token_id=0, eos_token_id=None,
    )


def fused_generate(engine: FusionEngine, ids, mask, new: int):
    return engine.generate(ids, mask, new, Sampling(), eos_token_id=NEVER, pad_token_id=0)


def uncached_generate(engine: FusionEngine, ids, new: int):
    """DExperts-style: every step runs every model on the whole sequence, no cache."""
    tokens = ids
    for _ in range(new):
        positions = torch.zeros_like(tokens, dtype=torch.bool)
        positions[:, -1] = True
        fused = engine.score(tokens, positions)
        tokens = torch.cat([tokens, fused.logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def kv_cache_bytes(model, batch: int, length: int) -> int:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * batch * length * next(model.parameters()).element_size()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rss_peak_reset() -> bool:
    """Return freed heap to the system, then reset the peak resident size (Linux);
    False where not possible. Without the trim, memory freed by earlier runs would be
    reused unseen and the peak would read low."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        return False
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def rss(field: str) -> int:
    with open(f"/proc/{os.getpid()}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Counter:
    """Counts forward calls of each model."""

    def __init__(self, models: dict):
        self.counts = dict.fromkeys(models, 0)
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in models.items()]

    def _hook(self, name):
        def hook(module, args):
            self.counts[name] += 1

        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def target(name: str, value: float, goal: float) -> bool:
    ok = value <= goal
    print(f"target {name}: {value:.3f} (goal <= {goal}) {'PASS' if ok else 'FAIL'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--uncached-new", type=int, default=16, help="tokens for (e), whose cost grows with length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)

    models = {
        "large": build("large", 1, device).to(dtype),
        "small": build("small", 2, device).to(dtype),
        "expert": build("small", 3, device).to(dtype),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.dtype}")
    print(", ".join(f"{n}: {params(m) / 1e6:.1f}M parameters" for n, m in models.items()))
    pairs = [Pair("task", "expert", "small")]
    engines = {
        "static": FusionEngine(models, "large", pairs, VOCAB, StaticSolver(["task"]), "builtin"),
        "dlf": FusionEngine(models, "large", pairs, VOCAB, ExactSolver(["task"]), "builtin"),
    }
    ok = True
    with torch.inference_mode():
        for batch in args.batches:
            ids, mask = prompts(batch, args.prompt, device)
            alone = {n: timed(lambda m=m: hf_generate(m, ids, mask, args.new), device, args.repeats) / args.new for n, m in models.items()}
            total = sum(alone.values())
            static = timed(lambda: fused_generate(engines["static"], ids, mask, args.new), device, args.repeats) / args.new
            dynamic = timed(lambda: fused_generate(engines["dlf"], ids, mask, args.new), device, args.repeats) / args.new
            uncached = timed(lambda: uncached_generate(engines["dlf"], ids, args.uncached_new), device, 1) / args.uncached_new
            print(f"\nbatch {batch}: ms per generated token ({args.prompt}-token prompts, {args.new} new tokens)")
            for name, value in alone.items():
                print(f"  (a) {name:<8} alone (generate, KV cache) {value * 1e3:9.2f}")
            print(f"  (b) sum of (a)                      {total * 1e3:9.2f}")
            print(f"  (c) dlf, static                     {static * 1e3:9.2f}   c/b = {static / total:.3f}")
            print(f"  (d) dlf, dlf solver                 {dynamic * 1e3:9.2f}   d/b = {dynamic / total:.3f}")
            print(f"  (e) fused, no KV cache              {uncached * 1e3:9.2f}   e/d = {uncached / dynamic:.2f}"
                  f"  (first {args.uncached_new} tokens only: its cost grows with length)")
            print(f"      large alone vs fused: d/(a large) = {dynamic / alone['large']:.2f}")
            if batch in (8, 32):
                ok &= target(f"static_vs_sum_batch{batch}", static / total, 1.10)
                ok &= target(f"dlf_vs_sum_batch{batch}", dynamic / total, 1.15)

        shared_base(models, args, device, dtype)
        ok &= memory(models, args, device)
        ok &= scoring(models, engines, args, device)
    raise SystemExit(0 if ok else 1)


def shared_base(models, args, device, dtype) -> None:
    """Four pairs on one small base: 1 + 1 + 4 forward passes per step, not 1 + 4 + 4."""
    experts = {f"expert{k}": build("small", 10 + k, device).to(dtype) for k in range(4)}
    all_models = {"large": models["large"], "small": models["small"], **experts}
    pairs = [Pair(f"task{k}", f"expert{k}", "small") for k in range(4)]
    engine = FusionEngine(all_models, "large", pairs, VOCAB, ExactSolver([p.name for p in pairs]), "builtin")
    batch, new = 8, 16
    ids, mask = prompts(batch, args.prompt, device)
    counter = Counter(all_models)
    try:
        fused_generate(engine, ids, mask, new)
    finally:
        counter.close()
    steps = new  # prefill + new - 1 cached steps = new forward calls per model
    per_step = {n: c / steps for n, c in counter.counts.items()}
    print(f"\nfour pairs on one small base, batch {batch}, {new} tokens: forward passes per step per model")
    print("  " + ", ".join(f"{n} {v:.0f}" for n, v in per_step.items()))
    print(f"  total per step {sum(per_step.values()):.0f} (1 large + 1 shared base + 4 experts = 6; unshared would be 9)")
    target("forward_passes_per_step_4pairs_shared_base", sum(per_step.values()), 6)
    alone = {n: timed(lambda m=m: hf_generate(m, ids, mask, new), device, 1) / new for n, m in all_models.items()}
    fused = timed(lambda: fused_generate(engine, ids, mask, new), device, 1) / new
    print(f"  fused {fused * 1e3:.2f} ms/token vs sum of the six models alone {sum(alone.values()) * 1e3:.2f}"
          f" (ratio {fused / sum(alone.values()):.3f})")


def memory(models, args, device) -> bool:
    """Peak memory of fused generation beside weights + KV caches, at the two largest batch sizes.

    What lies beyond weights and caches must grow like rows x models x vocabulary: it is
    printed in units of one float32 logit row per model and sequence, at both sizes.
    """
    ok = True
    weights = sum(weight_bytes(m) for m in models.values())
    engine = FusionEngine(models, "large", [Pair("task", "expert", "small")], VOCAB, ExactSolver(["task"]), "builtin")
    length = args.prompt + args.new
    print(f"\npeak memory of fused generation, {length} tokens (weights {weights / 2**20:.1f} MiB):")
    for batch in sorted(set(args.batches))[-2:]:
        ids, mask = prompts(batch, args.prompt, device)
        kv = sum(kv_cache_bytes(m, batch, length) for m in models.values())
        gc.collect()
        runs = []
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fused_generate(engine, ids, mask, args.new)
            peak = torch.cuda.max_memory_allocated() - before + weights
        else:
            # The resident-size high-water mark also sees the heap allocator's own choices (which
            # freed blocks it reuses, what it returns): it varies by several logit rows from run
            # to run for the same code, so the median of three runs is taken and all are shown.
            for _ in range(3):
                if not rss_peak_reset():
                    print("  cannot reset the peak resident size here; skipped")
                    return True
                before = rss("VmRSS")
                fused_generate(engine, ids, mask, args.new)
                runs.append(rss("VmHWM") - before + weights)
            peak = statistics.median(runs)
        beyond = peak - weights - kv
        logits = batch * len(models) * VOCAB * 4
        spread = f" (runs: {', '.join(f'{(r - weights - kv) / logits:.1f}' for r in runs)})" if runs else ""
        print(f"  batch {batch:>3}: KV caches {kv / 2**20:7.1f} MiB; peak {peak / 2**20:7.1f} MiB; beyond weights + KV"
              f" {beyond / 2**20:6.1f} MiB = {beyond / logits:.1f} logit rows per sequence and model{spread}")
        # A fixed number of logit-sized buffers (prefill activations included): at most 40.
        ok &= target(f"memory_beyond_weights_and_cache_in_logit_rows_batch{batch}", beyond / logits, 40)
    return ok


def scoring(models, engines, args, device) -> bool:
    """Fused multiple-choice scoring against each model's own teacher-forced pass."""
    batch, context, choice = 32, args.prompt, 8
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, context + choice), generator=gen).to(device)
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, -choice:] = True

    def alone(model):
        return model(ids, logits_to_keep=choice, use_cache=False).logits

    total = sum(timed(lambda m=m: alone(m), device, args.repeats) for m in models.values())
    print(f"\nfused scoring, batch {batch}, {context}-token contexts, {choice}-token continuations")
    ok = True
    for name, engine in engines.items():
        fused = timed(lambda e=engine: e.score(ids, positions), device, args.repeats)
        print(f"  {name:<7} {fused * 1e3:8.1f} ms vs sum of teacher-forced passes {total * 1e3:8.1f} ms ({fused / total:.3f})")
        ok &= target(f"scoring_{name}_vs_sum", fused / total, 1.10)
    return ok


if __name__ == "__main__":
    main()
