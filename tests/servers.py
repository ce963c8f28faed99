"""Inference servers for the remote-backend tests, on 127.0.0.1 only.

``StandIn``: a small in-process server around a transformers model: OpenAI-compatible
completions answering with ``token_id:<n>`` token strings (as vLLM does with
``--return-tokens-as-token-ids``), which can also misbehave (``mode``) for the fault tests,
and TGI's ``/info`` and ``/generate`` (token ids, text prompts).

``llama_server``: llama-cpp-python's real server process serving a GGUF conversion.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

MODES = ("ok", "slow", "positive", "no-logprobs", "http-500", "flaky", "fail-later", "stops")


class StandIn:
    """Serves ``model`` (float32, CPU) as ``name`` at ``self.url`` while in a ``with`` block.

    Modes: ``ok``; ``slow`` (completions sleep ``delay`` s); ``positive`` (a log-probability
    of +0.5); ``no-logprobs`` (answers without them); ``http-500`` (every completion);
    ``flaky`` (the first two completions 503, then ok); ``fail-later`` (ok for ``after``
    completions, then positive log-probabilities); ``stops`` (every plain completion ends at
    once without a token, as llama-cpp-python's does when its own pick ends generation).
    """

    def __init__(self, model, name: str, mode: str = "ok", delay: float = 0.0, after: int = 0, tokenizer=None, api_key: str | None = None) -> None:
        assert mode in MODES
        self.api_key = api_key  # required as a bearer token when set
        self.model, self.name, self.mode, self.delay, self.after = model, name, mode, delay, after
        self.tokenizer = tokenizer  # TGI's /generate reads text
        self.completions = 0
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, payload) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _authorised(self) -> bool:
                if stand_in.api_key is None or self.headers.get("Authorization") == f"Bearer {stand_in.api_key}":
                    return True
                self._send(401, {"error": "invalid API key"})
                return False

            def do_GET(self):
                if not self._authorised():
                    return
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": stand_in.name, "object": "model"}]})
                elif self.path.rstrip("/") == "/info":  # TGI's
                    self._send(200, {"model_id": stand_in.name, "model_dtype": "torch.float32"})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                if not self._authorised():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, payload = stand_in.answer(self.path, body)
                self._send(code, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}"  # TGI's base URL
        self.url = f"{self.root}/v1"

    def __enter__(self) -> StandIn:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def generate(self, body: dict) -> tuple[int, dict]:
        """TGI's ``/generate`` (text in, token ids out; greedy, one new token)."""
        parameters = body["parameters"]
        ids = self.tokenizer(body["inputs"]).input_ids  # TGI adds the BOS itself
        with torch.no_grad():
            logprobs = self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        prefill = []
        if parameters.get("decoder_input_details"):
            prefill = [{"id": ids[0], "text": "", "logprob": None}]
            prefill += [{"id": t, "text": "", "logprob": float(logprobs[i - 1, t])} for i, t in enumerate(ids) if i]
        pick = int(logprobs[-1].argmax())
        values, top = logprobs[-1].topk(int(parameters.get("top_n_tokens") or 0))
        details = {
            "finish_reason": "length", "generated_tokens": 1, "prefill": prefill,
            "tokens": [{"id": pick, "text": "", "logprob": float(logprobs[-1, pick]), "special": False}],
            "top_tokens": [[{"id": i, "text": "", "logprob": v, "special": False} for i, v in zip(top.tolist(), values.tolist())]],
        }
        return 200, {"generated_text": "", "details": details}

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        if path.rstrip("/") == "/generate":
            return self.generate(body)
        if path.rstrip("/") != "/v1/completions":
            return 404, {"error": "not found"}
        with self.lock:
            self.completions += 1
            count = self.completions
        if self.mode == "slow":
            time.sleep(self.delay)
        if self.mode == "http-500" or (self.mode == "flaky" and count <= 2):
            return (500 if self.mode == "http-500" else 503), {"error": "the stand-in fails on purpose"}
        if body.get("model") != self.name:
            return 404, {"error": f"model {body.get('model')!r} is not served"}
        prompt = body["prompt"]
        assert isinstance(prompt, list), "the stand-in takes token ids"
        n = int(body["logprobs"])
        with torch.no_grad():
            logprobs = self.model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # [T, V]
        pick = int(logprobs[-1].argmax())
        entries = []  # (token, its logprob, top dict) per echoed/generated position
        if body.get("echo"):
            entries.append((prompt[0], None, None))
            entries += [(prompt[i], logprobs[i - 1], logprobs[i - 1]) for i in range(1, len(prompt))]
        if body.get("echo") or self.mode != "stops":
            entries.append((pick, logprobs[-1], logprobs[-1]))
        tokens, token_logprobs, tops = [], [], []
        for token, row, top_row in entries:
            tokens.append(f"token_id:{token}")
            token_logprobs.append(None if row is None else float(row[token]))
            if top_row is None:
                tops.append(None)
                continue
            values, ids = top_row.topk(min(n, top_row.shape[0]))
            tops.append({f"token_id:{i}": float(v) for i, v in zip(ids.tolist(), values.tolist())})
        if self.mode == "positive" or (self.mode == "fail-later" and count > self.after):
            token_logprobs = [None if v is None else 0.5 for v in token_logprobs]
        logprobs_field = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": [0] * len(tokens)}
        if self.mode == "no-logprobs":
            logprobs_field = None
        choice = {"index": 0, "text": "", "logprobs": logprobs_field, "finish_reason": "length"}
        return 200, {"id": f"cmpl-{count}", "object": "text_completion", "model": self.name, "choices": [choice]}


def toy_registry(folder: Path, large: dict) -> Path:
    """The toy registry (trained models: the served model's tokens are text a server can
    read back) with ``large`` as its large model's entry, written into ``folder``."""
    doc = yaml.safe_load((REPO / "registry" / "toy.yaml").read_text())
    for spec in doc["models"].values():
        if "path" in spec:
            spec["path"] = str((REPO / "registry" / spec["path"]).resolve())
    doc["models"][doc["large"]] = large
    path = folder / f"toy-{len(list(folder.glob('toy-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_server(gguf_path, alias: str, log_path):
    """llama-cpp-python's OpenAI-compatible server on 127.0.0.1, float32 KV cache (llama.cpp
    keeps it in float16 by default, which moves log-probabilities by ~5e-3), one thread."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--model_alias", alias,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512", "--n_batch", "512",
        "--n_threads", "1", "--type_k", "0", "--type_v", "0",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"llama-cpp-python's server did not start: {open(log_path).read()[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
