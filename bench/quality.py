"""The paper's Table 1 and Table 2 in miniature, on the toy world, run through lm-eval.

    python bench/quality.py [--split test|dev] [--limit N] [--batch-size 32]

Reports the test kingdoms (tasks toy_*), which no design decision looks at; ``--split dev``
runs the dev kingdoms (tasks toy_*_dev), on which every decision is measured.

Table 1 (single task): on each seen task, the large base, the large base fine-tuned on
that task (the reference fusion tries to reach), the small expert alone, and the large
base fused with that task's pair by every registered solver (static = proxy-tuning,
weight 1). Table 2 (multi-task): every task, the unseen one included, with all pairs fused
at once, beside the large base and the large base fine-tuned on the mix of seen tasks; and
the paper's task-arithmetic rows: the four experts merged into one small model (registry
model ``expert-ta``, weight 0.3 each, chosen on dev), alone and fused as one pair's expert.
Table 3 (in-context learning): the large base with ``SHOTS`` demonstrations, and the fusion
with the demonstrations shown to the large model only (model_args ``shots=large``) or to
every model. Table 4 (a chat expert): ``expert-qa-chat`` alone, in its chat template and on
the raw prompt, and fused (static and dlf) reading its template (a prompt view) or the raw prompt.

Scores are lm-eval's (exact match, or accuracy for the multiple-choice task) with its
standard errors. "gap closed" is printed both as the paper computes it (fused average /
fine-tuned average) and normalised by the base ((fused - base) / (fine-tuned - base)).
Target, per seen task, for the default solver: fused beats both the large base and the
small expert by more than two standard errors of the difference (sqrt(se1^2 + se2^2)).
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import yaml

import lm_eval
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from dlf_plugin import hooks, merging
from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import load_registry

REPO = Path(__file__).resolve().parent.parent
TASKS_DIR = REPO / "tasks" / "toy"
UNSEEN = "toy_mc"
# Demonstrations in Table 3's in-context rows.
SHOTS = 3


def score(lm, tasks: list[str], manager: TaskManager, limit: int | None, **options) -> dict[str, tuple[float, float]]:
    """task -> (score, standard error) as lm-eval reports them; ``options`` go to
    ``simple_evaluate`` (num_fewshot, apply_chat_template)."""
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                  log_samples=False, bootstrap_iters=0, **options)
    result = {}
    for task in tasks:
        r = out["results"][task]
        metric = "acc,none" if "acc,none" in r else "exact_match,strip"
        stderr = r.get(metric.replace(",", "_stderr,"), float("nan"))
        if not isinstance(stderr, float) or math.isnan(stderr):
            p, n = r[metric], out["n-samples"][task]["effective"]
            stderr = math.sqrt(p * (1 - p) / max(1, n - 1))
        result[task] = (r[metric], stderr)
    return result


def hf(path: Path, batch_size: int) -> HFLM:
    return HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=batch_size)


def fmt(cell: tuple[float, float] | None) -> str:
    return "-" if cell is None else f"{100 * cell[0]:5.1f} ± {100 * cell[1]:4.1f}"


def print_table(title: str, tasks: list[str], rows: dict[str, dict[str, tuple[float, float]]]) -> None:
    print(f"\n{title}")
    header = f"| {'':24} | " + " | ".join(f"{t:>13}" for t in tasks) + " | average |"
    print(header)
    print("|" + "---|" * (len(tasks) + 2))
    for name, cells in rows.items():
        avg = average(cells, tasks)
        print(f"| {name:24} | " + " | ".join(f"{fmt(cells.get(t)):>13}" for t in tasks)
              + f" | {100 * avg:5.1f}   |")


def average(cells: dict[str, tuple[float, float]], tasks: list[str]) -> float:
    return sum(cells[t][0] for t in tasks) / len(tasks)


def gap_lines(label: str, rows: dict, tasks: list[str], base: str, tuned: str, fused: list[str]) -> None:
    b, f = average(rows[base], tasks), average(rows[tuned], tasks)
    for name in fused:
        x = average(rows[name], tasks)
        norm = (x - b) / (f - b) if f != b else float("nan")
        print(f"gap closed ({label}, {name}): {x / f:.3f} of the fine-tuned average (paper's measure), "
              f"{norm:.3f} of the fine-tuned gain over the base")


def margin(fused: tuple[float, float], other: tuple[float, float]) -> float:
    """How many standard errors of the difference (sqrt(se1^2 + se2^2)) ``fused`` is above ``other``."""
    (x, sx), (y, sy) = fused, other
    return (x - y) / max(math.hypot(sx, sy), 1e-12)


def with_pair(registry, expert: str, folder: Path, chat_template: bool = False) -> str:
    """A copy of ``registry`` (paths made absolute) whose one pair ``ta`` is ``expert`` over the small base."""
    doc = yaml.safe_load(registry.path.read_text())
    for spec in doc["models"].values():
        if "path" in spec:
            spec["path"] = str((registry.path.parent / spec["path"]).resolve())
    base = next(iter(registry.pairs.values())).base
    doc["pairs"] = {"ta": {"expert": expert, "base": base, "chat_template": chat_template}}
    path = folder / f"toy-{expert}-{chat_template}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--solvers", default=None, help="solvers joined by + (default: every registered one)")
    ap.add_argument("--split", choices=["test", "dev"], default="test")
    args = ap.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    start = time.time()

    registry = load_registry("toy")
    manager = TaskManager(include_path=str(TASKS_DIR))
    suffix = "_dev" if args.split == "dev" else ""
    pairs = {name: spec.tasks[0] + suffix for name, spec in registry.pairs.items()}  # pair -> its seen task
    assert all(task in registry.pairs[pair].tasks for pair, task in pairs.items())
    seen = list(pairs.values())
    every = seen + [UNSEEN + suffix]
    print(f"split: {args.split} ({', '.join(every)})")
    path = {name: Path(spec.location) for name, spec in registry.models.items()}
    solvers = args.solvers.split("+") if args.solvers else list(hooks.get_solvers())
    default = "dlf"
    bs = args.batch_size

    # Table 1: one pair per task.
    base = hf(path[registry.large], bs)  # loaded once, scored in both tables
    t1: dict[str, dict[str, tuple[float, float]]] = {"large base": score(base, seen, manager, args.limit)}
    t1["large fine-tuned"], t1["small expert"] = {}, {}
    for solver in solvers:
        t1[f"fused: {solver}"] = {}
    for pair, task in pairs.items():
        spec = registry.pairs[pair]
        t1["large fine-tuned"].update(score(hf(path[f"large-ft-{pair}"], bs), [task], manager, args.limit))
        t1["small expert"].update(score(hf(path[spec.expert], bs), [task], manager, args.limit))
        for solver in solvers:
            lm = DLFLM(registry="toy", experts=pair, solver=solver, batch_size=bs)
            t1[f"fused: {solver}"].update(score(lm, [task], manager, args.limit))
    print_table("Table 1: single task (each task fused with its own pair)", seen, t1)

    # Table 2: all pairs at once, the unseen task included.
    t2 = {"large base": score(base, every, manager, args.limit),
          "large fine-tuned (mix)": score(hf(path["large-ft-mix"], bs), every, manager, args.limit)}
    for solver in solvers:
        lm = DLFLM(registry="toy", experts="all", solver=solver, batch_size=bs)
        t2[f"fused: {solver}"] = score(lm, every, manager, args.limit)
    # No task labels: each request fused with the pair its prompt points to (route=prompt).
    routed = DLFLM(registry="toy", experts="all", route="prompt", solver=default, batch_size=bs)
    t2[f"fused: {default}, route=prompt"] = score(routed, every, manager, args.limit)
    # Task arithmetic (the paper's integration): the four experts merged into one small model,
    # alone and as the expert of one pair over the small base.
    merged = registry.models["expert-ta"]
    t2["task arithmetic (small)"] = score(hf(merging.build(merged, registry.path), bs), every, manager, args.limit)
    with tempfile.TemporaryDirectory() as scratch:
        t2[f"fused: {default}, task arithmetic"] = score(
            DLFLM(registry=with_pair(registry, "expert-ta", Path(scratch)), experts="ta", solver=default, batch_size=bs),
            every, manager, args.limit)
    print_table(f"Table 2: multi-task (all {len(pairs)} pairs; {UNSEEN} is unseen by every expert)", every, t2)

    # Table 3: prompt views. In-context shots (--num_fewshot) for the large base, and for the
    # fusion with shots to the large model only (shots=large) or to every model; each task
    # fused with its own pair, as in Table 1.
    shots = dict(num_fewshot=SHOTS)
    t3 = {f"large base, {SHOTS}-shot": score(base, seen, manager, args.limit, **shots)}
    for reader in ("large", "all"):
        t3[f"fused: {default}, {SHOTS}-shot, shots={reader}"] = {}
        for pair, task in pairs.items():
            lm = DLFLM(registry="toy", experts=pair, solver=default, shots=reader, batch_size=bs)
            t3[f"fused: {default}, {SHOTS}-shot, shots={reader}"].update(score(lm, [task], manager, args.limit, **shots))
    print_table(f"Table 3: in-context shots ({SHOTS} demonstrations drawn by lm-eval from the other questions of the task)", seen, t3)
    # The chat expert (toy_qa, tuned in its own chat template): alone, and fused with and
    # without its view.
    qa = pairs["qa"]
    chat = path["expert-qa-chat"]
    t4 = {"chat expert, its template": score(hf(chat, bs), [qa], manager, args.limit, apply_chat_template=True),
          "chat expert, raw prompt": score(hf(chat, bs), [qa], manager, args.limit)}
    with tempfile.TemporaryDirectory() as scratch:
        for solver in ("static", default):
            for viewed, label in ((True, "its template"), (False, "raw")):
                lm = DLFLM(registry=with_pair(registry, "expert-qa-chat", Path(scratch), chat_template=viewed), experts="ta", solver=solver, batch_size=bs)
                t4[f"fused: {solver}, chat expert, {label}"] = score(lm, [qa], manager, args.limit)
    print_table("Table 4: a chat expert (expert-qa-chat, small-base tuned on toy_qa in its chat template)", [qa], t4)
    print()
    fused1 = [k for k in t1 if k.startswith("fused")]
    fused2 = [k for k in t2 if k.startswith("fused")]
    gap_lines("single task", t1, seen, "large base", "large fine-tuned", fused1)
    gap_lines("multi-task, seen tasks", t2, seen, "large base", "large fine-tuned (mix)", fused2)
    gap_lines("multi-task, all tasks", t2, every, "large base", "large fine-tuned (mix)", fused2)
    print("\nroute=prompt sent each task's requests to:", {t: routed.routes.get(t) for t in every})
    print(f"\n({time.time() - start:.0f}s)")
    fused = t1[f"fused: {default}"]
    for task in seen:
        m = min(margin(fused[task], t1[other][task]) for other in ("large base", "small expert"))
        target(f"{default}_beats_base_and_expert_{task}", m, "standard errors", ">", 2)
    for task in seen:
        target(f"{default}_not_below_static_{task}", margin(fused[task], t1["fused: static"][task]), "standard errors", ">", -1)
    gain = average(fused, seen) - average(t1["fused: static"], seen)
    target(f"{default}_average_above_static", 100 * gain, "points", ">", 0)
    multi = average(t2[f"fused: {default}, route=prompt"], seen) / average(fused, seen)
    target("multitask_vs_single_task", multi, "(route=prompt, no task labels; Table 2 seen-task average / Table 1)", ">=", 0.75)
    unseen = every[-1]
    target("unseen_not_below_base", margin(t2[f"fused: {default}, route=prompt"][unseen], t2["large base"][unseen]), f"standard errors ({unseen}, route=prompt)", ">", -1)


def target(name: str, value: float, unit: str, op: str, goal: float) -> None:
    ok = value >= goal if op == ">=" else value > goal
    print(f"target {name}: {value:.3f} {unit} (goal {op} {goal}) {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
