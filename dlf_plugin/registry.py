"""YAML registry -> validated, typed description of models and expert pairs.

Pure Python (PyYAML only, no torch): a registry is read and checked completely
before any model is loaded, so every mistake in it surfaces at once, with the
file and the key named.

A registry file looks like::

    name: toy                       # required
    description: ...                # optional
    defaults:                       # optional; model_args may override dtype
      dtype: float32                # auto | float32 | float16 | bfloat16
      device: cpu                   # or device_map: auto; used where a model sets neither
    models:
      large-base: {path: ../models/toy/large-base}     # local dir, relative to this file
      small-base: {hub: org/name, revision: abc123}    # a hub id (revision: branch, tag, sha)
      gsm8k-expert:
        placeholder: "unpublished; fine-tune ... and put its path here"
    large: large-base
    pairs:
      gsm8k: {expert: gsm8k-expert, base: small-base, tasks: [gsm8k], chat_template: false}

A model may instead be a task-arithmetic merge of local checkpoints of one shape,
``base + sum_i w_i (model_i - base)``, built at load time (``dlf_plugin.merging``)::

      ta-expert:
        merge: {base: small-base, models: {gsm8k-expert: 0.5, mmlu-expert: 0.5}}

The large model may instead be served by an inference server (``dlf_plugin.remote``); its
tokenizer is read here::

      large-base:
        server: {api: openai-completions, url: "http://127.0.0.1:8000/v1", model: name, top_n: 20}
        tokenizer: ../tokenizers/large-base

Per model, besides exactly one of ``path``/``hub``/``placeholder``/``merge``/``server``: ``revision``,
``tokenizer`` (a path or hub id when the tokenizer lives elsewhere), ``dtype``,
``device`` or ``device_map`` (not both), ``allow_pickle`` (default false: only
safetensors weights load), ``trust_remote_code`` (default false) and ``check_weights``
(default true: every weight is checked for NaN and infinity at load).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import yaml

from dlf_plugin.errors import DLFError
from dlf_plugin.resources import data_root

DTYPES = ("auto", "float32", "float16", "bfloat16")

_TOP_KEYS = {"name", "description", "defaults", "models", "large", "pairs"}
_DEFAULT_KEYS = {"dtype", "device", "device_map"}
_MODEL_KEYS = {
    "path",
    "hub",
    "placeholder",
    "revision",
    "tokenizer",
    "dtype",
    "device",
    "device_map",
    "allow_pickle",
    "trust_remote_code",
    "check_weights",
    "merge",
    "server",
    "note",
}
_MERGE_KEYS = {"base", "models"}
_SERVER_KEYS = {"api", "url", "model", "top_n", "prompt", "timeout", "retries", "concurrency", "api_key_env"}
SERVER_APIS = ("openai-completions", "tgi")
SERVER_PROMPTS = ("tokens", "text")
# Entries that set how a model is loaded here, meaningless for a model behind a server.
_LOAD_KEYS = ("revision", "dtype", "device", "device_map", "allow_pickle", "trust_remote_code", "check_weights")
_PAIR_KEYS = {"expert", "base", "tasks", "chat_template", "note"}


class RegistryError(DLFError, ValueError):
    """A registry file, or a choice made from it, is invalid."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model of a registry, with every default already applied.

    Attributes:
        name: the model's key under ``models:``.
        location: absolute local directory, or hub id; empty for a placeholder.
        is_local: True when ``location`` is a local directory (``path:``).
        revision: hub revision (branch, tag or commit); None for local models.
        tokenizer: where the tokenizer is loaded from (defaults to ``location``).
        dtype: one of ``DTYPES``.
        device: explicit device for this model, or None (then ``--device`` or the
            registry default applies).
        device_map: a transformers ``device_map`` (e.g. ``auto``), or None.
        allow_pickle: allow non-safetensors weight files.
        trust_remote_code: pass ``trust_remote_code=True`` to transformers.
        placeholder: why this checkpoint is not available, or None.
        check_weights: check every weight for NaN and infinity at load (default true).
        merge: for a task-arithmetic merge, its recipe (then ``location`` is empty until
            ``dlf_plugin.merging`` builds it, and ``tokenizer`` is the merge base's).
    """

    name: str
    location: str
    is_local: bool
    revision: str | None
    tokenizer: str
    dtype: str
    device: str | None
    device_map: str | None
    allow_pickle: bool
    trust_remote_code: bool
    placeholder: str | None
    check_weights: bool = True
    merge: MergeSpec | None = None
    server: ServerSpec | None = None


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """A large model behind an inference server (``dlf_plugin.remote``).

    Attributes:
        api: the protocol: ``openai-completions`` (``/v1/completions`` with token logprobs:
            vLLM, SGLang, llama.cpp) or ``tgi`` (text-generation-inference's ``/generate``).
        url: the server's base URL (for openai-completions up to and including ``/v1``).
        model: the model name the server expects in requests.
        top_n: how many top logprobs to ask for at each position.
        prompt: ``tokens`` (send token ids: vLLM, SGLang, llama.cpp's llama-server) or
            ``text`` (send the decoded text; the server must tokenise it back to the same
            ids, which dlf checks on every request).
        timeout: seconds one request may take.
        retries: further tries of a request that failed to connect, timed out or got a 5xx.
        concurrency: requests in flight at once.
        api_key_env: the environment variable holding the server's API key (sent as a bearer
            token), or None; the key itself never goes in the registry.
    """

    api: str
    url: str
    model: str
    top_n: int
    prompt: str = "tokens"
    timeout: float = 60.0
    retries: int = 2
    concurrency: int = 8
    api_key_env: str | None = None


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """``base + sum_i w_i (model_i - base)`` over local checkpoints of one shape."""

    base: ModelSpec
    models: tuple[tuple[ModelSpec, float], ...]

    @property
    def sources(self) -> list[ModelSpec]:
        return [self.base, *(model for model, _ in self.models)]


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """An expert pair: a small model fine-tuned on ``tasks`` and its small base."""

    name: str
    expert: str
    base: str
    tasks: tuple[str, ...]
    chat_template: bool


@dataclasses.dataclass(frozen=True)
class Registry:
    """A validated registry file."""

    path: Path
    sha256: str
    name: str
    description: str
    default_device: str | None
    default_device_map: str | None
    models: dict[str, ModelSpec]
    large: str
    pairs: dict[str, PairSpec]

    def select(self, experts: list[str]) -> list[PairSpec]:
        """Return the pairs named in ``experts``, in that order.

        Raises:
            RegistryError: a name is not a pair of this registry, or is given twice.
        """
        chosen = []
        for name in experts:
            if name not in self.pairs:
                raise RegistryError(
                    f"model_args experts: {name!r} is not an expert pair of registry "
                    f"{self.path}; valid names: {', '.join(sorted(self.pairs)) or '(none)'} (or all, auto)"
                )
            if any(p.name == name for p in chosen):
                raise RegistryError(f"model_args experts: {name!r} is given twice")
            chosen.append(self.pairs[name])
        return chosen

    def models_for(self, pairs: list[PairSpec]) -> list[ModelSpec]:
        """The distinct models a run with ``pairs`` needs: large first, then small bases, then experts."""
        names = [self.large]
        names += [p.base for p in pairs] + [p.expert for p in pairs]
        return [self.models[n] for n in dict.fromkeys(names)]


def resolve_registry_path(value: str | None) -> Path:
    """Map the ``registry`` model argument to a file.

    A value with no path separator and no ``.yaml``/``.yml`` suffix names a
    registry shipped with dlf (``toy``, ``paper``); anything else is a path.
    None means the shipped offline ``toy`` registry.
    """
    value = value or "toy"
    if "/" not in value and not value.endswith((".yaml", ".yml")):
        shipped = data_root() / "registry" / f"{value}.yaml"
        if not shipped.is_file():
            names = sorted(p.stem for p in (data_root() / "registry").glob("*.yaml"))
            raise RegistryError(
                f"model_args registry: no shipped registry named {value!r} "
                f"(shipped: {', '.join(names)}); give a path to a YAML file instead"
            )
        return shipped
    return Path(value).expanduser()


def load_registry(value: str | Path | None) -> Registry:
    """Read and validate a registry file (see the module docstring for its format).

    Args:
        value: path to a YAML file, or the name of a shipped registry.

    Raises:
        RegistryError: naming the file and key for every kind of mistake.
    """
    path = resolve_registry_path(str(value) if value is not None else None).resolve()
    if not path.is_file():
        raise RegistryError(
            f"registry file {path} does not exist; pass registry=<path to a YAML file> "
            "or the name of a shipped registry (toy, paper)"
        )
    raw = path.read_bytes()
    try:
        doc = _read_yaml(raw)
    except _Refused as exc:
        raise RegistryError(f"{path}: {exc}") from None
    except (yaml.YAMLError, ValueError, TypeError, RecursionError) as exc:  # the last three from PyYAML's constructors
        raise RegistryError(f"registry file {path} is not valid YAML: {exc}") from None
    return _parse(path, hashlib.sha256(raw).hexdigest(), doc)


# A registry is a few dozen values; aliases may not expand it beyond this many nodes.
MAX_EXPANDED_NODES = 10_000


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML would keep the
    last one silently; keys brought in by a ``<<`` merge may be overridden, as YAML intends)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = first_seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: PyYAML's own error follows
                if first is not key_node:
                    raise _Refused(
                        f"line {key_node.start_mark.line + 1}: key {_clip(key)} is given twice in one mapping "
                        f"(first on line {first.start_mark.line + 1}); YAML would silently keep the last one"
                    )
        return super().construct_mapping(node, deep=deep)


class _Refused(yaml.YAMLError):
    """Valid YAML that a registry must not be (a duplicate key, an alias bomb)."""


def _expanded_size(node, sizes: dict) -> int:
    """Nodes of the document with every alias expanded, counted without expanding it."""
    key = id(node)
    if key not in sizes:
        sizes[key] = 0  # a recursive alias counts once (PyYAML refuses it when constructing)
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        sizes[key] = 1 + sum(_expanded_size(child, sizes) for child in children)
        if sizes[key] > MAX_EXPANDED_NODES:
            raise _Refused(
                f"its aliases expand to more than {MAX_EXPANDED_NODES:,} values; a registry needs a few dozen"
            )
    return sizes[key]


def _read_yaml(raw: bytes) -> Any:
    """The document of a registry file: strict keys, bounded aliases (yaml.YAMLError otherwise)."""
    loader = _StrictLoader(raw)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _clip(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a registry value may be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        text = f"<{type(value).__name__} too long to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse(path: Path, sha256: str, doc: Any) -> Registry:
    where = str(path)
    _require_mapping(doc, where, "the top level")
    _check_keys(doc, _TOP_KEYS, where, "the top level")
    for key in ("name", "models", "large"):
        if key not in doc:
            raise RegistryError(f"{where}: missing required key '{key}'")
    name = _string(doc["name"], where, "name")
    defaults = doc.get("defaults") or {}
    _require_mapping(defaults, where, "defaults")
    _check_keys(defaults, _DEFAULT_KEYS, where, "defaults")
    default_dtype = _dtype(defaults.get("dtype", "auto"), where, "defaults.dtype")
    default_device = _optional_string(defaults.get("device"), where, "defaults.device")
    default_map = _optional_string(defaults.get("device_map"), where, "defaults.device_map")
    if default_device is not None and default_map is not None:
        raise RegistryError(f"{where}: defaults sets both device and device_map; keep one")

    models_doc = doc["models"]
    _require_mapping(models_doc, where, "models")
    models = {
        str(key): _parse_model(path, str(key), spec, default_dtype)
        for key, spec in models_doc.items()
    }
    for key, spec in models_doc.items():
        if isinstance(spec, dict) and "merge" in spec:
            models[str(key)] = _parse_merge(where, str(key), spec["merge"], models)
    large = _string(doc["large"], where, "large")
    if large not in models:
        raise RegistryError(
            f"{where}: large: {large!r} is not a key of models (models: {', '.join(models)})"
        )
    pairs_doc = doc.get("pairs") or {}
    _require_mapping(pairs_doc, where, "pairs")
    pairs = {str(k): _parse_pair(where, str(k), v, models, large) for k, v in pairs_doc.items()}
    return Registry(
        path=path,
        sha256=sha256,
        name=name,
        description=_optional_string(doc.get("description"), where, "description") or "",
        default_device=default_device,
        default_device_map=default_map,
        models=models,
        large=large,
        pairs=pairs,
    )


def _parse_model(path: Path, key: str, spec: Any, default_dtype: str):
    where, at = str(path), f"models.{key}"
    _require_mapping(spec, where, at)
    _check_keys(spec, _MODEL_KEYS, where, at)
    sources = [k for k in ("path", "hub", "placeholder", "merge", "server") if k in spec]
    if len(sources) != 1:
        raise RegistryError(
            f"{where}: {at} must have exactly one of path (local directory), hub (hub id), "
            f"placeholder (why it is unavailable), merge (a task-arithmetic merge) or server (an inference "
            f"server); found {sources or 'none'}"
        )
    source = sources[0]
    if source == "server":
        return _parse_server(path, key, spec)
    if source == "merge":
        for option in ("revision", "tokenizer", "allow_pickle", "trust_remote_code"):
            if option in spec:
                raise RegistryError(f"{where}: {at}.{option} does not apply to a merge (its sources' entries set it)")
    value = "" if source == "merge" else _string(spec[source], where, f"{at}.{source}")
    if source == "path":
        location = str((path.parent / Path(value).expanduser()).resolve())
    elif source == "hub":
        location = value
    else:
        location = ""
    if "revision" in spec and source != "hub":
        raise RegistryError(f"{where}: {at}.revision only applies to hub models")
    device = _optional_string(spec.get("device"), where, f"{at}.device")
    device_map = _optional_string(spec.get("device_map"), where, f"{at}.device_map")
    if device is not None and device_map is not None:
        raise RegistryError(f"{where}: {at} sets both device and device_map; keep one")
    tokenizer = spec.get("tokenizer")
    if tokenizer is not None:
        tokenizer = _tokenizer_location(path, tokenizer, f"{at}.tokenizer")
    return ModelSpec(
        name=key,
        location=location,
        is_local=source == "path",
        revision=_optional_string(spec.get("revision", "main" if source == "hub" else None), where, f"{at}.revision"),
        tokenizer=tokenizer or location,
        dtype=_dtype(spec.get("dtype", default_dtype), where, f"{at}.dtype"),
        device=device,
        device_map=device_map,
        allow_pickle=_bool(spec.get("allow_pickle", False), where, f"{at}.allow_pickle"),
        trust_remote_code=_bool(spec.get("trust_remote_code", False), where, f"{at}.trust_remote_code"),
        placeholder=value if source == "placeholder" else None,
        check_weights=_bool(spec.get("check_weights", True), where, f"{at}.check_weights"),
    )


def _tokenizer_location(path: Path, value: Any, at: str) -> str:
    """A ``tokenizer:`` entry: a folder (relative to the registry) or a hub id."""
    value = _string(value, str(path), at)
    local = path.parent / Path(value).expanduser()
    return str(local.resolve()) if value.startswith((".", "/", "~")) or local.is_dir() else value


def _parse_server(path: Path, key: str, spec: dict) -> ModelSpec:
    """A model behind an inference server: its ``server:`` mapping and its local ``tokenizer``."""
    where, at = str(path), f"models.{key}"
    for option in _LOAD_KEYS:
        if option in spec:
            raise RegistryError(f"{where}: {at}.{option} does not apply to a model behind a server (the server loads it)")
    if "tokenizer" not in spec:
        raise RegistryError(
            f"{where}: {at} is behind a server and needs tokenizer: (a local folder or hub id of the served "
            "model's tokenizer): dlf tokenises requests and checks the vocabulary against the small models"
        )
    server = spec["server"]
    _require_mapping(server, where, f"{at}.server")
    _check_keys(server, _SERVER_KEYS, where, f"{at}.server")
    for part in ("api", "url", "model", "top_n"):
        if part not in server:
            raise RegistryError(
                f"{where}: {at}.server is missing required key '{part}' "
                f"(server: {{api: {SERVER_APIS[0]}, url: http://host:port/v1, model: <name>, top_n: <int>}})"
            )
    api = server["api"]
    if api not in SERVER_APIS:
        raise RegistryError(f"{where}: {at}.server.api: {_clip(api)} is not one of {', '.join(SERVER_APIS)}")
    url = _string(server["url"], where, f"{at}.server.url")
    if not url.startswith(("http://", "https://")):
        raise RegistryError(f"{where}: {at}.server.url must start with http:// or https://, got {_clip(url)}")
    prompt = server.get("prompt", "text" if api == "tgi" else "tokens")
    if prompt not in SERVER_PROMPTS:
        raise RegistryError(f"{where}: {at}.server.prompt: {_clip(prompt)} is not one of {', '.join(SERVER_PROMPTS)}")
    if api == "tgi" and prompt != "text":
        raise RegistryError(f"{where}: {at}.server.prompt: TGI's /generate takes text only; drop prompt or set prompt: text")
    return ModelSpec(
        name=key,
        location=url,
        is_local=False,
        revision=None,
        tokenizer=_tokenizer_location(path, spec["tokenizer"], f"{at}.tokenizer"),
        dtype="auto",
        device=None,
        device_map=None,
        allow_pickle=False,
        trust_remote_code=False,
        placeholder=None,
        server=ServerSpec(
            api=api,
            url=url.rstrip("/"),
            model=_string(server["model"], where, f"{at}.server.model"),
            top_n=_integer(server["top_n"], where, f"{at}.server.top_n", 1),
            prompt=prompt,
            timeout=_number(server.get("timeout", 60.0), where, f"{at}.server.timeout"),
            retries=_integer(server.get("retries", 2), where, f"{at}.server.retries", 0),
            concurrency=_integer(server.get("concurrency", 8), where, f"{at}.server.concurrency", 1),
            api_key_env=_optional_string(server.get("api_key_env"), where, f"{at}.server.api_key_env"),
        ),
    )


def _integer(value: Any, where: str, at: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RegistryError(f"{where}: {at} must be a whole number >= {minimum}, got {_clip(value)}")
    return value


def _number(value: Any, where: str, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise RegistryError(f"{where}: {at} must be a number of seconds in (0, 86400], got {_clip(value)}")
    return float(value)


def _parse_merge(where: str, key: str, spec: Any, models: dict[str, ModelSpec]) -> ModelSpec:
    """The model ``key`` with its merge recipe resolved against the other models."""
    at = f"models.{key}.merge"
    _require_mapping(spec, where, at)
    _check_keys(spec, _MERGE_KEYS, where, at)
    for part in sorted(_MERGE_KEYS):
        if part not in spec:
            raise RegistryError(f"{where}: {at} is missing required key '{part}' (merge: {{base: <model>, models: {{<model>: <weight>, ...}}}})")
    parts = spec["models"]
    _require_mapping(parts, where, f"{at}.models")
    if not parts:
        raise RegistryError(f"{where}: {at}.models is empty; name at least one model and its weight")

    def source(name: Any, at: str) -> ModelSpec:
        _string(name, where, at)
        found = models.get(name)
        if found is None:
            raise RegistryError(f"{where}: {at}: {_clip(name)} is not a key of models (models: {', '.join(models)})")
        if not found.is_local or found.merge is not None or found.placeholder is not None:
            raise RegistryError(
                f"{where}: {at}: {name!r} must be a local checkpoint (path:), not a hub model, a placeholder or "
                "another merge; merges read safetensors files tensor by tensor"
            )
        return found

    base = source(spec["base"], f"{at}.base")
    weighted = []
    for name, weight in parts.items():
        model = source(name, f"{at}.models")
        if model.name == base.name:
            raise RegistryError(f"{where}: {at}.models lists the merge base {base.name!r}; list only the models whose task vectors are added")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -1e3 <= weight <= 1e3:
            raise RegistryError(f"{where}: {at}.models.{name} must be a number in [-1000, 1000] (the task vector's weight), got {_clip(weight)}")
        weighted.append((model, float(weight)))
    return dataclasses.replace(models[key], is_local=True, tokenizer=base.tokenizer, merge=MergeSpec(base, tuple(weighted)))


def _parse_pair(where: str, key: str, spec: Any, models: dict[str, ModelSpec], large: str):
    at = f"pairs.{key}"
    _require_mapping(spec, where, at)
    _check_keys(spec, _PAIR_KEYS, where, at)
    for role in ("expert", "base"):
        if role not in spec:
            raise RegistryError(f"{where}: {at} is missing required key '{role}'")
        _string(spec[role], where, f"{at}.{role}")
        if spec[role] not in models:
            raise RegistryError(
                f"{where}: {at}.{role}: {spec[role]!r} is not a key of models "
                f"(models: {', '.join(models)})"
            )
        if spec[role] == large:
            raise RegistryError(f"{where}: {at}.{role} is the large model {large!r}")
        if models[spec[role]].server is not None:
            raise RegistryError(
                f"{where}: {at}.{role}: {spec[role]!r} is behind a server; only the large model may be (the small "
                "models' full logits are needed at every step: load them here with path: or hub:)"
            )
    if spec["expert"] == spec["base"]:
        raise RegistryError(f"{where}: {at}: expert and base are the same model {spec['base']!r}")
    tasks = spec.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise RegistryError(f"{where}: {at}.tasks must be a list of task names")
    return PairSpec(
        name=key,
        expert=str(spec["expert"]),
        base=str(spec["base"]),
        tasks=tuple(tasks),
        chat_template=_bool(spec.get("chat_template", False), where, f"{at}.chat_template"),
    )


def _require_mapping(value: Any, where: str, at: str) -> None:
    """A mapping whose keys are names (non-empty strings)."""
    if not isinstance(value, dict):
        raise RegistryError(f"{where}: {at} must be a mapping, got {type(value).__name__}")
    for key in value:
        _string(key, where, f"a key of {at}")


def _check_keys(doc: dict, allowed: set[str], where: str, at: str) -> None:
    unknown = sorted(str(k) for k in doc if k not in allowed)
    if unknown:
        raise RegistryError(
            f"{where}: unknown key(s) {', '.join(unknown)} in {at}; valid keys: {', '.join(sorted(allowed))}"
        )


def _string(value: Any, where: str, at: str) -> str:
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise RegistryError(f"{where}: {at} must be a non-empty string (no NUL), got {_clip(value)}")
    return value


def _optional_string(value: Any, where: str, at: str) -> str | None:
    return None if value is None else _string(value, where, at)


def _bool(value: Any, where: str, at: str) -> bool:
    if not isinstance(value, bool):
        raise RegistryError(f"{where}: {at} must be true or false, got {_clip(value)}")
    return value


def _dtype(value: Any, where: str, at: str) -> str:
    if value not in DTYPES:
        raise RegistryError(f"{where}: {at}: {_clip(value)} is not one of {', '.join(DTYPES)}")
    return value
