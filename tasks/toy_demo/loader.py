"""Loads a task's committed JSONL file, found beside this file (not in the working directory).

lm-eval calls ``custom_dataset`` with the task's ``dataset_kwargs`` and every run's
metadata (model_args included), so unknown keyword arguments are ignored.
"""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file: str, split: str = "test", **_ignored):
    path = HERE / data_file
    if not path.is_file():
        raise FileNotFoundError(f"task data file {path} is missing (dataset_kwargs.data_file in the task YAML)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
