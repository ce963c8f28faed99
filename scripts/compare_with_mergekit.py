"""Compare a registry's task-arithmetic merge with mergekit's ``task_arithmetic`` on the same recipe.

    pip install mergekit
    python scripts/compare_with_mergekit.py REGISTRY MODEL

Builds the merge both ways (dlf's into a temporary cache) and prints the largest difference
over every tensor. mergekit is not a dependency of dlf or of its tests.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge
from safetensors.torch import load_file

from dlf_plugin import merging
from dlf_plugin.registry import load_registry


def tensors(folder: Path) -> dict:
    out = {}
    for path in folder.glob("*.safetensors"):
        out.update(load_file(path))
    return out


def main(registry_path: str, model: str) -> None:
    registry = load_registry(registry_path)
    spec = registry.models[model]
    if spec.merge is None:
        raise SystemExit(f"{model} is not a merge in {registry.path}")
    base = merging.Tensors(spec.merge.base, registry.path)
    dtype = str(merging.DTYPES[base.layout(next(iter(base.entries)))[0]]).removeprefix("torch.")
    config = {  # written in the base's dtype, as dlf writes its merges
        "merge_method": "task_arithmetic",
        "base_model": spec.merge.base.location,
        "dtype": dtype,
        "parameters": {"normalize": False},
        "models": [{"model": m.location, "parameters": {"weight": w}} for m, w in spec.merge.models],
    }
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["DLF_CACHE"] = str(Path(scratch) / "cache")
        ours = tensors(merging.build(spec, registry.path))
        run_merge(MergeConfiguration.model_validate(config), str(Path(scratch) / "mergekit"), options=MergeOptions())
        theirs = tensors(Path(scratch) / "mergekit")
    common = sorted(set(ours) & set(theirs))
    print(f"tensors: dlf {len(ours)}, mergekit {len(theirs)}, in both {len(common)}, stored as {dtype}")
    print(f"largest difference: {max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in common):.3g}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
