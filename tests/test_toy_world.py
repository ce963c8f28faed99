"""The committed toy world: what the training script promises, checked on its output."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from lm_eval.tasks import TaskManager

from dlf_plugin import loading
from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import load_registry

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_toy_world.py"


def _load(path: Path, name: str):
    """A script of the repository (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world_script():
    return _load(SCRIPT, "train_toy_world")


@pytest.fixture(scope="module")
def pretraining(world_script):
    """The script's world and the first 20,000 paragraphs of its pretraining text."""
    world = world_script.build_world(1500, 250)
    return world, world_script.pretraining_text(world, 20000, world_script.SEED + 1)


@pytest.fixture(scope="module")
def toy():
    return load_registry("toy")


def test_sizes_and_shared_tokenizer(toy):
    total = 0
    for spec in (s for s in toy.models.values() if s.merge is None):  # a merge is built at load time
        files = list(Path(spec.location).glob("*.safetensors"))
        assert files and not list(Path(spec.location).glob("*.bin")), spec.name
        total += sum(f.stat().st_size for f in files)
    assert total <= 40e6, f"toy weights take {total / 1e6:.1f} MB"
    params = {}
    for name in ("small-base", "large-base"):
        model = transformers.AutoModelForCausalLM.from_pretrained(toy.models[name].location)
        params[name] = sum(p.numel() for p in model.parameters())
    assert params["large-base"] >= 4 * params["small-base"]
    loading.check_vocabularies(loading.load_tokenizers(list(toy.models.values()), toy.path), toy.large, toy.path)


def test_registry_pairs_every_seen_task_and_holds_references(toy, world_script):
    seen = [t.name for t in world_script.TASKS if not t.held_out]
    held_out = [t.name for t in world_script.TASKS if t.held_out]
    assert len(seen) >= 4 and len(held_out) == 1
    # Each pair lists its task on the test kingdoms first (bench/quality.py), then on dev.
    assert sorted(p.tasks for p in toy.pairs.values()) == sorted((t, t + "_dev") for t in seen)
    for pair in toy.pairs:
        assert f"large-ft-{pair}" in toy.models
    assert "large-ft-mix" in toy.models
    assert {p.base for p in toy.pairs.values()} == {"small-base"}


def test_dev_and_test_kingdoms_are_disjoint_from_fine_tuning_and_each_other(world_script):
    """dev: the first kingdoms of the order (the test set before version 2.0, on which the
    world was designed); test: kingdoms of the training pool that no fine-tuning set uses."""
    world = world_script.build_world(1500, 250)
    tuned = set().union(*world.finetune.values())
    assert len(world.dev) == len(set(world.dev)) == 250 and len(world.test) == len(set(world.test)) == 250
    assert not set(world.dev) & set(world.train) and not set(world.dev) & tuned
    assert set(world.test) <= set(world.train) and not set(world.test) & tuned
    assert not set(world.dev) & set(world.test)
    seen = [t.name for t in world_script.TASKS if not t.held_out]
    assert sorted(world.finetune) == sorted(seen) and all(len(e) == 300 for e in world.finetune.values())


@pytest.mark.parametrize("split", ["test", "dev"])
def test_task_data_is_the_scripts_world_and_prompts_match_training(tmp_path, monkeypatch, world_script, split):
    """The committed questions of each split are those the script writes; lm-eval renders the
    very prompts the experts were tuned on; no fine-tuning kingdom is asked."""
    monkeypatch.chdir(tmp_path)  # data paths resolve from the YAML, not the working directory
    world = world_script.build_world(1500, 250)
    tuned = set().union(*world.finetune.values())
    manager = TaskManager(include_path=str(REPO / "tasks" / "toy"))
    for task in world_script.TASKS:
        expected = world_script.split_rows(world, task, split)
        assert {r["entity"] for r in expected} == set(world.dev if split == "dev" else world.test)
        name = task.name + ("_dev" if split == "dev" else "")
        lm_task = next(iter(manager.load_task_or_group([name]).values()))
        docs = list(lm_task.test_docs())
        assert [dict(d) for d in docs] == expected, name
        for doc in docs[:20]:
            assert lm_task.doc_to_text(doc) == task.text(doc["entity"])
            if task.kind == "choice":
                assert lm_task.doc_to_choice(doc)[lm_task.doc_to_target(doc)] == doc["answer"]
            else:
                assert lm_task.doc_to_target(doc) == doc["answer"]
        assert not {d["entity"] for d in docs} & tuned


def test_pretraining_trains_every_prompt_token_but_never_shows_a_format(toy, world_script, pretraining):
    """Every token of every task prompt (around the kingdom's name) occurs in the pretraining
    text, so none keeps a random embedding; no prompt's fixed part does."""
    world, text = pretraining
    assert [x for x in world_script.task_skeletons() if any(x in t for t in text)] == []
    tok = transformers.AutoTokenizer.from_pretrained(toy.models["large-base"].location)
    trained = {i for ids in tok(text, add_special_tokens=False).input_ids for i in ids}
    for task in world_script.TASKS:
        entity = world.test[0]
        prompt = set(tok(task.text(entity), add_special_tokens=False).input_ids)
        name = set(tok(" " + entity, add_special_tokens=False).input_ids) | set(tok(entity, add_special_tokens=False).input_ids)
        missing = prompt - name - trained
        assert not missing, (task.name, tok.convert_ids_to_tokens(sorted(missing)))


def test_prompt_final_labels_also_stand_right_before_values(world_script, pretraining):
    """The label that ends each prompt ("Answer:", "Blank:", "####", "|", "Choice:") is, in the
    pretraining text, also followed by a value (a record's), for every relation, not only by a
    sentence: otherwise the large base never puts a value that starts no sentence (an emblem
    animal) right after such a label, and the task cannot transfer."""
    world, paragraphs = pretraining
    text = "\n".join(paragraphs)
    owner = {v: rel for rel, values in world.values.items() for v in values}
    for task in world_script.TASKS:
        label = task.prompt.split("{e}")[-1].split("\n")[-1].strip()
        after = re.findall(re.escape(label) + r" (\w+)\.", text)
        relations = {owner[v] for v in after if v in owner}
        assert relations == set(world_script.RELATIONS), (task.name, label, relations)


def test_committed_world_transfers_on_every_seen_task(toy):
    """bench/quality.py's target on the committed models, all 250 questions: each seen task's
    pair fused by ``dlf`` beats the large base and the small expert alone by more than two
    standard errors (lm-eval's exact match, through lm-eval)."""
    quality = _load(REPO / "bench" / "quality.py", "quality_bench")
    manager = TaskManager(include_path=str(REPO / "tasks" / "toy"))
    tasks = {pair: p.tasks[0] for pair, p in toy.pairs.items()}
    base = quality.score(quality.hf(Path(toy.models[toy.large].location), 32), list(tasks.values()), manager, None)
    for pair, task in tasks.items():
        expert = quality.score(quality.hf(Path(toy.models[toy.pairs[pair].expert].location), 32), [task], manager, None)
        fused = quality.score(DLFLM(registry="toy", experts=pair, solver="dlf", batch_size=32), [task], manager, None)
        margins = [quality.margin(fused[task], other[task]) for other in (base, expert)]
        assert min(margins) > 2, (task, fused[task], base[task], expert[task])


def test_training_is_deterministic(tmp_path):
    """Two runs of the script (shrunk to seconds) write byte-identical weights and data."""
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run(
            [sys.executable, str(SCRIPT), "--entities", "60", "--dev", "20", "--test", "4", "--paragraphs", "300",
             "--small-steps", "3", "--large-steps", "2", "--ft-examples", "16", "--ft-epochs", "1",
             "--vocab", "400", "--out", str(out)],
            check=True, capture_output=True, text=True,
        )
        files = sorted(p for p in out.rglob("*") if p.suffix in (".safetensors", ".jsonl", ".json"))
        digests.append({str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert len(digests[0]) >= 11 * 2 + 2 * 5
    assert digests[0] == digests[1]
    rows = [json.loads(line) for line in (tmp_path / "a" / "tasks/toy/data/toy_mc.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["choices"][r["label"]] == r["answer"] for r in rows)
    dev = [json.loads(line) for line in (tmp_path / "a" / "tasks/toy/data/dev/toy_mc.jsonl").read_text().splitlines()]
    assert len(dev) == 20 and not {r["entity"] for r in dev} & {r["entity"] for r in rows}


def test_prompt_routing_sends_each_seen_task_to_its_own_pair(world_script, toy):
    """route=prompt, no task labels, on the test kingdoms: every seen task's prompts go to
    its own pair more often than to any other, and more than half of all of them do
    (routing that ignores the prompt sends a quarter at best)."""
    from lm_eval.api.instance import Instance

    world = world_script.build_world(1500, 250)
    lm = DLFLM(registry="toy", experts="all", route="prompt", batch_size=64)
    own = {task: pair for pair, spec in toy.pairs.items() for task in spec.tasks}
    right = total = 0
    for task in (t for t in world_script.TASKS if not t.held_out):
        rows = world_script.split_rows(world, task, "test")
        requests = [Instance("generate_until", None, (task.text(r["entity"]), {}), i, metadata=(task.name, i, 1)) for i, r in enumerate(rows)]
        chosen = lm._pairs_by_prompt(requests)
        counts = {pair: chosen.count(pair) for pair in toy.pairs}
        assert max(counts, key=counts.get) == own[task.name], (task.name, counts)
        right, total = right + counts[own[task.name]], total + len(rows)
    assert right / total > 0.5, right / total
