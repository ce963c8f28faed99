"""Speculative greedy decoding in bfloat16 against plain decoding in bfloat16 and in float32, on
the toy world's tasks through lm-eval.

    python bench/speculative_dtype.py [--split dev|test] [--limit 25] [--drafts 2 3 4] [--dtype bfloat16]
                                      [--device cpu|cuda]

In float32 speculative greedy decoding gives plain decoding's tokens (tests/test_speculative.py).
In a 16-bit dtype a k-token pass over the KV cache rounds differently from k one-token steps,
so a text can part from plain decoding's wherever two tokens' fused logits lie within that
rounding of each other. This prints, per k, how many of the texts (32 tokens each, every seen
task fused with its own pair) differ from plain decoding's in the same dtype and, as the
yardstick, from plain float32 decoding's, beside plain decoding's own difference from float32;
and the share of characters before each text's first difference from float32; and how many
texts plain decoding changes between batch 1 and ``--batch`` in that dtype. No targets: it
measures.
"""

from __future__ import annotations

import argparse
import logging

from lm_eval.tasks import TaskManager

from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import load_registry
from speculative import LONG, REPO, run  # bench/ is the script's folder


def agreeing(texts: list[str], reference: list[str]) -> float:
    """Share of the reference's characters before each text's first difference from it."""
    same = 0
    for text, ref in zip(texts, reference):
        same += next((i for i, (a, b) in enumerate(zip(text, ref)) if a != b), min(len(text), len(ref)))
    return same / sum(map(len, reference))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["dev", "test"], default="test")
    ap.add_argument("--drafts", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--limit", type=int, default=25, help="questions per task")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="where every model runs (model_args placement)")
    args = ap.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    registry = load_registry("toy")
    manager = TaskManager(include_path=str(REPO / "tasks" / "toy"))
    suffix = "_dev" if args.split == "dev" else ""
    texts: dict[str, list[str]] = {}
    for pair, spec in registry.pairs.items():
        task = spec.tasks[0] + suffix
        runs = {"float32": dict(dtype="float32"), args.dtype: dict(dtype=args.dtype), "batch 1": dict(dtype=args.dtype, batch_size=1)}
        runs.update({f"{args.dtype} speculate={k}": dict(dtype=args.dtype, speculate=k) for k in args.drafts})
        for name, options in runs.items():
            lm = DLFLM(registry="toy", experts=pair, placement=args.device, **{"batch_size": args.batch, **options})
            texts.setdefault(name, []).extend(run(lm, task, manager, args.limit, LONG)[0])
    total = len(texts["float32"])
    print(f"split {args.split}, {total} texts of 32 tokens ({args.limit} per task), batch {args.batch}, device {args.device}: texts that differ")
    ones = sum(a != b for a, b in zip(texts.pop("batch 1"), texts[args.dtype]))
    print(f"  plain {args.dtype} at batch 1 against batch {args.batch}: {ones} differ")
    for name, got in texts.items():
        if name == "float32":
            continue
        same_dtype = "" if name == args.dtype else f"from plain {args.dtype} {sum(a != b for a, b in zip(got, texts[args.dtype])):3d}, "
        print(f"  {name:<22} {same_dtype:<{len(args.dtype) + 17}}from plain float32 {sum(a != b for a, b in zip(got, texts['float32'])):3d}"
              f"  (characters before the first difference from float32: {agreeing(got, texts['float32']):.2f})")


if __name__ == "__main__":
    main()
