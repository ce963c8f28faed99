"""Registry entries -> loaded Hugging Face models and one tokenizer, vocabularies checked.

Order of work, so that bad input fails before anything heavy happens:
``check_sources`` (files only) -> ``load_tokenizers`` + ``check_vocabularies`` (small)
-> ``load_models`` (the weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path

import torch
import transformers

from dlf_plugin import merging, remote
from dlf_plugin.backends import ModelFault, attention_layout, text_config
from dlf_plugin.registry import ModelSpec, Registry, RegistryError

logger = logging.getLogger(__name__)

# Local checkpoints up to this size are hashed into the results metadata.
HASH_LIMIT_BYTES = 2 * 1024**3


@dataclasses.dataclass
class LoadedModel:
    spec: ModelSpec
    model: transformers.PreTrainedModel | None  # None behind a server
    provenance: dict


def resolve_placement(
    spec: ModelSpec, placement: str | None, registry: Registry, cli_device: str | None
) -> tuple[str | None, str | None]:
    """Where a model goes, as ``(device, device_map)``, exactly one of them set.

    First match wins: model_args ``placement`` (a device, or ``auto`` for
    ``device_map=auto``), the model's registry entry, the registry's defaults,
    ``--device``, then CUDA when torch has it, else CPU.
    """
    if placement:
        return (None, "auto") if placement == "auto" else (placement, None)
    if spec.device or spec.device_map:
        return spec.device, spec.device_map
    if registry.default_device_map:
        return None, registry.default_device_map
    device = registry.default_device or cli_device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, None


def check_device(name: str, device: str | None, where: str) -> None:
    """Fail before loading when a model is sent to an accelerator torch cannot use."""
    if device is None:
        return
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise RegistryError(
            f"{where}: model {name} is placed on {device!r} but torch has no CUDA device here; "
            "pass model_args placement=cpu (or another device) or change the registry's device"
        )


def check_sources(specs: list[ModelSpec], registry_path: Path) -> None:
    """Fail, naming the model and the file, on placeholders and missing or pickled local checkpoints."""
    for spec in specs:
        if spec.placeholder is not None:
            raise RegistryError(
                f"{registry_path}: models.{spec.name} is a placeholder ({spec.placeholder}); "
                "replace it by a path: or hub: entry before using it"
            )
        if spec.server is not None:
            continue  # its tokenizer loads next; the server is asked before any weights load
        if spec.merge is not None:
            check_sources(spec.merge.sources, registry_path)
            merging.check_merge(spec, registry_path)
            continue
        if not spec.is_local:
            _check_offline_hub(spec, registry_path)
            continue
        folder = Path(spec.location)
        if not (folder / "config.json").is_file():
            raise RegistryError(
                f"{registry_path}: models.{spec.name}.path {folder} is not a model directory "
                "(no config.json there)"
            )
        if not spec.allow_pickle and not any(folder.glob("*.safetensors")):
            raise RegistryError(
                f"{registry_path}: models.{spec.name}.path {folder} has no .safetensors weights; "
                "convert the checkpoint, or set allow_pickle: true for this model if you trust it"
            )
        for weights in sorted(folder.glob("*.safetensors")):
            problem = safetensors_problem(weights)
            if problem:
                raise RegistryError(
                    f"{registry_path}: models.{spec.name}.path: weight file {weights} {problem}; the checkpoint is "
                    "corrupt or was copied incompletely: copy it again"
                )
        tokenizer = Path(spec.tokenizer)
        if tokenizer.is_dir() and not any((tokenizer / name).is_file() for name in TOKENIZER_FILES):
            key = "tokenizer" if spec.tokenizer != spec.location else "path"
            raise RegistryError(
                f"{registry_path}: models.{spec.name}.{key} {tokenizer} has no tokenizer files (none of "
                f"{', '.join(TOKENIZER_FILES)}); save the tokenizer beside the model, or point "
                f"models.{spec.name}.tokenizer at the folder or hub id that has it"
            )


# Files of which a tokenizer folder has at least one (fast tokenizers, sentencepiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's layout, read from its header alone, or None.

    The format: an 8-byte little-endian header length, a JSON header giving every tensor's
    byte range, then the data; a complete file ends exactly where its last tensor does.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"has {size} bytes, fewer than the 8 of its header length"
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            return f"declares a {length}-byte header but has {size} bytes in all"
        try:
            header = json.loads(handle.read(length))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has a header that is not a safetensors header"
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        return f"has {size} bytes where its header accounts for {expected}"
    return None


# Environment variables that keep huggingface_hub (and transformers) offline.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """Whether the hub is off (read now, as huggingface_hub parses it: 1, ON, YES, TRUE)."""
    return any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE") for name in OFFLINE_VARIABLES)


def _check_offline_hub(spec: ModelSpec, registry_path: Path) -> None:
    """Offline, a hub model must be in the local cache already: fail now, naming it, rather
    than after transformers' retries."""
    if not offline():
        return
    from huggingface_hub import try_to_load_from_cache

    wanted = [(spec.location, "config.json")]
    if spec.tokenizer != spec.location:
        wanted.append((spec.tokenizer, "tokenizer_config.json"))
    for repo, filename in wanted:
        if Path(repo).is_dir():  # a local tokenizer beside a hub model
            continue
        if not isinstance(try_to_load_from_cache(repo, filename, revision=spec.revision), str):
            raise RegistryError(
                f"{registry_path}: models.{spec.name} is the hub model {repo!r}, which is not in the local "
                f"Hugging Face cache ({filename} missing) and the hub is off (HF_HUB_OFFLINE); download it "
                f"where the hub is reachable (hf download {repo}) or point path: at a local copy"
            )


def load_tokenizers(specs: list[ModelSpec], registry_path: Path) -> dict[str, transformers.PreTrainedTokenizerBase]:
    """Each distinct tokenizer location, loaded once."""
    loaded = {}
    for spec in specs:
        key = (spec.tokenizer, spec.revision)
        if key not in loaded:
            try:
                loaded[key] = transformers.AutoTokenizer.from_pretrained(
                    spec.tokenizer,
                    revision=spec.revision,
                    trust_remote_code=spec.trust_remote_code,
                )
            except (OSError, ValueError) as exc:
                raise RegistryError(
                    f"{registry_path}: models.{spec.name}: the tokenizer at {spec.tokenizer} could not be loaded: {exc}"
                ) from exc
    return {spec.name: loaded[(spec.tokenizer, spec.revision)] for spec in specs}


def chat_templates(pairs, tokenizers: dict, registry) -> dict[str, str]:
    """Each chat pair's (``chat_template: true``) expert -> its tokenizer's chat template,
    which the expert and its small base read (DESIGN.md section 7); checked before any
    weights load."""
    templates = {}
    for pair in pairs:
        if not pair.chat_template:
            continue
        template = getattr(tokenizers[pair.expert], "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        if not isinstance(template, str) or not template.strip():
            raise RegistryError(
                f"{registry.path}: pairs.{pair.name} has chat_template: true, but the tokenizer of its expert "
                f"{pair.expert} ({registry.models[pair.expert].tokenizer}) has no chat template; add one to its "
                "tokenizer_config.json (key chat_template) or set chat_template: false"
            )
        templates[pair.expert] = template
    return templates


def check_output_vocabularies(specs: list[ModelSpec], tokens: int, registry_path: Path) -> None:
    """Every model's output layer covers the shared tokenizer, read from its config (before
    any weights load): a smaller head could not score the tokenizer's last ids. Its layers
    are of kinds whose attention masks dlf builds (``backends.attention_layout``)."""
    for spec in specs:
        if spec.server is not None:  # the server's vocabulary is its tokenizer's (checked by check_vocabularies)
            continue
        try:
            location = spec.merge.base.location if spec.merge is not None else spec.location
            config = transformers.AutoConfig.from_pretrained(location, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{registry_path}: models.{spec.name}: its config.json could not be read: {exc}") from exc
        attention_layout(spec.name, config)  # layers dlf cannot mask: refused before the weights load
        rows = getattr(text_config(config), "vocab_size", None)
        if isinstance(rows, int) and rows < tokens:
            raise RegistryError(
                f"{registry_path}: models.{spec.name} ({spec.location}) has an output layer of {rows} rows (config.json "
                f"vocab_size) but the shared tokenizer has {tokens} tokens; ids {rows} and up could not be scored. Use a "
                f"checkpoint of this model family's vocabulary, or a tokenizer without the extra tokens (models.<large>.tokenizer)"
            )


def check_vocabularies(
    tokenizers: dict[str, transformers.PreTrainedTokenizerBase], large: str, registry_path: Path
) -> None:
    """All tokenizers must map the same ids to the same tokens (over their common length).

    Vocabularies may differ in length by padding rows (32000 vs 32001): those rows are
    never fused. Special-token ids must agree too, since all models read one token stream.
    """
    reference = tokenizers[large]
    ref_tokens = reference.convert_ids_to_tokens(list(range(len(reference))))
    for name, tok in tokenizers.items():
        if tok is reference:
            continue
        tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
        common = min(len(tokens), len(ref_tokens))
        mismatch = next((i for i in range(common) if tokens[i] != ref_tokens[i]), None)
        if mismatch is not None:
            raise RegistryError(
                f"{registry_path}: the tokenizer of models.{name} differs from the large model's "
                f"({large}): token id {mismatch} is {tokens[mismatch]!r} there and "
                f"{ref_tokens[mismatch]!r} in {large}; fusion needs one shared vocabulary"
            )
        for attr in ("eos_token_id", "bos_token_id"):
            if getattr(tok, attr) != getattr(reference, attr):
                raise RegistryError(
                    f"{registry_path}: models.{name} has {attr}={getattr(tok, attr)} but the large "
                    f"model {large} has {getattr(reference, attr)}; fusion needs one shared vocabulary"
                )


def torch_dtype(name: str):
    return "auto" if name == "auto" else getattr(torch, name)


def load_model(spec: ModelSpec, device: str | None, device_map: str | None, dtype: str, registry_path: Path) -> LoadedModel:
    """``from_pretrained`` one model, safetensors only unless the registry allows pickles; a
    merge is built first (``dlf_plugin.merging``, cached) and loads from its folder."""
    if spec.merge is not None:
        spec = dataclasses.replace(spec, location=str(merging.build(spec, registry_path)))
    kwargs = dict(
        dtype=torch_dtype(dtype),
        trust_remote_code=spec.trust_remote_code,
        use_safetensors=None if spec.allow_pickle else True,
    )
    if spec.revision is not None:
        kwargs["revision"] = spec.revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    logger.info("dlf: loading %s from %s", spec.name, spec.location)
    model = transformers.AutoModelForCausalLM.from_pretrained(spec.location, **kwargs)
    if device_map is None:
        model.to(device)
    model.eval()
    if spec.check_weights:
        check_finite_weights(spec, model)
    placed = device if device_map is None else f"device_map={device_map}"
    return LoadedModel(spec=spec, model=model, provenance=provenance(spec, model, placed))


def connect(spec: ModelSpec, tokenizer) -> tuple[remote.Client, LoadedModel]:
    """A client for a model behind a server, which must answer and serve the model now
    (before any weights load); what the results record about it."""
    client = remote.client(spec.name, spec.server, tokenizer)
    listed = next(m for m in client.models() if m.get("id") == spec.server.model)
    record = {
        "source": spec.location,
        "kind": "server",
        "server": dataclasses.asdict(spec.server),
        "served": listed,
        "tokenizer": spec.tokenizer,
        "requested_revision": None,
        "resolved_revision": None,
        "dtype": None,
        "placement": "server",
        "num_parameters": None,
    }
    return client, LoadedModel(spec=spec, model=None, provenance=record)


def check_finite_weights(spec: ModelSpec, model) -> None:
    """NaN or infinity in any weight is an error naming the model and the tensor.

    One read of the weights: each tensor's float32 sum, which NaN or infinity makes
    non-finite (summed on its device, all sums read back at once); a tensor whose sum
    overflowed without either is then checked element by element.
    """
    tensors = {name: t for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_floating_point()}
    if not tensors:
        return
    with torch.no_grad():
        sums = torch.stack([t.sum(dtype=torch.float32).cpu() for t in tensors.values()])
        suspects = [name for name, ok in zip(tensors, torch.isfinite(sums).tolist()) if not ok]
        bad = [name for name in suspects if not bool(torch.isfinite(tensors[name]).all())]
    if bad:
        raise ModelFault(
            f"model {spec.name} ({spec.location}): weight tensor(s) {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} "
            "hold NaN or infinite values; the checkpoint is broken (check_weights: false in its registry entry skips "
            "this check)"
        )


def provenance(spec: ModelSpec, model, placed: str) -> dict:
    """What a results file records about one model: where from, which revision, which bytes."""
    record = {
        "source": spec.location,
        "kind": "local" if spec.is_local else "hub",
        "requested_revision": spec.revision,
        "resolved_revision": getattr(model.config, "_commit_hash", None),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "placement": placed,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    if spec.is_local:
        record["content_sha256"] = _hash_folder(Path(spec.location))
    if spec.merge is not None:
        record["kind"] = "merge"
        record["merge"] = merging.describe(spec)
    return record


def _hash_folder(folder: Path) -> str | None:
    """sha256 over config.json and the weight files, in name order; None above HASH_LIMIT_BYTES."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin") and p.name.startswith(("config", "model", "pytorch_model")))
    if sum(p.stat().st_size for p in files) > HASH_LIMIT_BYTES:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def output_vocab_size(model) -> int:
    """Number of rows of a model's output layer (its logits' last dimension)."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size
