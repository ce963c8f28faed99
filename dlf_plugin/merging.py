"""Task-arithmetic merges, ``base + sum_i w_i (model_i - base)``, from safetensors files.

A registry model with ``merge:`` (``dlf_plugin.registry``) becomes a checkpoint folder
in dlf's cache the first time it is loaded, then loads through ``from_pretrained`` like
any other model (every load check applies). The merge reads each tensor of each source
straight from its file, one at a time: beside the float32 accumulator of the tensor
being merged it holds one source tensor, never a whole model (the result is written to
disk as it is made). The folder is named by a digest of the recipe and of each source's header,
size and modification time, written under a temporary name and renamed when complete:
an interrupted merge leaves nothing that a later run could take for a finished one.

The cache is ``$DLF_CACHE/merges`` (default ``~/.cache/dlf/merges``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from dlf_plugin.registry import ModelSpec, RegistryError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The merged folder copies every file of the merge base's folder but its weights (config,
# generation config, tokenizer): it loads anywhere a checkpoint folder does.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def cache_root() -> Path:
    return Path(os.environ.get("DLF_CACHE") or Path.home() / ".cache" / "dlf") / "merges"


class Tensors:
    """Every tensor of a checkpoint folder (one safetensors file or shards), read one at a time."""

    def __init__(self, spec: ModelSpec, registry_path: Path) -> None:
        self.spec = spec
        self.entries: dict[str, tuple[Path, int, dict]] = {}  # name -> (file, data start, header entry)
        for path in sorted(Path(spec.location).glob("*.safetensors")):
            with path.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry.get("dtype") not in DTYPES:
                    raise RegistryError(
                        f"{registry_path}: models.{spec.name}: tensor {name} in {path} has dtype {entry.get('dtype')!r}, "
                        f"which dlf cannot merge ({', '.join(DTYPES)})"
                    )
                self.entries[name] = (path, 8 + length, entry)

    def layout(self, name: str) -> tuple[str, tuple[int, ...]]:
        entry = self.entries[name][2]
        return entry["dtype"], tuple(entry["shape"])

    def read(self, name: str) -> torch.Tensor:
        path, start, entry = self.entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with path.open("rb") as handle:
            handle.seek(start + begin)
            handle.readinto(buffer)
        dtype = DTYPES[entry["dtype"]]
        flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return flat.reshape(entry["shape"])

    def fingerprint(self) -> str:
        """The files' headers, sizes and modification times: a changed checkpoint changes it."""
        digest = hashlib.sha256()
        for path in sorted({path for path, _, _ in self.entries.values()}):
            stat = path.stat()
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
            digest.update(json.dumps({n: e[2] for n, e in self.entries.items() if e[0] == path}, sort_keys=True).encode())
        return digest.hexdigest()


def check_merge(spec: ModelSpec, registry_path: Path) -> dict[str, Tensors]:
    """Every source has the merge base's tensors, with its shapes and floating dtypes (or an
    identical non-floating tensor's layout); raises RegistryError naming the model, file and
    tensor. Reads headers only. Returns each source's tensors by model name."""
    merge = spec.merge
    sources = {source.name: Tensors(source, registry_path) for source in merge.sources}
    base = sources[merge.base.name]
    where = f"{registry_path}: models.{spec.name}.merge"
    if not base.entries:
        raise RegistryError(f"{where}: the base {merge.base.name} ({merge.base.location}) has no safetensors weights")
    for model, _ in merge.models:
        other = sources[model.name]
        missing, extra = sorted(set(base.entries) - set(other.entries)), sorted(set(other.entries) - set(base.entries))
        if missing or extra:
            names = ", ".join((missing or extra)[:3])
            raise RegistryError(
                f"{where}: {model.name} ({model.location}) {'lacks' if missing else 'has extra'} tensor(s) {names} "
                f"{'of' if missing else 'beyond'} the base {merge.base.name}; task arithmetic needs checkpoints of one architecture"
            )
        for name in base.entries:
            (dtype, shape), (other_dtype, other_shape) = base.layout(name), other.layout(name)
            if shape != other_shape:
                raise RegistryError(
                    f"{where}: tensor {name} is {list(other_shape)} in {model.name} ({other.entries[name][0]}) but "
                    f"{list(shape)} in the base {merge.base.name}; task arithmetic needs checkpoints of one shape"
                )
            if DTYPES[dtype].is_floating_point != DTYPES[other_dtype].is_floating_point:
                raise RegistryError(f"{where}: tensor {name} is {other_dtype} in {model.name} but {dtype} in the base {merge.base.name}")
    return sources


def merged_folder(spec: ModelSpec, sources: dict[str, Tensors]) -> Path:
    """Where the merge of ``spec`` is (or will be) in the cache."""
    recipe = {
        "base": spec.merge.base.name,
        "models": [[model.name, weight] for model, weight in spec.merge.models],
        "sources": {name: tensors.fingerprint() for name, tensors in sources.items()},
        "version": 1,
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / f"{spec.name}-{digest}"


def build(spec: ModelSpec, registry_path: Path) -> Path:
    """The merged checkpoint folder of ``spec``, written into the cache unless already there."""
    sources = check_merge(spec, registry_path)
    folder = merged_folder(spec, sources)
    if (folder / "model.safetensors").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        for path in Path(spec.merge.base.location).iterdir():
            if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES):
                shutil.copyfile(path, partial / path.name)
        write_merge(spec, sources, partial / "model.safetensors")
        (partial / "dlf-merge.json").write_text(json.dumps(describe(spec), indent=1) + "\n")
        os.replace(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def write_merge(spec: ModelSpec, sources: dict[str, Tensors], path: Path) -> None:
    """Write ``base + sum_i w_i (model_i - base)`` tensor by tensor, in the base's dtypes;
    non-floating tensors are the base's."""
    merge = spec.merge
    base = sources[merge.base.name]
    names = sorted(base.entries)
    header, offset = {"__metadata__": {"format": "pt", "dlf_merge": json.dumps(describe(spec))}}, 0
    for name in names:
        dtype, shape = base.layout(name)
        size = DTYPES[dtype].itemsize * (torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # data aligned to 8 bytes
    scale = 1.0 - sum(weight for _, weight in merge.models)
    with path.open("wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        for name in names:
            tensor = base.read(name)
            if tensor.is_floating_point():
                # base (1 - sum w) + sum w_i model_i, accumulated in float32 (in place for a
                # float32 base: the tensor just read is the accumulator).
                merged = tensor.to(torch.float32).mul_(scale)
                del tensor
                for model, weight in merge.models:
                    merged.add_(sources[model.name].read(name), alpha=weight)
                tensor = merged.to(DTYPES[base.layout(name)[0]])
                del merged
            handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))


def describe(spec: ModelSpec) -> dict:
    """The recipe, as results metadata and the merged folder record it."""
    return {
        "base": {"name": spec.merge.base.name, "source": spec.merge.base.location},
        "models": [{"name": model.name, "source": model.location, "weight": weight} for model, weight in spec.merge.models],
    }
