"""Fused decoding and scoring against the cost of their own models, measured side by side.

    python bench/decode.py [--batches 1 8 32] [--prompt 128] [--new 64] [--device cpu] [--dtype float32]

Models are Llama-shaped and random (made here, nothing downloaded): a large base of
about 100M parameters and small ones of about 20M, vocabulary 32,000. Per batch size,
per generated token (prefill included, amortised over the new tokens):

  (a) each model alone, transformers' ``generate`` with its KV cache (for reference)
  (b) the floor: each model's own bare cached loop (prefill, then one-token steps with
      its KV cache and its own head, greedy, no fusion), summed over the models
  (c) dlf, ``static`` solver          (d) dlf, default solver (``dlf``)
  (e) a fused loop without KV cache (the DExperts-style baseline; recomputes every prefix)

then c/b and d/b, host syncs per decoding step (the sync-free path: ``static`` and the
``dlf`` solver's fixed schedule), a four-pair run on one shared small base (forward passes
counted per step), peak memory of generation beside weights + KV caches, fused scoring
against the models' own teacher-forced passes, and the peak memory of scoring every
position of 8 and 16 rows of 2,048 tokens at a 151,936-token vocabulary with two pairs.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import time

import torch
import transformers

from dlf_plugin import tiny_models
from dlf_plugin.backends import LocalModel
from dlf_plugin.engine import DEFAULT_FUSION_MEMORY, FusionEngine, Pair, Sampling
from dlf_plugin.solvers.dlf import ExactSolver
from dlf_plugin.solvers.static import StaticSolver
from dlf_plugin.syncs import count_syncs

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


def interleaved(runs: dict, device: str, repeats: int) -> dict:
    """Median wall time of each run, the runs taking turns (after one warm-up each), so
    that drifts of the machine hit the baseline and the fused runs alike."""
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def prompts(batch: int, length: int, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    return ids.to(device), torch.ones_like(ids, device=device)


def hf_generate(model, ids, mask, new: int):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
        use_cache=True, pad_token_id=0, eos_token_id=None,
    )


def bare_loop(model, ids, mask, new: int):
    """The floor: the model's own prefill and one-token cached steps, greedy, nothing else."""
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = transformers.DynamicCache()
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    step_ids, out = ids, []
    for _ in range(new):
        logits = model(step_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits
        step_ids = logits[:, -1].argmax(-1, keepdim=True)
        out.append(step_ids)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.cat(out, dim=1)


def engine(models: dict, pairs: list[Pair], solver, vocab: int = VOCAB, **kwargs) -> FusionEngine:
    device = next(models["large"].parameters()).device
    backends = {name: LocalModel(name, m, vocab, device) for name, m in models.items()}
    return FusionEngine(backends, "large", pairs, vocab, solver, "builtin", **kwargs)


def fused_generate(engine: FusionEngine, ids, mask, new: int):
    return engine.generate(ids, mask, new, Sampling(), eos_token_id=NEVER, pad_token_id=0)


def uncached_generate(engine: FusionEngine, ids, new: int):
    """DExperts-style: every step runs every model on the whole sequence, no cache."""
    tokens = ids
    for _ in range(new):
        positions = torch.zeros_like(tokens, dtype=torch.bool)
        positions[:, -1] = True
        greedy = engine.score(tokens, positions, torch.zeros(tokens.shape[0], 1, dtype=torch.long)).greedy
        tokens = torch.cat([tokens, greedy.unsqueeze(1)], dim=1)
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
    """Counts forward calls of each model (of its body: dlf runs the head itself)."""

    def __init__(self, models: dict):
        self.counts = dict.fromkeys(models, 0)
        self.handles = [m.base_model.register_forward_pre_hook(self._hook(n)) for n, m in models.items()]

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
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--uncached-new", type=int, default=16, help="tokens for (e), whose cost grows with length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--skip-scoring-memory", action="store_true", help="skip the 151,936-token scoring memory runs (minutes on a CPU)")
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
    engines = {"static": engine(models, pairs, StaticSolver(["task"])), "dlf": engine(models, pairs, ExactSolver(["task"]))}
    fixed = engine(models, pairs, ExactSolver(["task"], schedule="fixed"))
    ok = True
    with torch.inference_mode():
        for batch in args.batches:
            ids, mask = prompts(batch, args.prompt, device)
            alone = {n: timed(lambda m=m: hf_generate(m, ids, mask, args.new), device, args.repeats) / args.new for n, m in models.items()}
            # The fused runs and the floor take turns, so that drifts of the machine hit all alike.
            runs = {
                "floor": lambda: [bare_loop(m, ids, mask, args.new) for m in models.values()],
                "static": lambda: fused_generate(engines["static"], ids, mask, args.new),
                "dlf": lambda: fused_generate(engines["dlf"], ids, mask, args.new),
                "fixed": lambda: fused_generate(fixed, ids, mask, args.new),
            }
            medians = interleaved(runs, device, args.repeats)
            floor, static, dynamic, fixed_time = (medians[n] / args.new for n in runs)
            uncached = timed(lambda: uncached_generate(engines["dlf"], ids, args.uncached_new), device, 1) / args.uncached_new
            print(f"\nbatch {batch}: ms per generated token ({args.prompt}-token prompts, {args.new} new tokens)")
            for name, value in alone.items():
                print(f"  (a) {name:<8} alone (generate, KV cache) {value * 1e3:9.2f}")
            print(f"  (a) sum of (a)                      {sum(alone.values()) * 1e3:9.2f}")
            print(f"  (b) floor: bare cached loops, summed {floor * 1e3:8.2f}")
            print(f"  (c) dlf, static                     {static * 1e3:9.2f}   c/b = {static / floor:.3f}")
            print(f"  (d) dlf, dlf solver (default)       {dynamic * 1e3:9.2f}   d/b = {dynamic / floor:.3f}")
            print(f"      dlf, dlf solver, fixed schedule {fixed_time * 1e3:9.2f}   /b = {fixed_time / floor:.3f}")
            print(f"  (e) fused, no KV cache              {uncached * 1e3:9.2f}   e/d = {uncached / dynamic:.2f}"
                  f"  (first {args.uncached_new} tokens only: its cost grows with length)")
            print(f"      large alone vs fused: d/(a large) = {dynamic / alone['large']:.2f}")
            ok &= target(f"static_vs_floor_batch{batch}", static / floor, 1.15 if batch == 1 else 1.05)
            ok &= target(f"dlf_vs_floor_batch{batch}", dynamic / floor, 1.15 if batch == 1 else 1.10)

        ok &= host_syncs({"static": engines["static"], "dlf (fixed schedule)": fixed}, device)
        shared_base(models, args, device, dtype)
        ok &= memory(models, args, device)
        ok &= scoring(models, engines, args, device)
        if not args.skip_scoring_memory:
            ok &= scoring_memory(device)
    raise SystemExit(0 if ok else 1)


def host_syncs(engines: dict, device: str) -> bool:
    """Host syncs per decoding step (synchronising operators and copies to the host)."""
    ids, mask = prompts(8, 32, device)
    steps, ok = 16, True
    print(f"\nhost syncs per decoding step, batch 8, {steps} steps (prefill included):")
    worst = 0.0
    for name, fused in engines.items():
        with count_syncs() as syncs:
            fused_generate(fused, ids, mask, steps)
        worst = max(worst, syncs.total / steps)
        print(f"  {name:<22} {syncs.total / steps:.2f}  {dict(syncs.calls)}")
    return ok & target("host_syncs_per_decode_step", worst, 1)


def shared_base(models, args, device, dtype) -> None:
    """Four pairs on one small base: 1 + 1 + 4 forward passes per step, not 1 + 4 + 4."""
    experts = {f"expert{k}": build("small", 10 + k, device).to(dtype) for k in range(4)}
    all_models = {"large": models["large"], "small": models["small"], **experts}
    pairs = [Pair(f"task{k}", f"expert{k}", "small") for k in range(4)]
    fused = engine(all_models, pairs, ExactSolver([p.name for p in pairs]))
    batch, new = 8, 16
    ids, mask = prompts(batch, args.prompt, device)
    counter = Counter(all_models)
    try:
        fused_generate(fused, ids, mask, new)
    finally:
        counter.close()
    steps = new  # prefill + new - 1 cached steps = new forward calls per model
    per_step = {n: c / steps for n, c in counter.counts.items()}
    print(f"\nfour pairs on one small base, batch {batch}, {new} tokens: forward passes per step per model")
    print("  " + ", ".join(f"{n} {v:.0f}" for n, v in per_step.items()))
    print(f"  total per step {sum(per_step.values()):.0f} (1 large + 1 shared base + 4 experts = 6; unshared would be 9)")
    target("forward_passes_per_step_4pairs_shared_base", sum(per_step.values()), 6)
    alone = {n: timed(lambda m=m: hf_generate(m, ids, mask, new), device, 1) / new for n, m in all_models.items()}
    fused_time = timed(lambda: fused_generate(fused, ids, mask, new), device, 1) / new
    print(f"  fused {fused_time * 1e3:.2f} ms/token vs sum of the six models alone {sum(alone.values()) * 1e3:.2f}"
          f" (ratio {fused_time / sum(alone.values()):.3f})")


def memory(models, args, device) -> bool:
    """Peak memory of fused generation beside weights + KV caches, at the two largest batch sizes.

    What lies beyond weights and caches must grow like rows x models x vocabulary: it is
    printed in units of one float32 logit row per model and sequence, at both sizes.
    """
    ok = True
    weights = sum(weight_bytes(m) for m in models.values())
    fused = engine(models, [Pair("task", "expert", "small")], ExactSolver(["task"]))
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
            fused_generate(fused, ids, mask, args.new)
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
                fused_generate(fused, ids, mask, args.new)
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
    targets = ids[:, -choice:].reshape(-1, 1)

    def alone(model):
        return model(ids, logits_to_keep=choice, use_cache=False).logits.log_softmax(-1)

    runs = {"sum": lambda: [alone(m) for m in models.values()]}
    runs.update({name: (lambda e=fused: e.score(ids, positions, targets)) for name, fused in engines.items()})
    repeats = max(args.repeats, 5)
    medians = interleaved(runs, device, repeats)
    total = medians["sum"]
    print(f"\nfused scoring, batch {batch}, {context}-token contexts, {choice}-token continuations (median of {repeats})")
    ok = True
    for name in engines:
        seconds = medians[name]
        print(f"  {name:<7} {seconds * 1e3:8.1f} ms vs sum of teacher-forced passes {total * 1e3:8.1f} ms ({seconds / total:.3f})")
        ok &= target(f"scoring_{name}_vs_sum", seconds / total, 1.10)
    return ok


SCORING_VOCAB = 151_936  # Qwen2's
SCORING_MEMORY_GOAL = 1.5 * 2**30  # the default fusion_memory (1 GiB) plus the models' activations


def scoring_memory(device: str) -> bool:
    """Peak memory beyond weights of scoring every position of B rows of 2,048 tokens (a
    rolling loglikelihood) at V = 151,936, two pairs with their own small bases, dlf solver.

    Without chunks this would hold B x 2,048 x 5 models x V float32 logits: 50 GB at B = 8.
    Goal: under 1.5 GiB (the 1 GiB default fusion budget plus activations) at B = 8, and
    at B = 16 within 1.1x of that (memory does not grow with the work).
    """
    shape = dict(hidden_size=64, layers=2, heads=2, kv_heads=2, intermediate_size=128)
    names = ["large", "small1", "expert1", "small2", "expert2"]
    models = {}
    for seed, name in enumerate(names):
        model = tiny_models.make_llama(vocab_size=SCORING_VOCAB, seed=seed, max_positions=2048, **shape)
        models[name] = model.to(device).eval()
    weights = sum(weight_bytes(m) for m in models.values())
    pairs = [Pair("one", "expert1", "small1"), Pair("two", "expert2", "small2")]
    fused = engine(models, pairs, ExactSolver(["one", "two"]), vocab=SCORING_VOCAB)
    print(f"\nscoring memory: every position of B x 2,048 tokens, V = {SCORING_VOCAB:,}, 2 pairs (5 models,"
          f" weights {weights / 2**20:.0f} MiB), fusion budget {DEFAULT_FUSION_MEMORY / 2**30:.0f} GiB"
          f" = {fused.chunk_rows} positions per chunk")
    peaks = {}
    for batch in (8, 16):
        ids = torch.randint(3, SCORING_VOCAB, (batch, 2048), generator=torch.Generator().manual_seed(batch)).to(device)
        positions = torch.ones_like(ids, dtype=torch.bool, device="cpu")
        targets = ids.reshape(-1, 1)
        gc.collect()
        start = time.perf_counter()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fused.score(ids, positions, targets)
            peaks[batch] = torch.cuda.max_memory_allocated() - before
        else:
            if not rss_peak_reset():
                print("  cannot reset the peak resident size here; skipped")
                return True
            before = rss("VmRSS")
            fused.score(ids, positions, targets)
            peaks[batch] = rss("VmHWM") - before
        unchunked = batch * 2048 * len(models) * SCORING_VOCAB * 4
        print(f"  batch {batch:>2}: peak beyond weights {peaks[batch] / 2**20:7.0f} MiB in {time.perf_counter() - start:5.1f} s"
              f" (all positions' logits at once: {unchunked / 2**30:.0f} GiB)")
    ok = target("scoring_memory_batch8_gib", peaks[8] / 2**30, SCORING_MEMORY_GOAL / 2**30)
    return ok & target("scoring_memory_batch16_vs_batch8", peaks[16] / peaks[8], 1.1)


if __name__ == "__main__":
    main()
