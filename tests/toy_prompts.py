"""The toy world's task prompts, filled with the dev kingdoms (tests share them)."""

from __future__ import annotations

import json
from pathlib import Path

DEV = Path(__file__).resolve().parent.parent / "tasks" / "toy" / "data" / "dev"
PROMPTS = {  # the toy tasks' prompts (tasks/toy/*.yaml)
    "toy_qa": "Question: What is the capital of {}?\nAnswer:",
    "toy_fill": "Fill in the blank.\nThe emblem of {} is the ___.\nBlank:",
    "toy_num": "Record: founding of {}.\n####",
    "toy_table": "kingdom | ruler\n{} |",
}


def dev_prompts(count: int, shown: bool = False) -> list[str]:
    """The first ``count`` dev kingdoms' prompts of every seen task, task after task.
    ``shown``: each after one solved example of its task (the next dev kingdom's)."""
    rows = []
    for task, prompt in PROMPTS.items():
        docs = [json.loads(line) for line in (DEV / f"{task}.jsonl").read_text().splitlines()[: count + 1]]
        for doc, solved in zip(docs[:count], docs[1:]):
            rows.append((f"{prompt.format(solved['entity'])} {solved['answer']}\n" if shown else "") + prompt.format(doc["entity"]))
    return rows
