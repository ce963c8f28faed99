"""The Python route: lm_eval.simple_evaluate with a DLFLM instance (the README's snippet itself: tests/test_install.py)."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

from dlf_plugin.lm import DLFLM

REPO = Path(__file__).resolve().parent.parent


def test_simple_evaluate_with_a_dlf_instance(tiny_world):
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+a2", solver="dlf", batch_size=4)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["toy_mc", "toy_qa"], limit=3,
        task_manager=TaskManager(include_path=str(REPO / "tasks")),
    )
    assert set(out["results"]) == {"toy_mc", "toy_qa"}
    assert 0.0 <= out["results"]["toy_mc"]["acc,none"] <= 1.0
    assert out["config"]["dlf"]["solver"]["name"] == "dlf"
    assert [p["name"] for p in out["config"]["dlf"]["pairs"]] == ["a1", "a2"]


def test_offline_task_data_resolves_from_the_yaml_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks = TaskManager(include_path=str(REPO / "tasks")).load_task_or_group(["toy_mc"])
    task = next(iter(tasks.values())) if isinstance(tasks, dict) else tasks[0]
    docs = list(task.test_docs())
    rows = [json.loads(line) for line in (REPO / "tasks" / "toy" / "data" / "toy_mc.jsonl").read_text().splitlines()]
    assert len(docs) == len(rows) == 250
    assert [d["choices"][d["label"]] for d in docs] == [r["answer"] for r in rows]
