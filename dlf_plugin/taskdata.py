"""Task data from JSONL files committed beside a task's YAML, for lm-eval's ``custom_dataset``.

Each task folder holds a three-line ``loader.py`` that calls :func:`jsonl_loader` with its
own folder, so data paths resolve from the YAML's location, never the working directory.
lm-eval calls the loader with the task's ``dataset_kwargs`` and every run's metadata
(model_args included), so unknown keyword arguments are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path


def jsonl_loader(folder: str | Path):
    """A ``custom_dataset`` function reading ``data_file`` (relative to ``folder``) as split ``split``."""
    folder = Path(folder).resolve()

    def load_jsonl(data_file: str, split: str = "test", **_ignored):
        import datasets

        path = folder / data_file
        if not path.is_file():
            raise FileNotFoundError(f"task data file {path} is missing (dataset_kwargs.data_file in the task YAML)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})

    return load_jsonl
