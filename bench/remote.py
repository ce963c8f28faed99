"""The large model behind a server against the local backend, on the toy world through lm-eval.

    python bench/remote.py [--limit 40] [--top-n 5 20 100 2048] [--batch 8]

Backends: ``local`` (the toy large base in this process), ``openai`` (the same model behind
tests/servers.py's stand-in OpenAI-completions server, token-id prompts, ``token_id:``
answers), ``tgi`` (the stand-in's TGI ``/generate``: text prompts, ids, no top tokens at
prompt positions) and ``llama.cpp`` (llama-cpp-python's server on a float32 GGUF conversion,
text prompts). Fused with the qa and fill pairs, solver dlf, on the test kingdoms: toy_qa and
toy_fill generate (until a newline), toy_mc scores four choices. A text-prompt backend stops
where fused decoding chooses a split the tokenizer would not make; its row says so.

Per backend and top_n: requests per generated token (the generation tasks' requests over
their generated tokens, each answer's tokens plus its stop), wall seconds per generated
token, and agreement with the local backend: generations equal, toy_mc loglikelihoods'
mean and largest difference, toy_mc answers (argmax) equal.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the stand-in server and the llama.cpp launcher

from dlf_plugin import tiny_models  # noqa: E402
from dlf_plugin.lm import DLFLM  # noqa: E402
from dlf_plugin.remote import ServerError  # noqa: E402
from servers import StandIn, llama_server, toy_registry  # noqa: E402

LARGE = REPO / "models" / "toy" / "large-base"
GENERATE, SCORE = ("toy_qa", "toy_fill"), "toy_mc"


def evaluate(lm: DLFLM, limit: int, manager) -> dict:
    """Generated texts, seconds and requests of the generation tasks; toy_mc's loglikelihoods."""
    client = getattr(lm.engine.models[lm.registry.large], "client", None)
    before = client.requests if client else 0
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(GENERATE), task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - start
    texts = [s["resps"][0][0] for task in GENERATE for s in out["samples"][task]]
    requests = (client.requests - before) if client else 0
    scored = lm_eval.simple_evaluate(model=lm, tasks=[SCORE], task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0)
    choices = [[float(r[0][0]) for r in s["resps"]] for s in scored["samples"][SCORE]]
    tokens = sum(len(lm.tokenizer(t, add_special_tokens=False).input_ids) + 1 for t in texts)
    return {"texts": texts, "seconds": seconds, "requests": requests, "tokens": tokens, "choices": choices}


def compare(name: str, top_n, got: dict, local: dict) -> str:
    same = statistics.mean(a == b for a, b in zip(got["texts"], local["texts"]))
    diffs = [abs(a - b) for x, y in zip(got["choices"], local["choices"]) for a, b in zip(x, y)]
    argmax = statistics.mean(x.index(max(x)) == y.index(max(y)) for x, y in zip(got["choices"], local["choices"]))
    per_token = got["seconds"] / got["tokens"] * 1000
    requests = got["requests"] / got["tokens"] if got["requests"] else 0.0
    return (f"{name:<10} {str(top_n):>6} {requests:>10.2f} {per_token:>10.1f} {same * 100:>9.1f}% "
            f"{statistics.mean(diffs):>11.5f} {max(diffs):>10.5f} {argmax * 100:>9.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--top-n", type=int, nargs="+", default=[5, 20, 100, 2048])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    manager = TaskManager(include_path=str(REPO / "tasks" / "toy"))
    options = dict(experts="qa+fill", solver="dlf", route="task", batch_size=str(args.batch))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        local_lm = DLFLM(registry=str(toy_registry(folder, {"path": str(LARGE)})), **options)
        local = evaluate(local_lm, args.limit, manager)
        standin_model = local_lm.loaded[local_lm.registry.large].model
        rows = [compare("local", "-", local, local)]
        gguf = tiny_models.save_gguf(LARGE, folder / "large-base.gguf")
        with StandIn(standin_model, "toy-large", tokenizer=local_lm.tokenizer) as standin, llama_server(gguf, "toy-large", folder / "server.log") as llama_url:
            servers = {
                "openai": (standin.url, "openai-completions", "tokens"),
                "tgi": (standin.root, "tgi", "text"),
                "llama.cpp": (llama_url, "openai-completions", "text"),
            }
            for top_n in args.top_n:
                for name, (url, api, prompt) in servers.items():
                    server = {"api": api, "url": url, "model": "toy-large", "top_n": top_n, "prompt": prompt}
                    lm = DLFLM(registry=str(toy_registry(folder, {"server": server, "tokenizer": str(LARGE)})), **options)
                    try:
                        rows.append(compare(name, top_n, evaluate(lm, args.limit, manager), local))
                    except ServerError as exc:
                        rows.append(f"{name:<10} {top_n:>6} stopped: {str(exc).split(': ', 2)[-1][:150]}")
                    print(rows[-1], flush=True)
    print(f"\n{args.limit} documents per task, batch {args.batch}, CPU; generation: {', '.join(GENERATE)}; scoring: {SCORE}")
    print(f"{'backend':<10} {'top_n':>6} {'req/token':>10} {'ms/token':>10} {'same gen':>10} {'mean |dLL|':>11} {'max |dLL|':>10} {'same pick':>10}")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
