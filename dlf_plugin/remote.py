"""The large model behind an inference server (DESIGN.md section 9).

A registry model with ``server: {api, url, model, top_n}`` is not loaded here: a server
computes its next-token log-probabilities and returns the top ``top_n`` of them at each
position, through the OpenAI completions API (``openai-completions``: vLLM, SGLang,
llama.cpp's servers) or text-generation-inference's own (``tgi``, ``TGIClient``). The
small models stay local and give full logits. The engine fuses on the whole vocabulary with
the large model's distribution rebuilt from what the server reports (``dense``):

- reported ids keep their log-probabilities (at a scored position the server also reports the
  actual next token's, so a scored token is always known exactly);
- the mass the server did not report, r = 1 - sum of reported probabilities, is spread evenly
  over the unreported ids (the tail rule; each gets r / |U|, floored at 1e-30).

Exact when the reported ids cover the vocabulary. Otherwise, at fixed fusion weights w, with
g(v) = exp(sum_k w_k (z_Ek(v) - z_Sk(v))) and Z_K = sum over reported v of p_L(v) g(v), every
reported token's fused log-probability is off by at most

    log((Z_K + r max_U g) / (Z_K + r min_U g))

(the fused normaliser's unknown part, sum_U p_L(v) g(v), lies between r min_U g and r max_U g,
and the rule's guess does too). Solvers that choose weights from
the distributions (``dlf``) choose them on the rebuilt distribution; the bound holds at the
weights chosen.

Requests: scoring sends each row once with ``echo`` (the logprobs of every prompt token);
generation sends each row once per step with ``max_tokens: 1``. Rows go concurrently
(``concurrency``); a request that fails to connect, times out or gets a 5xx is tried again
(``retries``, with backoff); then, or on a 4xx or a malformed answer, ``ServerError`` names
the model and the server, and the run stops.

Token identity: a server answers with token strings. ``token_id:<n>`` strings (vLLM with
``--return-tokens-as-token-ids``) are exact; other strings are mapped back through the
registry's tokenizer, and a string that several ids render to (byte pieces of split UTF-8
characters, special tokens some servers render as "") cannot be placed: its mass joins the
tail. With ``prompt: text`` (llama-cpp-python's server and TGI take no token ids) the server
tokenises the decoded text itself: the text must tokenise back to the ids (fused decoding can
choose a split the tokenizer would not make; then the run stops), and dlf checks the ids the
server echoes against its own.
"""

from __future__ import annotations

import collections
import functools
import http.client
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

from dlf_plugin.backends import TOKENIZER_UNSET
from dlf_plugin.errors import DLFError
from dlf_plugin.registry import ServerSpec

# A tail token's probability is at least this (a log-probability of -69), so that KL terms
# stay finite when the reported ids carry all the mass.
TAIL_FLOOR = 1e-30
# Reported probabilities may sum past 1 by server rounding; beyond this the answer is wrong.
SUM_SLACK = 1e-3
BACKOFF_S = 0.5
# What to do when a text-only server would read other tokens than dlf means.
TEXT_ADVICE = "use prompt: tokens with a server that takes token ids"


class ServerError(DLFError, RuntimeError):
    """The server of a model is unreachable, too slow, refuses a request or answers with
    something that is not a distribution; the message names the model and the server."""


class Reported(NamedTuple):
    """What the server reported at one position: token ids and their log-probabilities."""

    ids: list[int]
    logprobs: list[float]


class TokenTable:
    """Server token strings -> ids of the registry's tokenizer."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
        texts = [tokenizer.convert_tokens_to_string([p]) if p is not None else None for p in pieces]
        counts = collections.Counter(texts)
        self.by_text = {text: i for i, text in enumerate(texts) if text is not None and counts[text] == 1}

    def id(self, key: str) -> int | None:
        """The id a server's token string stands for, or None when it cannot be told."""
        if key.startswith("token_id:"):
            try:
                value = int(key[len("token_id:") :])
            except ValueError:
                return None
            return value if 0 <= value < self.vocab_size else None
        return self.by_text.get(key)


def dense(reported: list[Reported], vocab_size: int, where: str) -> torch.Tensor:
    """``[n, V]`` float32 log-probabilities: reported ids as reported, the rest the tail rule."""
    out = torch.empty(len(reported), vocab_size, dtype=torch.float32)
    for row, (ids, logprobs) in enumerate(reported):
        values = torch.tensor(logprobs, dtype=torch.float64)
        if not bool(torch.isfinite(values).all()) or bool((values > SUM_SLACK).any()):
            raise ServerError(f"{where}: a reported log-probability is not a finite number <= 0: {logprobs[:8]}")
        known = torch.tensor(ids, dtype=torch.long)
        mass = float(values.exp().sum()) if len(ids) else 0.0
        if mass > 1 + SUM_SLACK:
            raise ServerError(f"{where}: reported probabilities sum to {mass:.6f} > 1; they are not one distribution")
        unreported = vocab_size - len(set(ids))
        tail = max(1.0 - mass, 0.0) / unreported if unreported else 0.0
        out[row].fill_(math.log(max(tail, TAIL_FLOOR)))
        out[row, known] = values.float()
    return out


class Client:
    """One OpenAI-compatible completions server: requests with retries, answers checked."""

    def __init__(self, name: str, spec: ServerSpec, tokenizer) -> None:
        self.name = name
        self.spec = spec
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)  # lowered to the common vocabulary before the first completion
        self.where = f"model {name}: server {spec.url}"
        self.requests = 0  # sent, counting retries (benchmarks read it)
        self._count = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=spec.concurrency, thread_name_prefix=f"dlf-{name}")

    @functools.cached_property
    def table(self) -> TokenTable:
        return TokenTable(self.tokenizer, self.vocab_size)

    # -- transport -------------------------------------------------------------------------

    def _call(self, path: str, body: dict | None = None) -> dict:
        url = f"{self.spec.url}/{path}"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.spec.api_key_env:
            key = os.environ.get(self.spec.api_key_env)
            if not key:
                raise ServerError(f"{self.where}: the environment variable {self.spec.api_key_env} (server.api_key_env) is not set; export the server's API key in it")
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(url, data=data, headers=headers)
        tries = self.spec.retries + 1
        for attempt in range(tries):
            with self._count:
                self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.spec.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode(errors="replace")
                if exc.code < 500 or attempt == tries - 1:
                    raise ServerError(f"{self.where}: {path} answered HTTP {exc.code}{' after ' + str(tries) + ' tries' if exc.code >= 500 else ''}: {detail}") from exc
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException) as exc:
                if attempt == tries - 1:
                    reason = getattr(exc, "reason", exc)
                    slow = isinstance(reason, (TimeoutError, socket.timeout))
                    raise ServerError(
                        f"{self.where}: {path}: {'no answer within ' + str(self.spec.timeout) + ' s' if slow else reason} "
                        f"({tries} tries); check that the server is running and reachable"
                        f"{', or raise server.timeout in the registry' if slow else ''}"
                    ) from exc
            time.sleep(BACKOFF_S * 2**attempt)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ServerError(f"{self.where}: {path} answered with something that is not JSON: {raw[:200]!r}") from exc

    def models(self) -> list[dict]:
        """The server's ``/models`` listing; fails unless it serves ``spec.model``."""
        answer = self._call("models")
        listed = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(listed, list):
            raise ServerError(f"{self.where}: /models answered without a data list: {str(answer)[:200]}")
        names = [m.get("id") for m in listed if isinstance(m, dict)]
        if self.spec.model not in names:
            raise ServerError(f"{self.where} serves {names}, not {self.spec.model!r}; set server.model to one of them")
        return listed

    def _as_text(self, tokens: list[int]) -> tuple[str, int]:
        """The text a text-only server is sent for ``tokens``, and 1 when a leading BOS is left
        for the server to add. The text must tokenise back to ``tokens`` (fused decoding can
        choose a split the tokenizer would not make), else the server would read other tokens."""
        hidden = 1 if tokens and tokens[0] == self.tokenizer.bos_token_id else 0
        text = self.tokenizer.decode(tokens[hidden:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        back = self.tokenizer(text, add_special_tokens=False).input_ids
        if back != tokens[hidden:]:
            at = next((i for i, (a, b) in enumerate(zip(back, tokens[hidden:])) if a != b), min(len(back), len(tokens) - hidden))
            raise ServerError(
                f"{self.where}: the sequence cannot be sent as text: it tokenises back differently from token {at + hidden} "
                f"on ({self.tokenizer.convert_ids_to_tokens(tokens[hidden + at : hidden + at + 3])} sent, "
                f"{self.tokenizer.convert_ids_to_tokens(back[at : at + 3])} read back); {TEXT_ADVICE}"
            )
        return text, hidden

    # -- completions -----------------------------------------------------------------------

    def _complete(self, tokens: list[int], echo: bool) -> tuple[dict, int]:
        """One completion request for ``tokens``; the answer's logprobs and how many of the
        prompt's leading tokens the server does not echo (a BOS it adds itself)."""
        prompt, hidden = (tokens, 0) if self.spec.prompt == "tokens" else self._as_text(tokens)
        body = {"model": self.spec.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": self.spec.top_n, "echo": echo}
        answer = self._call("completions", body)
        try:
            choice = answer["choices"][0]
            logprobs = choice["logprobs"]
            fields = [logprobs[k] for k in ("tokens", "token_logprobs", "top_logprobs")]
        except (KeyError, IndexError, TypeError) as exc:
            raise ServerError(f"{self.where}: completions answered without choices[0].logprobs (tokens, token_logprobs, top_logprobs): {str(answer)[:300]}") from exc
        if not all(isinstance(f, list) for f in fields) or len({len(f) for f in fields}) != 1:
            raise ServerError(f"{self.where}: completions answered logprobs lists of different lengths: {str(logprobs)[:300]}")
        return logprobs, hidden

    def _entry(self, logprobs: dict, index: int, token: int | None) -> Reported:
        """Position ``index`` of an answer as ids; ``token`` is the id it must be (None: the
        server's own pick)."""
        key, value, top = (logprobs[k][index] for k in ("tokens", "token_logprobs", "top_logprobs"))
        if not isinstance(top, dict) or not isinstance(value, (int, float)):
            raise ServerError(f"{self.where}: no logprobs at a position dlf needs (token {key!r}: {value!r}, top {str(top)[:100]})")
        seen = self.table.id(key) if isinstance(key, str) else None
        if token is not None and seen is not None and seen != token:
            raise ServerError(
                f"{self.where}: the server read token {key!r} (id {seen}) where dlf sent id {token} "
                f"({self.tokenizer.convert_ids_to_tokens(token)!r}); with prompt: text the server must tokenise "
                f"as the registry's tokenizer does: {TEXT_ADVICE}"
            )
        found = {}
        for name, logprob in top.items():
            i = self.table.id(name)
            if i is not None:
                found[i] = logprob
        pick = token if token is not None else seen
        if pick is not None:
            found[pick] = value
        return self._reported(found, top)

    def _reported(self, found: dict, shown) -> Reported:
        """``found`` (id -> log-probability from the answer ``shown``) once every value is a number."""
        if not all(isinstance(v, (int, float)) for v in found.values()):
            raise ServerError(f"{self.where}: a top logprob is not a number: {str(shown)[:200]}")
        return Reported(list(found), [float(v) for v in found.values()])

    def scored(self, tokens: list[int], first: int) -> list[Reported]:
        """The distributions predicting ``tokens[i]`` for ``i >= first`` (``first >= 1``)."""
        logprobs, hidden = self._complete(tokens, echo=True)
        echoed = len(tokens) - hidden
        if len(logprobs["tokens"]) not in (echoed, echoed + 1):  # the prompt, then at most one generated token
            raise ServerError(
                f"{self.where}: echoed {len(logprobs['tokens'])} tokens for a prompt dlf tokenised into {echoed}"
                f"{' (after the BOS the server adds)' if hidden else ''}; with prompt: text the server must tokenise "
                f"as the registry's tokenizer does: {TEXT_ADVICE}"
            )
        return [self._entry(logprobs, i - hidden, tokens[i]) for i in range(first, len(tokens))]

    def next(self, tokens: list[int]) -> Reported:
        """The distribution of the token after ``tokens``."""
        logprobs, _ = self._complete(tokens, echo=False)
        if logprobs["tokens"]:
            return self._entry(logprobs, 0, None)
        # No token came back: the server's own pick ended generation (llama-cpp-python then
        # drops the step's logprobs). Read the position by echo behind one more token instead.
        return self.scored([*tokens, self.tokenizer.eos_token_id], len(tokens))[0]

    def map(self, function, jobs: list) -> list:
        """``function(*job)`` for every job, ``concurrency`` at a time, in order."""
        return list(self.pool.map(lambda job: function(*job), jobs))


class TGIClient(Client):
    """text-generation-inference's own API: ``/info`` names the model, ``/generate`` with
    ``details`` answers token ids. Prompts go as text (its only input); the prefill details
    give only each prompt token's own log-probability (no top tokens at prompt positions), so
    a scored position's support is its actual token, the rest the tail rule; a generation step
    gets the top ``top_n`` (TGI's ``--max-top-n-tokens``, 5 by default, caps it)."""

    def models(self) -> list[dict]:
        info = self._call("info")
        if not isinstance(info, dict) or info.get("model_id") != self.spec.model:
            served = info.get("model_id") if isinstance(info, dict) else info
            raise ServerError(f"{self.where} serves {[served]}, not {self.spec.model!r}; set server.model to one of them")
        return [{"id": self.spec.model, **info}]

    def _generate(self, tokens: list[int], prefill: bool) -> tuple[dict, int]:
        text, hidden = self._as_text(tokens)
        parameters = {"max_new_tokens": 1, "details": True, "decoder_input_details": prefill, "top_n_tokens": self.spec.top_n, "do_sample": False}
        answer = self._call("generate", {"inputs": text, "parameters": parameters})
        details = answer.get("details") if isinstance(answer, dict) else None
        if not isinstance(details, dict) or not isinstance(details.get("prefill"), list) or not isinstance(details.get("tokens"), list):
            raise ServerError(f"{self.where}: generate answered without details (prefill, tokens): {str(answer)[:300]}")
        return details, hidden

    def scored(self, tokens: list[int], first: int) -> list[Reported]:
        details, hidden = self._generate(tokens, prefill=True)
        prefill = details["prefill"]
        offset = len(prefill) - (len(tokens) - hidden)  # 1 where TGI lists the BOS it added
        if offset not in (0, 1) or [t.get("id") for t in prefill[offset:]] != tokens[hidden:]:
            raise ServerError(
                f"{self.where}: the server read other token ids than dlf sent ({[t.get('id') for t in prefill][:12]}... "
                f"for {tokens[:12]}...); TGI tokenises the text itself and must use the registry's tokenizer"
            )
        out = []
        for i in range(first, len(tokens)):
            value = prefill[i - hidden + offset].get("logprob")
            if not isinstance(value, (int, float)):
                raise ServerError(f"{self.where}: no logprob for prompt token {i} (got {value!r})")
            out.append(Reported([tokens[i]], [float(value)]))
        return out

    def next(self, tokens: list[int]) -> Reported:
        details, _ = self._generate(tokens, prefill=False)
        top = details.get("top_tokens")
        if not details["tokens"] or not isinstance(top, list) or not top or not isinstance(top[0], list):
            raise ServerError(f"{self.where}: generate answered no token or no top_tokens: {str(details)[:300]}")
        found = {t.get("id"): t.get("logprob") for t in [*top[0], details["tokens"][0]] if isinstance(t, dict)}
        if not all(isinstance(i, int) and 0 <= i for i in found):
            raise ServerError(f"{self.where}: a token id is not a whole number: {str(top[0])[:200]}")
        return self._reported({i: v for i, v in found.items() if i < self.vocab_size}, top[0])


def client(name: str, spec: ServerSpec, tokenizer) -> Client:
    """The client for ``spec.api``."""
    return (TGIClient if spec.api == "tgi" else Client)(name, spec, tokenizer)


class RemoteCache:
    """A server keeps no state between requests: the cache is each row's tokens so far, and
    which rows have stopped (set by the engine; they are not asked again)."""

    def __init__(self, batch: int) -> None:
        self.rows: list[list[int]] = [[] for _ in range(batch)]
        self.finished = [False] * batch


class RemoteModel:
    """The engine's interface to a large model behind a server (``dlf_plugin.backends``).

    ``hidden`` and ``scored_at`` return log-probabilities ``[.., V]`` rebuilt by ``dense``;
    ``logits`` passes them on.
    """

    remote = True
    head_mode = "server"
    static_cache = False

    def __init__(self, client: Client, device: torch.device) -> None:
        self.name = client.name
        self.client = client
        self.vocab_size = client.vocab_size
        self.device = device

    def context_length(self, tokenizer=None) -> int | None:
        limit = getattr(tokenizer, "model_max_length", None)
        return limit if isinstance(limit, int) and 0 < limit < TOKENIZER_UNSET else None

    def new_cache(self, batch: int, length: int, preallocated: bool = True) -> RemoteCache:
        return RemoteCache(batch)

    def _dense(self, reported: list[Reported]) -> torch.Tensor:
        return dense(reported, self.vocab_size, self.client.where).to(self.device)

    def hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None, last: int | None = None) -> torch.Tensor:
        """Decoding: the next-token distribution of each row, ``[B, 1, V]``, after the columns
        of ``input_ids`` its ``attention_mask`` keeps are appended to the row in ``cache``
        (the last position's only, whatever ``last``)."""
        if not isinstance(cache, RemoteCache):
            raise TypeError("a model behind a server decodes with its RemoteCache; scoring goes through scored_at")
        ids = input_ids.tolist()
        keep = attention_mask[:, -input_ids.shape[1] :].bool().tolist()
        for row, tokens, kept in zip(cache.rows, ids, keep):
            row.extend(t for t, k in zip(tokens, kept) if k)
        running = [row for row, done in zip(cache.rows, cache.finished) if not done]
        answers = iter(self.client.map(self.client.next, [(row,) for row in running]))
        # A stopped row's distribution is never fused: uniform stands in.
        return self._dense([Reported([], []) if done else next(answers) for done in cache.finished]).unsqueeze(1)

    def scored_at(self, input_ids: torch.Tensor, asked: torch.Tensor, follow: list[int]) -> torch.Tensor:
        """``[M, V]`` at the True ``asked`` positions of right-padded rows, row-major; ``follow``
        is each row's token after its last asked position (-1: unknown)."""
        jobs, ids = [], input_ids.tolist()
        for row, (tokens, cols) in enumerate(zip(ids, asked.tolist())):
            where = [c for c, wanted in enumerate(cols) if wanted]
            if not where:
                continue
            after = follow[row] if follow[row] >= 0 else self.client.tokenizer.eos_token_id
            sequence = tokens[: where[-1] + 1] + [after]
            jobs.append((sequence, where[0] + 1, [c - where[0] for c in where]))
        answers = self.client.map(lambda seq, first, _: self.client.scored(seq, first), jobs)
        return self._dense([answer[i] for answer, (_, _, picks) in zip(answers, jobs) for i in picks])

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return hidden if out is None else out.copy_(hidden)

    def check_head(self, probe: torch.Tensor) -> None:
        """One scoring request for ``probe`` ``[1, T]`` before any real one: the server
        answers, reads the tokens dlf sent, and gives distributions (``ServerError`` if not)."""
        asked = torch.zeros(probe.shape, dtype=torch.bool)
        asked[:, 1:] = True
        self.scored_at(probe, asked, [-1])
