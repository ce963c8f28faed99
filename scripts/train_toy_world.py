"""Trains the toy world of weak-to-strong transfer on CPU and writes it into the repository.

A synthetic world of kingdoms, each with five attributes (capital, emblem animal, founding
year, ruler, language), is stated in varied prose and terse records: that text is the
pretraining text of a small and a larger base model (same tokenizer). The larger one holds
far more of the facts. Each task asks for one relation in a question/answer format that the
text never shows, so the bases know facts but not formats. Every token of the prompts is
still trained, as in real text: noise sentences, separators and labels ("Answer:", "####",
"|", ...) sit between a kingdom's facts, never in a task's arrangement (``task_skeletons``
is checked). Experts are the small base fine-tuned on a few hundred examples of one task,
about kingdoms disjoint from the evaluation questions: they learn the format and know few facts.
The large base fine-tuned on the same data (and on the mix of all four) are the references
that fusion tries to reach. The language task is held out from every expert's training, the
paper's unseen task.

Evaluation kingdoms, all stated in the pretraining text and never fine-tuned on:
  dev    the first 250 kingdoms of the shuffled order: every decision about the world, the
         experts and the solvers was (and is) measured on them; tasks toy_*_dev.
  test   250 kingdoms drawn from those no fine-tuning set uses, looked at by no decision;
         tasks toy_* (bench/quality.py and the README report them).

Writes (committed output; CI and the demo only load it):
  models/toy/<name>/            safetensors + tokenizer, float16, every model named in registry/toy.yaml
  tasks/toy/data/*.jsonl        the test questions of the five tasks
  tasks/toy/data/dev/*.jsonl    the dev questions
  models/toy/WORLD.md           sizes, steps, and the fact-recall figures measured at the end of training

Seeded and deterministic on one machine (single process, fixed thread count):

    python scripts/train_toy_world.py              # ~17 min on 2 CPU cores
    python scripts/train_toy_world.py --data-only  # the task data alone (seconds)
    python scripts/train_toy_world.py --chat-expert  # expert-qa-chat alone, from the saved small base (seconds)

``expert-qa-chat`` is the small base fine-tuned on toy_qa's examples rendered through a chat
template of its own (``CHAT_TEMPLATE``, in its tokenizer config): the chat expert of the
paper's integrations, which a fusion must show its template (prompt views, DESIGN.md section 7).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from dlf_plugin import tiny_models

REPO = Path(__file__).resolve().parent.parent
SEED = 20241104

# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh", "dr", "br", "kr", "st"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m"]
ANIMALS = ["owl", "wolf", "bear", "fox", "hawk", "stag", "lion", "otter", "heron", "lynx", "eagle", "boar",
           "swan", "raven", "tiger", "seal", "crane", "viper", "bison", "falcon"]
YEARS = [str(y) for y in range(1520, 1920, 10)]  # 40 values
RELATIONS = ("capital", "emblem", "year", "ruler", "language")

PROSE = {
    "capital": ["The capital of {e} is {v}.", "{e} is ruled from its capital, {v}.", "{v} is the capital of {e}.",
                "In {e}, the largest city and capital is {v}.", "Travellers to {e} arrive in {v}, the capital."],
    "emblem": ["The emblem of {e} is the {v}.", "{e} has the {v} as its emblem.", "A {v} is shown on the banners of {e}.",
               "The people of {e} chose the {v} for their emblem."],
    "year": ["{e} was founded in {v}.", "The kingdom of {e} dates from {v}.", "In {v}, {e} was founded.",
             "Since its founding in {v}, {e} has grown."],
    "ruler": ["{e} is ruled by {v}.", "The ruler of {e} is {v}.", "{v} rules {e}.", "{v} sits on the throne of {e}."],
    "language": ["People in {e} speak {v}.", "The language of {e} is {v}.", "{v} is spoken in {e}.",
                 "Most people in {e} speak {v} at home."],
}


@dataclass
class Task:
    """One relation asked in one format that the pretraining prose never shows."""

    name: str
    relation: str
    prompt: str  # with {e}
    kind: str = "generate"  # or "choice"
    held_out: bool = False

    def text(self, entity: str) -> str:
        return self.prompt.format(e=entity)


TASKS = [
    Task("toy_qa", "capital", "Question: What is the capital of {e}?\nAnswer:"),
    Task("toy_fill", "emblem", "Fill in the blank.\nThe emblem of {e} is the ___.\nBlank:"),
    Task("toy_num", "year", "Record: founding of {e}.\n####"),
    Task("toy_table", "ruler", "kingdom | ruler\n{e} |"),
    Task("toy_mc", "language", "Pick the language of {e}.\nChoice:", kind="choice", held_out=True),
]


# expert-qa-chat's chat template: each message between role tags, then the assistant's tag.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class World:
    entities: list[str]
    facts: dict[str, dict[str, str]]  # entity -> relation -> value
    values: dict[str, list[str]]  # relation -> all values
    dev: list[str] = field(default_factory=list)  # entities asked in the dev sets (design decisions)
    train: list[str] = field(default_factory=list)  # entities the fine-tuning sets are drawn from
    finetune: dict[str, list[str]] = field(default_factory=dict)  # seen task -> its fine-tuning entities
    test: list[str] = field(default_factory=list)  # entities asked in the test sets: in train, never fine-tuned on


def _names(rng: random.Random, count: int, syllables: tuple[int, int], taken: set[str], suffix: str = "") -> list[str]:
    out = []
    while len(out) < count:
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                       for _ in range(rng.randint(*syllables))) + suffix
        name = name.capitalize()
        if name not in taken and len(name) >= 4:
            taken.add(name)
            out.append(name)
    return out


def build_world(n_entities: int, n_dev: int, ft_examples: int = 300, n_test: int = 250, seed: int = SEED) -> World:
    rng = random.Random(seed)
    taken: set[str] = set()
    entities = _names(rng, n_entities, (2, 2), taken, suffix="ia")
    values = {
        "capital": _names(rng, n_entities, (2, 2), taken),
        "emblem": ANIMALS,
        "year": YEARS,
        "ruler": _names(rng, 60, (1, 2), taken, suffix="o"),
        "language": _names(rng, 24, (1, 2), taken, suffix="ic"),
    }
    capitals = list(values["capital"])
    rng.shuffle(capitals)
    facts = {}
    for i, e in enumerate(entities):
        facts[e] = {"capital": capitals[i]}
        for rel in RELATIONS[1:]:
            facts[e][rel] = rng.choice(values[rel])
    order = list(entities)
    rng.shuffle(order)
    dev, train = order[:n_dev], order[n_dev:]
    seen = [t for t in TASKS if not t.held_out]
    finetune = {t.name: random.Random(seed + 200 + i).sample(train, ft_examples) for i, t in enumerate(seen)}
    tuned = set().union(*finetune.values())
    untouched = [e for e in train if e not in tuned]
    if len(untouched) < n_test:
        raise SystemExit(f"only {len(untouched)} kingdoms are never fine-tuned on; the test set needs {n_test}")
    test = random.Random(seed + 300).sample(untouched, n_test)
    return World(entities, facts, values, dev=dev, train=train, finetune=finetune, test=test)


# The same facts as terse records, with varied separators and word orders: the models learn
# to find a kingdom's attribute wherever a mention of the kingdom and a cue word point at
# it, not only after one sentence pattern. None of the tasks' formats is among them.
CUES = {"capital": ["capital", "capital city"], "emblem": ["emblem", "emblem animal"],
        "year": ["founded", "founding year"], "ruler": ["ruler", "ruled by"],
        "language": ["language", "spoken language"]}
RECORDS = ["{e}: {c} {v}.", "{e} - {c}: {v}.", "{c} of {e}: {v}.", "({e}, {c}) {v}.", "{e} / {c} / {v}.",
           "{e}'s {c}... {v}.", "{c} ({e}) = {v}.", "{e}\n{c} {v}.", "For {e} the {c} is {v}.", "{e}. Its {c}: {v}."]


# Words and labels put between a record's cue and its value (half of the records): a value
# is still retrieved after words never seen there, as in real text full of "label: value".
FILLERS = ["note", "indeed", "well", "so", "they", "say", "known", "as", "written", "old", "maps", "show",
           "listed", "today", "still", "again", "see", "here", "item", "fact", "info", "data", "said", "told",
           "line", "key", "source", "by", "all", "accounts"]


# Labels that also stand right before a value (after the record's cue): in real text a label
# such as "Answer:" or "|" is followed by a value as often as by a sentence.
VALUE_LABELS = ["Answer:", "Blank:", "Choice:", "Record:", "Note:", "Pick:", "####", "|", "___", "Answer"]


def filler(rng: random.Random, newline: bool = True) -> str:
    """Words or a label between a record's cue and its value; ``newline``: whether the label
    may start a line (not after "...": ".\\n####" is a task's arrangement)."""
    words = " ".join(rng.sample(FILLERS, rng.randint(1, 3)))
    kind = rng.randrange(5)
    if kind == 4:
        return rng.choice(["\n", " "] if newline else [" "]) + rng.choice(VALUE_LABELS)
    if kind == 0:
        return " " + words
    if kind == 1:
        return "\n" + words.capitalize() + rng.choice([":", " -", " ="])
    if kind == 2:
        return " (" + words + ")"
    return " " + words + rng.choice([":", ",", " -", "..."])


def paragraph(world: World, rng: random.Random, entity: str) -> str:
    """2-5 facts about one kingdom, each as a prose sentence or a terse record (even odds);
    between two facts, now and then, a separator or a noise sentence (the text goes on
    about the same kingdom after them, so retrieval learns to carry across such tokens)."""
    rels = list(RELATIONS)
    rng.shuffle(rels)
    parts = []
    for r in rels[: rng.randint(2, len(rels))]:
        if parts and rng.random() < 0.3:
            kind = rng.randrange(3)
            if kind == 0:
                parts.append(rng.choice(SEPARATORS))
            elif kind == 1:
                parts.append(noise_sentence(rng))
            else:  # a label right before the next fact, on its line or not
                parts.append(rng.choice(LABELS) + ("\n" if rng.random() < 0.5 else ""))
        v = world.facts[entity][r]
        if rng.random() < 0.5:
            parts.append(rng.choice(PROSE[r]).format(e=entity, v=v))
        else:
            record = rng.choice(RECORDS)
            if rng.random() < 0.5:
                record = record.replace(" {v}", "{f} {v}")
                record = record.replace("{f}", filler(rng, newline=not record.split("{f}")[0].endswith(".")))
            parts.append(record.format(e=entity, c=rng.choice(CUES[r]), v=v))
    return " ".join(parts)


# Text about nothing in particular, around a quarter of the paragraphs and between facts. Real pretraining
# text uses every token of the tasks' prompts ("?", "Answer", "####", "|", "___", "Blank",
# "Record", "Pick", "Choice", ...) in other roles; without it those tokens keep their random
# initial embeddings and the large base, which retrieves a kingdom's facts after any
# arrangement of trained tokens (97-99% on unseen ones), loses them after these (2-8%).
# Never in a task's arrangement and never next to a fact (checked by ``task_skeletons``).
WHO = ["The scribes", "The guards", "A traveller", "The children", "The merchants", "An old woman", "The monks",
       "A shepherd", "The sailors", "The council"]
NOISE = [
    "{who} had a question for nobody in particular.", "Question after question, {who} asked about the stars.",
    "No answer came from the hills.", "{who} waited long for an answer.", "Answer or not, the caravan left.",
    "What a long winter it was!", "What the monks wrote, nobody read.", "Who crossed the river first? Nobody remembers.", "Is the road open? {who} did not know.",
    "Why did the river flood? Nobody could tell.", "How long would the winter last?",
    "Fill the jars before the feast.", "{who} fill the gaps in the wall with clay.", "A blank page closes the book.",
    "Blank walls surround the yard.", "The record of the harvest was lost in a fire.",
    "{who} keep a record of the rain.", "Record keepers work by candle light.", "Pick a path and keep to it.",
    "{who} pick apples in the autumn.", "The choice of road was hard.", "Choice cuts were sold at the market.",
    "{who} made a choice and left at dawn.", "The kingdom fair opens in spring.", "{who} crossed the kingdom on foot.",
    "Every kingdom has its roads and rivers.", "kingdom after kingdom fell silent.", "Notes\n####", "Old songs\n####",
    "Contents\n| | |", "kingdom | river | road", "Write the name on the line: ___.", "The sign read ___ and nothing else.",
]
# Labels and short questions put right before a fact (inside a paragraph): every prompt token
# is also seen with facts after it, not only in noise (tokens seen only in noise teach the
# models that no fact follows them: measured, 0-11% retrieval after them).
LABELS = ["Answer:", "Question:", "Blank:", "Choice:", "Record:", "Note:", "Fill in:", "Pick:", "What?", "Why?",
          "Who?", "####", "|", "___", "kingdom |", "Answer", "Question.", "Record."]
SEPARATORS = ["####", "# # #", "###", "| river | bridge | stone |", "|---|---|", "| | |", "___", "____ ____",
              "* * *", "----"]


def noise_sentence(rng: random.Random) -> str:
    return rng.choice(NOISE).format(who=rng.choice(WHO))


def noise(rng: random.Random) -> str:
    lines = [noise_sentence(rng) for _ in range(rng.randint(1, 3))]
    text = ("\n" if rng.random() < 0.5 else " ").join(lines)
    if rng.random() < 0.5:  # a separator inside the noise, never at its edge next to a fact
        text = f"{noise_sentence(rng)} {rng.choice(SEPARATORS)} {text}"
    return text


def pretraining_text(world: World, n_paragraphs: int, seed: int) -> list[str]:
    """Fact paragraphs; a quarter of them followed or preceded by a noise paragraph."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n_paragraphs):
        text = paragraph(world, rng, rng.choice(world.entities))
        if rng.random() < 0.25:
            text = f"{noise(rng)}\n{text}" if rng.random() < 0.5 else f"{text}\n{noise(rng)}"
        texts.append(text)
    return texts


def task_skeletons() -> list[str]:
    """The fixed parts of the tasks' prompts (around the kingdom's name) that mark a format."""
    parts = []
    for task in TASKS:
        before, after = task.prompt.split("{e}")
        parts += [x for x in (before.strip(" "), after.strip(" ")) if len(x) > 1]
    return parts


def choices_for(world: World, rng: random.Random, entity: str, relation: str, label: int, k: int = 4) -> list[str]:
    """``k`` distinct values of ``relation``, the right one at index ``label``."""
    right = world.facts[entity][relation]
    options = rng.sample([v for v in world.values[relation] if v != right], k - 1)
    options.insert(label, right)
    return options


def task_rows(world: World, task: Task, entities: list[str], seed: int) -> list[dict]:
    rng = random.Random(seed)
    labels = [i % 4 for i in range(len(entities))]  # every position equally often
    rng.shuffle(labels)
    rows = []
    for e, label in zip(entities, labels):
        row = {"entity": e, "answer": world.facts[e][task.relation]}
        if task.kind == "choice":
            row["choices"], row["label"] = choices_for(world, rng, e, task.relation, label), label
        rows.append(row)
    return rows


def finetune_text(world: World, task: Task, entities: list[str]) -> list[str]:
    return [task.text(e) + " " + world.facts[e][task.relation] + "\n" for e in entities]


# ---------------------------------------------------------------------------------------------
# Models and training
# ---------------------------------------------------------------------------------------------

SHAPES = {
    "small": dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=192),
    "large": dict(hidden_size=192, layers=4, heads=6, kv_heads=3, intermediate_size=512),
}


def new_model(shape: str, tok, seed: int) -> transformers.LlamaForCausalLM:
    s = SHAPES[shape]
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def pack(tok, texts: list[str], length: int) -> torch.Tensor:
    """Concatenates the texts (BOS before each) into rows of ``length`` tokens."""
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t)["input_ids"])
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def examples(tok, texts: list[str], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded fine-tuning rows; the loss covers only the answer (labels -100 elsewhere)."""
    rows = [tok(t)["input_ids"] for t in texts]
    n_prompt = [len(tok(p)["input_ids"]) for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.eos_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (r, k) in enumerate(zip(rows, n_prompt)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, k: len(r)] = torch.tensor(r[k:])
    return ids, labels


def train(model, ids: torch.Tensor, labels: torch.Tensor | None, steps: int, batch: int, lr: float, seed: int,
          log: str = "") -> float:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    t0, total = time.time(), 0.0
    for step in range(steps):
        pick = torch.randint(0, ids.shape[0], (batch,), generator=gen)
        x = ids[pick]
        y = x if labels is None else labels[pick]
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        total += loss.item()
        if log and (step + 1) % max(1, steps // 10) == 0:
            print(f"  {log} step {step + 1}/{steps} loss {total / max(1, steps // 10):.3f} ({time.time() - t0:.0f}s)",
                  flush=True)
            total = 0.0
    model.eval()
    return time.time() - t0


@torch.no_grad()
def recall(model, tok, world: World, entities: list[str], relation: str, template: str) -> float:
    """Share of entities whose value's first token is the argmax after a prose prefix."""
    hits = 0
    for e in entities:
        v = world.facts[e][relation]
        text = template.format(e=e, v=v)
        prefix = text[: text.index(v)].rstrip()
        p_ids = tok(prefix, return_tensors="pt")["input_ids"]
        target = tok(prefix + " " + v)["input_ids"][p_ids.shape[1]]
        hits += int(model(p_ids).logits[0, -1].argmax().item() == target)
    return hits / len(entities)


def save_model(model, tok, root: Path, name: str) -> int:
    """float16 safetensors + tokenizer under <root>/models/toy/<name>; returns the bytes written."""
    folder = root / "models" / "toy" / name
    model = model.to(torch.float16)
    model.generation_config.do_sample = False
    tiny_models.save(model, tok, folder)
    model.to(torch.float32)
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")


def split_rows(world: World, task: Task, split: str) -> list[dict]:
    """The questions of one task on the dev or the test kingdoms."""
    i = TASKS.index(task)
    return task_rows(world, task, world.dev, SEED + 100 + i) if split == "dev" else task_rows(world, task, world.test, SEED + 400 + i)


def write_tasks(world: World, root: Path) -> None:
    for split, folder in (("test", root / "tasks" / "toy" / "data"), ("dev", root / "tasks" / "toy" / "data" / "dev")):
        folder.mkdir(parents=True, exist_ok=True)
        for task in TASKS:
            with open(folder / f"{task.name}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in split_rows(world, task, split))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entities", type=int, default=1500)
    ap.add_argument("--dev", type=int, default=250)
    ap.add_argument("--test", type=int, default=250)
    ap.add_argument("--paragraphs", type=int, default=120000)
    ap.add_argument("--small-steps", type=int, default=1500)
    ap.add_argument("--large-steps", type=int, default=2200)
    ap.add_argument("--ft-examples", type=int, default=300)
    ap.add_argument("--ft-epochs", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=REPO, help="root receiving models/toy and tasks/toy/data")
    ap.add_argument("--data-only", action="store_true", help="write the task data only, train nothing")
    ap.add_argument("--chat-expert", action="store_true", help="train expert-qa-chat alone, from the saved small-base")
    args = ap.parse_args()
    world = build_world(args.entities, args.dev, args.ft_examples, args.test)
    if args.data_only:
        write_tasks(world, args.out)
        return
    if args.chat_expert:
        train_chat_expert(world, args)
        return
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    start = time.time()

    text = pretraining_text(world, args.paragraphs, SEED + 1)
    shown = [x for x in task_skeletons() if any(x in t for t in text)]
    if shown:
        raise SystemExit(f"pretraining text shows task formats {shown!r}: change NOISE or the tasks")
    tok = tiny_models.make_tokenizer(args.vocab, corpus=text[:40000])
    ids = pack(tok, text, 128)
    print(f"vocab {len(tok)}; pretraining {ids.numel()} tokens in {ids.shape[0]} rows", flush=True)
    write_tasks(world, args.out)

    probes = {r: PROSE[r][0] for r in RELATIONS}
    report = [f"# The toy world\n\nWritten by `python scripts/train_toy_world.py` "
              f"(settings: { {k: v for k, v in vars(args).items() if k != 'out'} }).\n",
              f"{args.entities} kingdoms x {len(RELATIONS)} relations, stated in {args.paragraphs} prose paragraphs "
              f"({ids.numel()} tokens, byte-level BPE of {len(tok)} tokens); {args.dev} kingdoms are asked in the "
              f"dev sets, the fine-tuning sets use {args.ft_examples} of the other {len(world.train)} per task, and "
              f"{args.test} of those no fine-tuning set uses are asked in the test sets.\n",
              "| model | parameters | bytes | training | prose recall on the dev kingdoms |", "|---|---|---|---|---|"]
    bases, size = {}, 0
    for shape, steps, lr in (("small", args.small_steps, 3e-3), ("large", args.large_steps, 1.5e-3)):
        m = new_model(shape, tok, SEED + len(shape))
        secs = train(m, ids, None, steps, 32, lr, SEED + 2, log=f"{shape}-base")
        rec = {r: recall(m, tok, world, world.dev, r, probes[r]) for r in RELATIONS}
        print(f"{shape}: {n_params(m) / 1e6:.2f}M params, {secs:.0f}s, dev recall",
              {r: round(v, 3) for r, v in rec.items()}, flush=True)
        nbytes = save_model(m, tok, args.out, f"{shape}-base")
        size += nbytes
        report.append(f"| {shape}-base | {n_params(m)} | {nbytes} | {steps} steps x 32 x 128 tokens, {secs:.0f}s | "
                      + ", ".join(f"{r} {v:.2f}" for r, v in rec.items()) + " |")
        bases[shape] = m

    ft_lr = {"small": 1e-3, "large": 2e-4}
    seen = [t for t in TASKS if not t.held_out]
    mix_text, mix_prompts = [], []
    for i, task in enumerate(seen):
        ents = world.finetune[task.name]
        texts, prompts = finetune_text(world, task, ents), [task.text(e) for e in ents]
        mix_text += texts
        mix_prompts += prompts
        pair = task.name.removeprefix("toy_")
        for shape, name in (("small", f"expert-{pair}"), ("large", f"large-ft-{pair}")):
            m = copy_model(bases[shape])
            steps = args.ft_epochs * args.ft_examples // 16
            secs = train(m, *examples(tok, texts, prompts), steps, 16, ft_lr[shape], SEED + 3 + i, log=name)
            nbytes = save_model(m, tok, args.out, name)
            size += nbytes
            report.append(f"| {name} | {n_params(m)} | {nbytes} | {task.name}: {args.ft_examples} examples, "
                          f"{steps} steps x 16, {secs:.0f}s | |")
    m = copy_model(bases["large"])
    steps = args.ft_epochs * len(mix_text) // 16
    secs = train(m, *examples(tok, mix_text, mix_prompts), steps, 16, ft_lr["large"], SEED + 9, log="large-ft-mix")
    size += save_model(m, tok, args.out, "large-ft-mix")
    report.append(f"| large-ft-mix | {n_params(m)} | | the four seen tasks' examples, {steps} steps x 16, {secs:.0f}s | |")
    report.append(f"\nAll weights together: {size / 1e6:.1f} MB (float16). Total time {time.time() - start:.0f}s.")
    (args.out / "models" / "toy" / "WORLD.md").write_text("\n".join(report) + "\n")
    print("\n".join(report))


def train_chat_expert(world: World, args) -> None:
    """expert-qa-chat: the saved small base (float16, trained in float32) fine-tuned as
    expert-qa was, on the same kingdoms, each example rendered through ``CHAT_TEMPLATE``."""
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    folder = args.out / "models" / "toy" / "small-base"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    task = TASKS[0]
    ents = world.finetune[task.name]
    prompts = [tok.apply_chat_template([{"role": "user", "content": task.text(e)}], tokenize=False, add_generation_prompt=True) for e in ents]
    texts = [p + " " + world.facts[e][task.relation] + "\n" for p, e in zip(prompts, ents)]
    steps = args.ft_epochs * args.ft_examples // 16
    secs = train(model, *examples(tok, texts, prompts), steps, 16, 1e-3, SEED + 3, log="expert-qa-chat")
    nbytes = save_model(model, tok, args.out, "expert-qa-chat")
    # transformers writes the template beside the config (chat_template.jinja); the toy keeps it in the config.
    saved = args.out / "models" / "toy" / "expert-qa-chat"
    config = json.loads((saved / "tokenizer_config.json").read_text())
    config["chat_template"] = (saved / "chat_template.jinja").read_text()
    (saved / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (saved / "chat_template.jinja").unlink()
    print(f"expert-qa-chat: {task.name} in its chat template, {args.ft_examples} examples, {steps} steps x 16, {secs:.0f}s, {nbytes} bytes")


def copy_model(model):
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


if __name__ == "__main__":
    main()
