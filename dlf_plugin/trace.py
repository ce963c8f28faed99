"""Per-token traces of fusion weights (model_args ``trace=PATH``) and their plot.

Each line of the JSONL file is one fused position::

    {"kind": "generate", "request": 3, "position": 0, "token": 417, "text": " Os",
     "weights": {"gsm8k-7b": 0.83, "triviaqa-7b": 0.0}, "loss": 0.0012}

``kind`` is ``generate`` (a generated token) or ``score`` (a scored continuation
token); ``request`` numbers the prompts in the order dlf processed them (lm-eval sorts
requests by length), and a request's first line also carries its ``prompt`` text;
``loss`` is the DLF objective at the weights used. ``dlf-trace-plot`` draws the weights over one
generation, as in the paper's case study.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dlf_plugin.errors import DLFError


class TraceNotWritten(DLFError, OSError):
    """The trace file could not be written completely."""


class TraceWriter:
    """Appends trace lines to ``path`` (truncated when the model is built)."""

    def __init__(self, path: str | Path, decode) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self.decode = decode
        self.requests = 0

    def new_requests(self, count: int) -> list[int]:
        ids = list(range(self.requests, self.requests + count))
        self.requests += count
        return ids

    def write(self, kind, requests, positions, tokens, weights, losses, pairs, prompts=None, drafted=None) -> None:
        """One line per fused position: ``weights [n, P]`` and ``losses [n]`` (None: no pairs,
        loss 0) tensors; ``prompts``, if given, adds each row's prompt text (dlf gives it on a
        request's first line); ``drafted``, if given (speculative decoding), whether each token
        was a draft the fusion accepted (false: the fused token at a disagreement)."""
        weights = weights.tolist()
        losses = losses.tolist() if losses is not None else [0.0] * len(weights)
        lines = []
        for row, (request, position, token) in enumerate(zip(requests, positions, tokens)):
            record = {
                "kind": kind,
                "request": request,
                "position": position,
                "token": token,
                "text": self.decode([token]),
                "weights": dict(zip(pairs, weights[row])),
                "loss": losses[row],
            }
            if prompts is not None and prompts[row] is not None:
                record["prompt"] = prompts[row]
            if drafted is not None:
                record["drafted"] = drafted[row]
            lines.append(json.dumps(record) + "\n")
        data = memoryview("".join(lines).encode())
        with self.path.open("ab", buffering=0) as handle:
            start = handle.tell()
            try:
                while data:
                    data = data[handle.write(data):]
            except OSError as exc:  # no half-written batch: cut the file back, then stop
                os.ftruncate(handle.fileno(), start)
                raise TraceNotWritten(f"model_args trace={str(self.path)!r}: the trace could not be written ({exc!r})") from exc


def read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot(records: list[dict], request: int, out: str | Path, kind: str = "generate") -> Path:
    """Render the weights of one request's tokens to a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in records if r["request"] == request and r["kind"] == kind), key=lambda r: r["position"])
    if not rows:
        available = sorted({r["request"] for r in records if r["kind"] == kind})
        raise SystemExit(f"no {kind} trace for request {request}; requests in the file: {available[:20]}")
    pairs = list(rows[0]["weights"])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 3.2))
    for pair in pairs:
        ax.plot([r["position"] for r in rows], [r["weights"][pair] for r in rows], marker="o", label=pair)
    ax.set_xticks([r["position"] for r in rows])
    ax.set_xticklabels([repr(r["text"])[1:-1] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("fusion weight")
    ax.set_title(f"dlf weights per token, request {request}")
    if pairs:
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dlf-trace-plot", description="Plot dlf fusion weights over one generation.")
    parser.add_argument("trace", help="JSONL file written with model_args trace=PATH")
    parser.add_argument("--request", type=int, default=0, help="which request (default 0)")
    parser.add_argument("--kind", choices=["generate", "score"], default="generate")
    parser.add_argument("--out", default=None, help="PNG path (default: TRACE-requestN.png)")
    args = parser.parse_args(argv)
    if not Path(args.trace).is_file():
        parser.error(f"trace file {args.trace} does not exist")
    out = args.out or str(Path(args.trace).with_suffix("")) + f"-request{args.request}.png"
    print(plot(read(args.trace), args.request, out, args.kind))

