"""Speculative fused decoding against plain fused decoding and the large model alone, on the
toy world's tasks through lm-eval.

    python bench/speculative.py [--split dev|test] [--drafts 2 3 4 6] [--lookups 0 8] [--confidences 0 0.3]
                                [--batches 1 8] [--limit 100] [--long] [--device cpu|cuda] [--temperature T]
                                [--histories 0 1] [--chosen 1:6,4,0.2 8:3,4,0,1]

Each seen task is fused with its own pair (its expert drafts). Per batch size and
configuration (k = ``speculate``, each with every ``lookup`` n of ``--lookups`` (0: off) and
every ``draft_confidence`` c of ``--confidences`` (0: off; only with k > 1) and every
``lookup_history`` h of ``--histories`` (0: off, 1: on; only with n > 0)): the
drafts accepted, large-model forward passes per generated token (prefill included, counted
by a hook on the large model's body), and wall time per generated token against plain fused
decoding and against the large model alone (lm-eval's HFLM), timed in turns in one process.
Every greedy speculative run's texts are compared with plain decoding's (a target counts those
unlike). The best configuration is chosen on ``--split dev`` (the fastest at each batch size);
``--split test`` only reports: its targets are, per batch size, the configuration
``--chosen`` names for it (``BATCH:K,N,C[,H]``, chosen on dev), else the first of ``--drafts``,
``--lookups``, ``--confidences`` and ``--histories``; the others are shown beside it.
``--temperature T`` (with ``--long``) samples instead: texts differ from plain decoding's and
are not compared (tests/test_speculative.py checks the distribution); times per token still
divide by the speculative runs' token count, 32 per prompt unless a row draws EOS.

After the timed runs, one more run of each, timed call by call, says where the time goes per
generated token: the drafting expert's forward calls, the large model's, the small base's,
the heads, the solver with the fusion, and the rest (on CUDA each call is synchronised, so
these runs are kept apart from the timed ones).
"""

from __future__ import annotations

import argparse
import collections
import logging
import statistics
import time
from pathlib import Path

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from decode import target  # bench/ is the script's folder
from dlf_plugin.engine import LookupHistory
from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import load_registry

REPO = Path(__file__).resolve().parent.parent


# --long: the same prompts generating 32 tokens, past the answer's line (the tasks stop at
# "\n" after 1-4 tokens, too few for drafts to save passes: the first token of each request
# comes from its prefill).
LONG = {"until": ["<never>"], "max_gen_toks": 32}


def run(lm, task: str, manager, limit, gen_kwargs=None) -> tuple[list[str], float]:
    """The task's generated texts and the seconds lm-eval took. A ``lookup_history`` starts
    empty, as in a fresh run: the last repeat's generations of the same requests would be
    perfect copies."""
    if getattr(lm, "lookup_history", None) is not None:
        lm.lookup_history = LookupHistory()
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=True,
                                  bootstrap_iters=0, gen_kwargs=gen_kwargs)
    seconds = time.perf_counter() - start
    return [s["resps"][0][0] for s in out["samples"][task]], seconds


class Passes:
    """Forward calls of one model's body."""

    def __init__(self, model) -> None:
        self.count = 0
        model.base_model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1


class Clock:
    """Seconds spent in wrapped calls, by part; CUDA is synchronised around each call."""

    def __init__(self, device: str) -> None:
        self.seconds = collections.Counter()
        self.cuda = device.startswith("cuda")

    def wrap(self, obj, attr: str, part: str) -> None:
        inner = getattr(obj, attr)

        def timed(*a, **kw):
            if self.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = inner(*a, **kw)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[part] += time.perf_counter() - start
            return out

        setattr(obj, attr, timed)


def label(config) -> str:
    """How a run is named: plain fused, or its model_args speculate, lookup, draft_confidence
    and lookup_history."""
    if not config:
        return "plain fused"
    k, n, c, h = config
    return f"speculate={k}" + (f",lookup={n}" if n else "") + (f",draft_confidence={c:g}" if c else "") + (",lookup_history=true" if h else "")


PARTS = ("drafter", "large", "small base", "heads", "solver+fusion")


def parts(lm, task: str, manager, limit, gen_kwargs, device: str, pair) -> collections.Counter:
    """Seconds per part of one more run of ``task`` (``PARTS``, "rest" and "total")."""
    engine, clock = lm.engine, Clock(device)
    for name, model in engine.models.items():
        clock.wrap(model, "hidden", "drafter" if name == pair.expert else "large" if name == engine.large else "small base")
    clock.wrap(engine, "_logits", "heads")
    clock.wrap(engine, "_fuse_rows", "solver+fusion")
    clock.wrap(engine, "generate_speculative" if lm.round_width > 1 else "generate", "total")
    run(lm, task, manager, limit, gen_kwargs)
    clock.seconds["rest"] = clock.seconds["total"] - sum(clock.seconds[p] for p in PARTS)
    return clock.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["dev", "test"], default="test")
    ap.add_argument("--drafts", type=int, nargs="+", default=[3])
    ap.add_argument("--lookups", type=int, nargs="+", default=[0], help="model_args lookup values, each with every k")
    ap.add_argument("--confidences", type=float, nargs="+", default=[0.0], help="model_args draft_confidence values, each with every k > 1 and n")
    ap.add_argument("--histories", type=int, nargs="+", choices=[0, 1], default=[0], help="model_args lookup_history off (0) or on (1), each with every n > 0")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--limit", type=int, default=100, help="questions per task")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", action="store_true", help="generate 32 tokens per prompt instead of the answer's line")
    ap.add_argument("--device", default="cpu", help="where every model runs (model_args placement; hf's device)")
    ap.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (with --long); 0: greedy")
    ap.add_argument("--chosen", nargs="+", default=[], metavar="BATCH:K,N,C[,H]",
                    help="--split test: the configuration chosen on dev for a batch size (speculate, lookup, draft_confidence, lookup_history 0 or 1), measured first and judged by the targets")
    args = ap.parse_args()
    chosen = {}
    for given in args.chosen:
        try:
            batch, config = given.split(":")
            k, n, c, *h = config.split(",")
            chosen[int(batch)] = (int(k), int(n), float(c), int(*h or [0]))
        except (ValueError, TypeError):
            ap.error(f"--chosen {given!r}: write BATCH:K,N,C[,H], e.g. 1:6,4,0.2 or 8:3,4,0,1")
    if chosen and (args.split != "test" or set(chosen) - set(args.batches)):
        ap.error("--chosen names the configurations chosen on dev, for --split test and batch sizes of --batches")
    if args.temperature and not args.long:
        ap.error("--temperature needs --long (sampled answer lines end at different lengths)")
    gen_kwargs = {**LONG, **({"do_sample": True, "temperature": args.temperature} if args.temperature else {})} if args.long else None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # (speculate, lookup, draft_confidence, lookup_history); a confidence needs the expert to
    # draft (k > 1), a history copies (n > 0)
    configs = [(k, n, c, h) for k in args.drafts for n in args.lookups for c in args.confidences for h in args.histories
               if (k > 1 or not c) and (n or not h)]
    torch.manual_seed(0)
    registry = load_registry("toy")
    manager = TaskManager(include_path=str(REPO / "tasks" / "toy"))
    suffix = "_dev" if args.split == "dev" else ""
    tasks = {pair: spec.tasks[0] + suffix for pair, spec in registry.pairs.items()}
    print(f"split {args.split}, {'32 tokens' if args.long else 'the answer line'} per prompt{f', sampled at temperature {args.temperature}' if args.temperature else ''}, {args.limit} questions per task, tasks {', '.join(tasks.values())}, torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    ok = True
    best = {}
    differing = collections.Counter()  # greedy speculative texts unlike plain decoding's, per batch size
    first = {}  # per batch size: the configuration the targets judge on test
    for batch in args.batches:
        configs_here = ([chosen[batch]] if batch in chosen else []) + [c for c in configs if c != chosen.get(batch)]
        first[batch] = configs_here[0]
        large = HFLM(pretrained=registry.models[registry.large].location, device=args.device, dtype="float32", batch_size=batch)
        rows, spent = {}, {k: collections.Counter() for k in [0, *configs_here]}
        for pair, task in tasks.items():
            lms = {0: DLFLM(registry="toy", experts=pair, batch_size=batch, placement=args.device)}
            lms.update({(k, n, c, h): DLFLM(registry="toy", experts=pair, batch_size=batch, placement=args.device, speculate=k, lookup=n,
                                            draft_confidence=c, lookup_history=bool(h))
                        for k, n, c, h in configs_here})
            counters = {k: Passes(lm.engine.models[registry.large].model) for k, lm in lms.items()}
            # The large model's prefill passes of the last repeat: one per plain generate call;
            # speculating, one per group of batch-size prompts (rows refill, up to 8 groups a call).
            calls = dict.fromkeys(lms, 0)
            for k, lm in lms.items():
                name = "generate_speculative" if k else "generate"
                engine, generate = lm.engine, getattr(lm.engine, name)

                def counted(*a, generate=generate, k=k, engine=engine, **kw):
                    out = generate(*a, **kw)
                    calls[k] += engine.speculation["prefills"] if k else 1
                    return out

                setattr(engine, name, counted)
            times = {k: [] for k in lms} | {"large": []}
            texts = {}
            for _ in range(args.repeats):  # in turns, so that drifts of the machine hit all alike
                for k, lm in lms.items():
                    counters[k].count = calls[k] = 0
                    texts[k], seconds = run(lm, task, manager, args.limit, gen_kwargs)
                    times[k].append(seconds)
                _, seconds = run(large, task, manager, args.limit, gen_kwargs)
                times["large"].append(seconds)
            # What speculation did over every repeat (the results' config.dlf.speculation).
            stats = {k: lms[k].get_model_info()["dlf"]["speculation"] for k in configs_here}
            if not args.temperature:  # greedy: the same texts as plain decoding (reported, not asserted: a run goes on)
                for k in configs_here:
                    differing[batch] += sum(a != b for a, b in zip(texts[k], texts[0]))
            # Tokens per run: the speculative engine counts them (the same tokens as plain).
            tokens = stats[first[batch]]["tokens"] / args.repeats
            per = {k: statistics.median(t) / tokens for k, t in times.items()}
            # Large passes per token: all of them (a prefill per batch included), and in the
            # decoding phase only (rounds or steps after each request's first token).
            # Per sequence: against plain fused decoding, which makes one pass per token and
            # sequence (a batched pass serves every row of its batch); at batch 1, per token.
            rows[task] = (tokens, per, {k: counters[k].count / counters[0].count for k in lms},
                          {k: stats[k]["accepted"] / max(1, stats[k]["drafted"]) for k in configs_here},
                          {k: (counters[k].count - calls[k]) / (counters[0].count - calls[0]) for k in lms},
                          {k: (counters[k].count, calls[k]) for k in lms},
                          {k: stats[k]["lookup_rounds"] / max(1, stats[k]["rounds"]) for k in configs_here}, stats)
            # After the counts above are taken: the run below counts tokens and passes too.
            for k, lm in lms.items():
                spent[k].update(parts(lm, task, manager, args.limit, gen_kwargs, args.device, registry.pairs[pair]))
        print(f"\nbatch {batch}: ms per generated token (lm-eval end to end); large-model passes per token and sequence (plain "
              "fused decoding: 1), in all and after each request's first token (its prefill's); drafts accepted")
        for task, (tokens, per, passes, accept, decoding, _, lookups, stats) in rows.items():
            print(f"  {task:<14} {tokens:6.0f} tokens  plain fused {per[0] * 1e3:6.2f}  large alone {per['large'] * 1e3:6.2f}  "
                  f"large passes {passes[0]:.2f} ({decoding[0]:.2f} after the first)")
            for k in configs_here:
                print(f"      {label(k)}: {per[k] * 1e3:6.2f} ms ({per[k] / per[0]:.2f}x plain, {per[k] / per['large']:.2f}x large alone), "
                      f"large passes {passes[k]:.2f} ({decoding[k]:.2f} after the first), {100 * accept[k]:.0f}% of drafts accepted"
                      + (f", {100 * lookups[k]:.0f}% of rounds drafted by lookup alone, {100 * stats[k]['copied'] / max(1, stats[k]['drafted']):.0f}% of drafts copied" if k[1] else "")
                      + (f" ({100 * stats[k]['pooled'] / max(1, stats[k]['drafted']):.0f}% from earlier requests)" if k[3] else ""))
        for k in configs_here:
            passes = sum(r[5][k][0] for r in rows.values()) / sum(r[5][0][0] for r in rows.values())
            after_first = sum(r[5][k][0] - r[5][k][1] for r in rows.values()) / sum(r[5][0][0] - r[5][0][1] for r in rows.values())
            ratio = sum(r[0] * r[1][k] for r in rows.values()) / sum(r[0] * r[1][0] for r in rows.values())
            vs_large = sum(r[0] * r[1][k] for r in rows.values()) / sum(r[0] * r[1]["large"] for r in rows.values())
            print(f"  all tasks, {label(k)}: {ratio:.3f}x plain fused, {vs_large:.3f}x large alone, {passes:.3f} large passes "
                  f"per token and sequence ({after_first:.3f} after each request's first token)")
            best.setdefault(batch, {})[k] = (passes, ratio, after_first)
        tokens = sum(r[0] for r in rows.values())
        wide = max(len(label(k)) for k in spent)
        print(f"  where the time goes, ms per generated token (one more run of each, timed call by call):\n"
              f"  {'':<{wide}}" + "".join(f"{p:>15}" for p in (*PARTS, "rest", "total")))
        for k, seconds in spent.items():
            print(f"  {label(k):<{wide}}" + "".join(f"{seconds[p] / tokens * 1e3:15.2f}" for p in (*PARTS, "rest", "total")))
        forwards = {k: sum(seconds[p] for p in PARTS[:3]) for k, seconds in spent.items()}
        for k in configs_here:
            print(f"  {label(k)}: the models' forward calls alone take {forwards[k] / forwards[0]:.2f}x plain fused's: the time "
                  "ratio if the heads, the solver and the rest cost nothing")
    sampled = f"_sampled_t{args.temperature:g}" if args.temperature else ""  # the targets are greedy's
    if not args.temperature:
        for batch in args.batches:
            ok &= target(f"speculative_texts_unlike_plain_batch{batch}", differing[batch], 0)
    for batch, by_k in best.items():
        k = min(by_k, key=lambda k: by_k[k][1]) if args.split == "dev" else first[batch]
        print(f"\nbatch {batch}: {'fastest' if args.split == 'dev' else 'chosen on dev'}: {label(k)}")
        ok &= target(f"speculative_large_passes_per_token_batch{batch}{sampled}", by_k[k][0], 0.5)
        print(f"  (decoding phase only, after each request's first token: {by_k[k][2]:.3f})")
        if batch == 1:
            ok &= target(f"speculative_vs_plain_batch1{sampled}", by_k[k][1], 0.7)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
