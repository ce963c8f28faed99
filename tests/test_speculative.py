"""Speculative fused decoding (``speculate=k``): the same tokens as plain fused greedy
decoding, or sampled the same distribution, with fewer large-model passes where the drafting
expert agrees with the fusion."""

from __future__ import annotations

import collections
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers
from lm_eval.api.instance import Instance

import reference
from toy_prompts import PROMPTS, dev_prompts
from dlf_plugin.engine import LookupHistory, Sampling, _Lookup, _Stream, speculative_choice
from dlf_plugin.lm import DLFLM
from dlf_plugin.registry import RegistryError

REPO = Path(__file__).resolve().parent.parent


def toy_requests(count: int, until=("\n",), max_gen_toks: int = 12, shown: bool = False):
    """Dev kingdoms' prompts of every seen task, interleaved (ragged lengths, rows that agree
    with the drafter more or less). ``shown``: each prompt after one solved example of its
    task (the next dev kingdom's), a context to copy drafts from."""
    kwargs = {"until": list(until), "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", None, (text, dict(kwargs)), i) for i, text in enumerate(dev_prompts(count, shown))]


def shown_requests(count: int):
    """``toy_requests`` after solved examples, stopping at "?": rows end at the next question
    the models write, at different places."""
    return toy_requests(count, until=("?",), max_gen_toks=24, shown=True)


def qa_batch(shown: bool, new_tokens: int):
    """The qa pair at batch 4 over one dev prompt of each seen task (after a solved example
    where ``shown``): ``(lm, context, mask, plain fused greedy decoding's new_tokens)``."""
    lm = DLFLM(registry="toy", experts="qa", batch_size=4)
    requests = shown_requests(1) if shown else toy_requests(1)
    context, mask = lm.tok_batch_encode([request.args[0] for request in requests])
    return lm, context, mask, lm.engine.generate(context, mask, new_tokens, Sampling(), -1, 0)


def rounds_read(monkeypatch, lm: DLFLM, batch: int) -> list:
    """From now, every large-model read of ``lm``'s engine (the prefill's first) as
    ``(ids as lists, tokens each row had made before it)``: a round's fed x and drafts."""
    reads, made = [], [0] * batch
    large = lm.engine.models[lm.engine.large]
    hidden = large.hidden
    monkeypatch.setattr(large, "hidden", lambda ids, *a, **k: reads.append((ids.tolist(), list(made))) or hidden(ids, *a, **k))

    def kept(fused, rows, *rest):
        for row in rows:
            made[row] += 1

    lm.engine.observer = kept
    return reads


def example_solver():
    sys.path.insert(0, str(REPO / "tests" / "example_solver_plugin"))
    from dlf_example_solver import AgreementSolver

    return AgreementSolver


@pytest.mark.parametrize("solver", ["static", "dlf-grid", "dlf", "dlf fixed", "dlf-joint", "plugin"])
def test_same_tokens_as_plain_fused_greedy_with_ragged_batches_and_stop_strings(solver, monkeypatch, taken_over):
    """Toy world, pairs qa + fill (qa's expert drafts), 16 prompts at batch size 8 with each
    row's own stop strings (speculating, 8 rows that refill: the second 8 prompts take over
    rows that stop): the text equals plain decoding's for k = 2 and 4, with drafts both
    accepted and rejected. ``dlf fixed``: the schedule accelerators take by default."""
    options = {}
    if solver == "dlf fixed":
        solver, options = "dlf", {"schedule": "fixed"}
    if solver == "plugin":
        from dlf_plugin import hooks

        monkeypatch.setattr(hooks, "get_solvers", lambda: {"agreement": (example_solver(), "example")})
        solver = "agreement"
    plain = DLFLM(registry="toy", experts="qa+fill", solver=solver, batch_size=8, **options)
    # Stop strings that cut rows at different places: "\n", and a letter some answers hold.
    requests = toy_requests(4, until=("\n", "e"))
    expected = plain.generate_until(requests)
    assert len({len(text) for text in expected}) > 2
    for k in (2, 4):
        taken_over.clear()
        fast = DLFLM(registry="toy", experts="qa+fill", solver=solver, batch_size=8, speculate=k, **options)
        assert fast.generate_until(toy_requests(4, until=("\n", "e"))) == expected
        totals = fast.get_model_info()["dlf"]["speculation"]
        # Drafts were accepted, and some rejected: both paths ran; rows that stopped took
        # the second group's prompts (16 requests, 8 rows).
        assert 0 < totals["accepted"] < totals["drafted"]
        assert taken_over and (totals["calls"], totals["prefills"]) == (1, 2)


def _earliest_copy(tokens: list[int], length: int) -> list[int]:
    """Brute force: the ``length`` tokens that followed the earliest earlier occurrence of
    the last three tokens, else of the last two; none without one."""
    for n in (3, 2):
        for start in range(len(tokens) - n):
            if tokens[start : start + n] == tokens[-n:]:
                return tokens[start + n : start + n + length]
    return []


def test_lookup_copies_what_followed_the_earliest_earlier_occurrence():
    """``_Lookup``'s tables, built as tokens arrive, against a scan of the whole context:
    300 random sequences over 2-6 token ids, asked after every token."""
    rng = random.Random(0)
    for _ in range(300):
        vocab = rng.randint(2, 6)
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 10))]
        lookup = _Lookup(tokens)
        for _ in range(25):
            for length in (1, 3, 8):
                assert lookup.chain(length) == _earliest_copy(tokens, length), (tokens, length)
            tokens.append(rng.randrange(vocab))
            lookup.append(tokens[-1])


def _copy_with_history(tokens: list[int], segments: list[list[int]], length: int) -> tuple[list[int], bool]:
    """Brute force: per n-gram size (3, then 2), the earliest earlier occurrence in the row's
    own tokens, else the first in the earlier generations (in the order they came), the copy
    ending where its generation ends; and whether it came from them."""
    for n in (3, 2):
        if len(tokens) < n:
            continue
        for source, pooled in [(tokens, False)] + [(segment, True) for segment in segments]:
            for start in range(len(source) - n):
                if source[start : start + n] == tokens[-n:]:
                    return source[start + n : start + n + length], pooled
    return [], False


def test_lookup_history_copies_from_earlier_generations_where_the_row_has_none(monkeypatch):
    """``lookup_history``: a row's own three-token match first, then the earlier
    generations', then its own two-token match, then theirs; a copy never runs from one
    generation into the next; past ``TOKENS`` pooled tokens (40 here) no generation is added.
    300 random rows and histories over 2-6 token ids, asked after every token, against a scan."""
    monkeypatch.setattr(LookupHistory, "TOKENS", 40)
    rng = random.Random(1)
    seen = collections.Counter()
    for _ in range(300):
        vocab = rng.randint(2, 6)
        history, kept, size = LookupHistory(), [], 0
        for _ in range(rng.randint(0, 8)):
            segment = [rng.randrange(vocab) for _ in range(rng.randint(0, 9))]
            if size < 40 and segment:
                kept.append(segment)
                size += len(segment)
            else:
                seen["refused"] += bool(segment)
            history.add(segment)
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(0, 6))]
        lookup = _Lookup(tokens)
        for _ in range(20):
            for length in (1, 3, 8):
                expected, pooled = _copy_with_history(tokens, kept, length)
                assert (lookup.chain(length, history), lookup.pooled) == (expected, pooled), (tokens, kept, length)
                seen["pooled"] += pooled
                seen["cut at its generation's end"] += pooled and 0 < len(expected) < length
            tokens.append(rng.randrange(vocab))
            lookup.append(tokens[-1])
    assert all(seen[key] > 0 for key in ("refused", "pooled", "cut at its generation's end")), seen


@pytest.mark.parametrize("batch_size", [1, 4])
def test_copies_from_earlier_requests_give_the_tokens_of_plain_fused_greedy(batch_size):
    """``lookup_history=True`` through lm-eval: 12 prompts making 16 tokens each (the toy
    models go on past the answer, in lines like the ones before), one call a request at
    batch size 1 (the history lives across calls) and rows that refill at 4 (requests that
    stop add their generations while others run). The texts equal plain decoding's, copies
    came from earlier requests, and more drafts were copied than without the history."""
    requests = lambda: toy_requests(3, until=(), max_gen_toks=16)  # noqa: E731
    expected = DLFLM(registry="toy", experts="qa", batch_size=batch_size).generate_until(requests())
    copied = {}
    for history in (False, True):
        lm = DLFLM(registry="toy", experts="qa", batch_size=batch_size, speculate=3, lookup=4, lookup_history=history)
        assert lm.generate_until(requests()) == expected, history
        recorded = lm.get_model_info()["dlf"]
        assert recorded.get("lookup_history") == (True if history else None)
        copied[history] = recorded["speculation"]["copied"]
        assert (recorded["speculation"]["pooled"] > 0) == history, recorded["speculation"]
    assert copied[True] > copied[False], copied


@pytest.mark.parametrize("solver", ["static", "dlf-grid", "dlf", "plugin"])
def test_lookup_drafts_give_the_tokens_of_plain_fused_greedy(solver, monkeypatch):
    """``lookup=4`` with speculate=3 (the expert drafts where a row has no copy), with
    speculate=1 (copies only, rows without one drafting placeholders) and with speculate=5
    and draft_confidence=0.3 (rounds cut where the expert is unsure): 16 prompts after a
    solved example, in batches of 8, each row stopping at its own place: the texts equal
    plain decoding's; copies were drafted, both kept and refused. (Whether they save
    rounds is the bench's to say: in a batch a round lasts as long as its slowest row.)"""
    if solver == "plugin":
        from dlf_plugin import hooks

        monkeypatch.setattr(hooks, "get_solvers", lambda: {"agreement": (example_solver(), "example")})
        solver = "agreement"
    plain = DLFLM(registry="toy", experts="qa+fill", solver=solver, batch_size=8)
    expected = plain.generate_until(shown_requests(4))
    assert len({len(text) for text in expected}) > 2
    for k, n, c in ((3, 4, 0.0), (1, 4, 0.0), (5, 4, 0.3)):
        fast = DLFLM(registry="toy", experts="qa+fill", solver=solver, batch_size=8, speculate=k, lookup=n, draft_confidence=c)
        assert fast.generate_until(shown_requests(4)) == expected, (k, n, c)
        recorded = fast.get_model_info()["dlf"]  # what produced the results
        totals = recorded["speculation"]
        assert (recorded.get("speculate"), recorded.get("lookup"), recorded.get("draft_confidence")) == (k if k > 1 else None, n or None, c or None)
        # Copies were drafted, some kept and some refused (speculate=1: every draft a copy).
        assert totals["copied"] > 0 and 0 < totals["accepted"] < totals["drafted"], (k, n, c, totals)
        if k == 1:  # rounds drafted by copies alone, the rows without one drafting placeholders
            assert totals["lookup_rounds"] > 0, totals


def test_rows_with_copies_feed_them_in_rounds_the_expert_drafts(monkeypatch):
    """A row whose lookup never finds a copy (patched) leaves every round to the expert: the
    other rows feed their copied tokens in it (what the large model reads at a round's
    drafted positions is each such row's copy) and the expert's choices past them. Greedy
    tokens equal plain decoding's."""
    lm, context, mask, expected = qa_batch(shown=True, new_tokens=20)
    made, copies, read = [], [], []
    init, chain = _Lookup.__init__, _Lookup.chain

    def copying(self, length, history=None):
        found = [] if self is made[0] else chain(self, length, history)
        copies.append((len(read), made.index(self), found))  # the large pass this round makes next
        return found

    monkeypatch.setattr(_Lookup, "__init__", lambda self, tokens: made.append(self) or init(self, tokens))
    monkeypatch.setattr(_Lookup, "chain", copying)
    large = lm.engine.models[lm.engine.large]
    hidden = large.hidden
    monkeypatch.setattr(large, "hidden", lambda ids, *a, **k: read.append(ids.tolist()) or hidden(ids, *a, **k))
    out = lm.engine.generate_speculative(context, mask, 20, -1, 0, draft=3, lookup=4)
    assert out.tolist() == expected.tolist()
    stats = lm.engine.speculation
    assert stats["lookup_rounds"] == 0 and stats["copied"] > 0 and 0 < stats["accepted"] < stats["drafted"]
    # After the prefill, one large pass a round, reading x and two drafts per row.
    assert len(read) == stats["rounds"] + 1 and all(len(row) == 3 for ids in read[1:] for row in ids)
    fed = [(read[at][row][1:], found[:2]) for at, row, found in copies if found]
    assert fed and all(drafts[: len(copy)] == copy for drafts, copy in fed)


@pytest.mark.parametrize("lookup", [0, 4])
def test_positions_past_a_draft_no_weight_can_choose_are_left_unsolved(monkeypatch, lookup):
    """A greedy round tells the solver which positions matter: none past a draft that no
    weights within the solver's bounds make the fused argmax (the row keeps nothing after
    it). Checked round by round against a float64 brute force: a running row's first
    position left out follows a draft that loses at every point of a grid over [0, 2];
    every token kept comes from a position the solver was told matters; positions were
    left out; the tokens equal plain decoding's."""
    lm, context, mask, expected = qa_batch(shown=bool(lookup), new_tokens=20)
    rounds, kept = [], []
    fuse_round, solve = lm.engine._fuse_round, lm.engine.solver.solve

    def recording_round(hidden, running, drafts=None):
        rounds.append({"running": running.tolist(), "drafts": None if drafts is None else drafts.tolist()})
        return fuse_round(hidden, running, drafts)

    def recording_solve(inputs):
        rounds[-1]["inputs"] = inputs
        return solve(inputs)

    monkeypatch.setattr(lm.engine, "_fuse_round", recording_round)
    monkeypatch.setattr(lm.engine.solver, "solve", recording_solve)
    lm.engine.observer = lambda fused, rows, fused_rows, *rest: kept.append(fused_rows)
    out = lm.engine.generate_speculative(context, mask, 20, -1, 0, draft=3, lookup=lookup)
    assert out.tolist() == expected.tolist()
    assert len(kept) == len(rounds)  # the prefill's, then one report a round
    left_out = 0
    for entry, fused_rows in zip(rounds, kept):
        matter = entry["inputs"].row_mask.tolist()
        assert all(matter[i] for i in fused_rows)
        if entry["drafts"] is None:
            continue
        width = len(entry["drafts"][0]) + 1
        for row, running in enumerate(entry["running"]):
            if not running:
                continue
            flags = matter[row * width : (row + 1) * width]
            if all(flags):
                continue
            first = flags.index(False)
            assert first > 0 and not any(flags[first:])
            left_out += width - first
            at = row * width + first - 1  # the draft before it: chosen at no weight in [0, 2]
            one = [x[at : at + 1] for x in (entry["inputs"].base_logits, entry["inputs"].small_logits, entry["inputs"].expert_logits)]
            assert not bool(reference.chosen_somewhere(*one, torch.tensor([entry["drafts"][row][first - 1]]), (0.0, 2.0), 401))
    assert left_out > 0


@pytest.mark.parametrize("lookup", [0, 4])
def test_no_round_is_wider_than_the_tokens_a_row_may_still_make(monkeypatch, lookup):
    """max_new_tokens = 6 and speculate=4: a round never reads more positions than the
    running row with the most tokens left may still keep (a round that could only waste
    drafter calls and positions), and rounds were cut by it; the tokens equal plain
    decoding's."""
    lm, context, mask, expected = qa_batch(shown=bool(lookup), new_tokens=6)
    reads = rounds_read(monkeypatch, lm, len(context))
    out = lm.engine.generate_speculative(context, mask, 6, -1, 0, draft=4, lookup=lookup)
    assert out.tolist() == expected.tolist()
    widths = []
    for fed, made in reads[1:]:  # after the prefill's read
        widths.append(len(fed[0]))
        assert widths[-1] <= max(6 - n for n in made if n < 6), (widths[-1], made)
    if not lookup:  # rounds the expert drafts are 4 wide unless cut
        assert any(width < 4 for width in widths), widths


def test_drafting_stops_where_the_drafter_is_unsure(monkeypatch):
    """``confidence=0.5`` with speculate=5, greedy, batch 4: every round is exactly as wide
    as a brute force says: the expert, run from scratch on each running row's tokens so
    far, drafts its greedy choices while some running row's top token has probability at
    least 0.5, up to 4 drafts and the tokens left. Rounds were cut both before the first
    draft and after some; the tokens equal plain decoding's."""
    lm, context, mask, expected = qa_batch(shown=False, new_tokens=20)
    reads = rounds_read(monkeypatch, lm, len(context))
    out = lm.engine.generate_speculative(context, mask, 20, -1, 0, draft=5, confidence=0.5)
    assert out.tolist() == expected.tolist()
    expert = transformers.AutoModelForCausalLM.from_pretrained(REPO / "models" / "toy" / "expert-qa").eval()
    tokens = [row[m.bool()].tolist() for row, m in zip(expected, torch.nn.functional.pad(mask, (0, 20), value=1))]
    shown = mask.sum(1).tolist()  # each row's prompt tokens, padding left out
    widths, brute = [], []
    for fed, made in reads[1:]:  # after the prefill's read
        live = [r for r in range(len(context)) if made[r] < 20]
        drafts = {r: tokens[r][: shown[r] + made[r]] for r in live}
        width = 1
        while width < min(5, max(20 - made[r] for r in live)):
            probabilities = {r: reference.next_token_probabilities(expert, drafts[r], lm.engine.vocab_size) for r in live}
            if max(float(p.max()) for p in probabilities.values()) < 0.5:
                break
            for r in live:
                drafts[r].append(int(probabilities[r].argmax()))
            width += 1
        widths.append(len(fed[0]))
        brute.append(width)
    assert widths == brute
    assert 1 in widths and 5 in widths and any(1 < width < 5 for width in widths), widths


def test_sampled_drafting_stops_on_the_drafters_top_probability_not_its_draw(monkeypatch):
    """Sampled (temperature 1, top-k 3), ``confidence=0.5``, speculate=4, batch 4: each round
    goes on drafting while some running row's q (the expert's distribution after top-k, here
    rebuilt from scratch for the row's tokens so far and the drafts it read) gives its top
    token at least 0.5, and stops at the first draft where none does. Stopping on q of the
    token drawn instead (which skews the distribution: see ``generate_speculative``) cuts
    rounds this check refuses. Some rounds stopped before their first draft, some drafted."""
    torch.manual_seed(0)
    lm = DLFLM(registry="toy", experts="qa", solver="static", batch_size=1)
    expert = transformers.AutoModelForCausalLM.from_pretrained(REPO / "models" / "toy" / "expert-qa").eval()
    prompt = lm.tok_encode(PROMPTS["toy_qa"].format("Voustunia"))
    reads = rounds_read(monkeypatch, lm, 4)
    ids = torch.tensor([prompt] * 4)
    sampling = Sampling(do_sample=True, temperature=1.0, top_k=3)
    out = lm.engine.generate_speculative(ids, torch.ones_like(ids), 12, -1, 0, draft=4, sampling=sampling, confidence=0.5)
    generated = out[:, len(prompt) :].tolist()
    widths = []
    for fed, before in reads[1:]:  # after the prefill's read; before: each row's tokens made
        live = [r for r in range(4) if before[r] < 12]
        width = len(fed[0])
        for r in live:
            assert fed[r][0] == generated[r][before[r] - 1]  # x: the row's last token
        tops = []  # per draft, the running rows' largest top probability of q
        for i in range(min(4, max(12 - before[r] for r in live)) - 1):
            top3 = [reference.next_token_probabilities(expert, prompt + generated[r][: before[r]] + fed[r][1 : i + 1], lm.engine.vocab_size).topk(3).values for r in live]
            tops.append(max(float(p[0] / p.sum()) for p in top3))  # top-k 3, temperature 1: the three renormalised
        assert all(top >= 0.5 for top in tops[: width - 1]) and (width - 1 == len(tops) or tops[width - 1] < 0.5), (width, tops)
        widths.append(width)
    assert 1 in widths and any(width > 1 for width in widths), widths


def test_same_tokens_as_plain_when_each_request_is_routed_to_its_own_pair():
    """experts=all with route=prompt: requests of four tasks go to different pairs (engines),
    each drafting with its own first pair's expert; the texts equal plain decoding's."""
    requests = lambda: toy_requests(3, until=("\n", "e"), max_gen_toks=16)  # noqa: E731
    plain = DLFLM(registry="toy", experts="all", route="prompt", batch_size=8)
    fast = DLFLM(registry="toy", experts="all", route="prompt", batch_size=8, speculate=3)
    assert fast.generate_until(requests()) == plain.generate_until(requests())
    routed = [names for names in fast._engines if len(names) == 1]  # the engine of all four pairs is built up front
    assert len(routed) == 4


def test_k_one_is_plain_decoding_one_large_pass_per_token(tiny_world):
    plain = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="dlf", batch_size=4)
    one = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="dlf", batch_size=4, speculate=1)
    requests = toy_requests(2, until=(), max_gen_toks=10)
    assert one.generate_until(requests) == plain.generate_until(requests)
    context, mask = plain.tok_batch_encode(["The river Tesh flows", "Lorem"])
    out = plain.engine.generate_speculative(context, mask, 6, plain.eot_token_id, 0, draft=1)
    assert plain.engine.speculation["rounds"] == out.shape[1] - context.shape[1] - 1


def test_rows_that_stop_take_over_the_next_prompts_in_fewer_large_passes(monkeypatch, taken_over):
    """Toy world, qa + fill (qa's expert drafting), speculate=3 and lookup=4, 48 dev prompts
    after solved examples, each stopping at its second line's end or after 24 tokens: 3 rows that
    refill give every prompt the tokens that batches of 3 give it, after 16 prefills, in
    fewer large-model passes (a batch waits for its slowest row; a free row takes the next
    prompt); and no pass reads more columns than the widest prompt and one request's most
    (columns no running row sees any more are dropped: without that, 269 here)."""
    lm = DLFLM(registry="toy", experts="qa+fill", batch_size=3)
    context, mask = lm.tok_batch_encode([request.args[0] for request in shown_requests(12)])
    widths = []
    large = lm.engine.models[lm.engine.large]
    hidden = large.hidden
    monkeypatch.setattr(large, "hidden", lambda ids, mask, *a, **k: widths.append(mask.shape[1]) or hidden(ids, mask, *a, **k))
    two_lines = lambda rows, made: {r for r, tokens in zip(rows, made) if lm.tok_decode(tokens).count("\n") > 1}  # noqa: E731

    def generate(ids, masks, slots=None):
        out = lm.engine.generate_speculative(ids, masks, 24, lm.eot_token_id, -1, draft=3, lookup=4, stop_check=two_lines, slots=slots)
        return [[t for t in row[context.shape[1] :] if t >= 0] for row in out.tolist()]  # -1: padding

    refilled = generate(context, mask, slots=3)
    passes, widest = len(widths), max(widths)
    assert lm.engine.speculation["prefills"] == 16 and taken_over
    widths.clear()
    batched = [row for i in range(0, len(context), 3) for row in generate(context[i : i + 3], mask[i : i + 3])]
    assert len({len(row) for row in batched}) > 3  # rows stop at different places
    assert refilled == batched
    assert passes < len(widths)
    assert widest <= context.shape[1] + 24 * 5  # a request's most: 24 rounds of lookup + 1 = 5 columns
    # One token each: every group stops at its prefill's tokens, and the next is prefilled.
    one = lm.engine.generate_speculative(context, mask, 1, lm.eot_token_id, -1, draft=3, lookup=4, slots=3)
    assert one.tolist() == lm.engine.generate(context, mask, 1, Sampling(), lm.eot_token_id, -1).tolist()
    assert lm.engine.speculation["prefills"] == 16 and lm.engine.speculation["rounds"] == 0


def test_a_refilling_call_decodes_at_most_eight_batches_of_requests():
    """20 requests at batch size 2: lm-eval's chunks hold 16 and 4 of them (the progress
    bar and lm-eval's request cache move on once per chunk), one generate call each, its
    rows prefilled 2 at a time; the texts are plain decoding's."""
    requests = lambda: toy_requests(5)  # noqa: E731 - 5 dev prompts of each of the 4 seen tasks
    fast = DLFLM(registry="toy", experts="qa", batch_size=2, speculate=3)
    assert fast.generate_until(requests()) == DLFLM(registry="toy", experts="qa", batch_size=2).generate_until(requests())
    report = fast.get_model_info()["dlf"]["speculation"]
    assert (report["calls"], report["prefills"]) == (2, 10)


REPEATING = "the quick brown fox jumps. the quick brown"  # copies to draft from


@pytest.mark.parametrize("lookup, slots", [(0, None), (3, None), (0, 2), (3, 2)])
def test_masked_drafts_equal_recomputing_every_prefix(tiny_world, tiny_models_loaded, monkeypatch, taken_over, lookup, slots):
    """Rejected drafts stay in the caches, masked: the tokens equal a brute force that
    recomputes every prefix from scratch in float64 (static weights, two pairs, k = 3; with
    ``lookup=3`` rounds of other widths, drafted by lookup alone or in part). With 2 slots
    the 4 prompts run 2 at a time, the second two each taking over the caches of a row
    that stopped, one of them longer than the columns the row had (the rows gain columns
    on the left)."""
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="static", batch_size=4)
    prompts = ["Lorem", "The river Tesh flows", "Question: What is the capital of Varn?\nAnswer:", REPEATING]
    context, mask = lm.tok_batch_encode(prompts)
    grown = []
    grow_left = _Stream.grow_left
    monkeypatch.setattr(_Stream, "grow_left", lambda self, columns: grown.append(columns) or grow_left(self, columns))
    out = lm.engine.generate_speculative(context, mask, 12, lm.eot_token_id, 0, draft=3, lookup=lookup, slots=slots)
    assert (lm.engine.speculation["copied"] > 0) == bool(lookup)
    assert len(taken_over) == (2 if slots else 0) and bool(grown) == bool(slots)
    pairs = [("expert-a1", "small-a", 1.0), ("expert-b", "small-b", 1.0)]
    for row, prompt in enumerate(prompts):
        expected = reference.greedy_tokens(tiny_models_loaded, "large", pairs, lm.tok_encode(prompt), lm.engine.vocab_size, 12, lm.eot_token_id)
        got = out[row, context.shape[1] :].tolist()[: len(expected)]
        assert got == expected, (prompt, got, expected)


@pytest.mark.parametrize("lookup", [0, 3])
def test_columns_no_row_kept_are_cut_from_the_caches(tiny_world, lookup):
    """After each round, the cache slots past the most any row kept are cut (a row's other
    refused drafts stay, masked): alone, a row's caches hold no refused draft; in a batch,
    every slot past the prompts serves some row; and once the other rows stopped, a row's
    caches hold no refused draft, as alone (a stopped row's count of drafts kept is
    meaningless, and counts for nothing). Every pass's 2D mask shows it (the mask covers
    every slot of the caches it reads). The tokens are plain decoding's. With ``lookup=3``,
    rounds of 2 to 4 positions, drafted by lookup alone or not."""
    lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="static", batch_size=4)
    masks = []
    for backend in {id(b): b for b in lm.engine.models.values()}.values():
        hidden = backend.hidden

        def recording(ids, mask=None, *args, hidden=hidden, **kwargs):
            masks.append(None if mask is None else mask.clone())
            return hidden(ids, mask, *args, **kwargs)

        backend.hidden = recording
    prompts = [REPEATING, "Question: What is the capital of Varn?\nAnswer:", "Lorem", "The river Tesh flows"]
    all_but_first = lambda rows, generated: set(rows) - {0}  # noqa: E731 - rows 1-3 stop at their first token
    for rows, stop in ((prompts[:1], None), (prompts, None), (prompts, all_but_first)):
        masks.clear()
        context, mask = lm.tok_batch_encode(rows)
        plain = lm.engine.generate(context, mask, 12, Sampling(), lm.eot_token_id, 0, stop_check=stop)
        masks.clear()
        out = lm.engine.generate_speculative(context, mask, 12, lm.eot_token_id, 0, draft=3, lookup=lookup, stop_check=stop)
        assert out.tolist() == plain.tolist()
        stats = lm.engine.speculation
        assert stats["accepted"] < stats["drafted"]  # drafts were refused
        assert (stats["copied"] > 0) == bool(lookup)
        if len(rows) == 1:
            assert (stats["lookup_rounds"] > 0) == bool(lookup)
        width = context.shape[1]
        for seen in masks:
            if len(rows) == 1:
                assert bool(seen.all())
            elif stop:
                assert bool(seen[0, width:].all())
            else:
                assert bool(seen[:, width:].any(0).all())


def _tv(counts: dict, exact: dict, total: int) -> float:
    """Total variation between empirical ``counts`` (of ``total`` draws) and ``exact``."""
    return 0.5 * sum(abs(counts.get(k, 0) / total - exact.get(k, 0.0)) for k in set(counts) | set(exact))


def test_speculative_choice_draws_from_the_target_whatever_the_proposal():
    """The rule alone, 200,000 rows, two drafts from proposals unlike the targets (mass where
    the target has none and none where it has some): the first token follows p1, the
    second p2 where the first draft was kept, the third p3 where both were."""
    torch.manual_seed(0)
    n, v = 200_000, 6
    target = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1, 0.0], [0.05, 0.05, 0.3, 0.3, 0.3, 0.0], [0.0, 0.0, 0.0, 0.2, 0.3, 0.5]])
    proposal = torch.tensor([[0.1, 0.1, 0.5, 0.1, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.0, 0.1]])
    drafts = torch.stack([torch.multinomial(q, n, replacement=True) for q in proposal], dim=1)
    tokens, accepted = speculative_choice(drafts, proposal.expand(n, -1, -1), target.expand(n, -1, -1))

    def tv(sample, p):
        return _tv(dict(enumerate((torch.bincount(sample, minlength=v) / len(sample)).tolist())), dict(enumerate(p.tolist())), 1)

    assert tv(tokens[:, 0], target[0]) < 0.01
    assert tv(tokens[accepted >= 1, 1], target[1]) < 0.01
    assert tv(tokens[accepted >= 2, 2], target[2]) < 0.01
    kept = torch.arange(2) < accepted.unsqueeze(1)
    assert (tokens[:, :2] == drafts)[kept].all()
    assert {0, 1, 2} == set(accepted.unique().tolist())
    # One position and no draft (k = 1): a plain draw from p.
    alone, none = speculative_choice(drafts[:, :0], proposal[:0].expand(n, 0, v), target[:1].expand(n, -1, -1))
    assert alone.shape == (n, 1) and not none.any() and tv(alone[:, 0], target[0]) < 0.01


SHOWN = "Question: What is the capital of Voustunia?\nAnswer: Driszaim\n"  # the same question solved: drafts to copy


@pytest.mark.parametrize(
    "draft, lookup, confidence, slots, pooled",
    [(3, 0, 0.0, None, False), (3, 2, 0.0, None, False), (1, 2, 0.0, None, False), (3, 0, 0.5, None, False), (3, 2, 0.0, 500, False), (3, 2, 0.0, None, True)],
)
def test_sampled_speculation_draws_the_fused_distribution(draft, lookup, confidence, slots, pooled, taken_over):
    """Toy world (pair qa, static weights), one prompt 4,000 times, temperature 1 and top-k 3,
    k = 3: the first three tokens' joint frequencies match the exact fused distribution
    computed in float64 from scratch for each prefix (27 sequences). Keeping every draft
    (0.17) or drawing a refused draft's replacement from p instead of max(0, p - q) (0.06)
    fails the bound; sampling noise is about 0.02. With ``lookup=2`` the prompt follows the
    same question solved, so rows whose first token starts that answer copy drafts (a
    copied draft's proposal: the token itself): with k = 3 in rounds the expert drafts for
    the other rows; with k = 1 in rounds of copies alone, the other rows drafting
    placeholders. With ``confidence=0.5`` the draws come 8 at a time (a batch of 4,000 rows
    would always hold a row sure enough to draft on), and some rounds stop drafting early.
    With 500 slots the 4,000 rows run 500 at a time, rows that stop taking over the caches
    of the next prompts. ``pooled``: the solved question is not in the prompt but in a
    ``LookupHistory`` (an earlier request's generation), which the copies then come from."""
    torch.manual_seed(0)
    lm = DLFLM(registry="toy", experts="qa", solver="static", batch_size=1)
    names = ("large-base", "small-base", "expert-qa")
    models = {n: transformers.AutoModelForCausalLM.from_pretrained(REPO / "models" / "toy" / n).eval() for n in names}
    prompt = lm.tok_encode((SHOWN if lookup and not pooled else "") + PROMPTS["toy_qa"].format("Voustunia"))
    history = LookupHistory() if pooled else None
    if pooled:
        history.add(lm.tok_encode(SHOWN))
    draws = 4000
    rows = 8 if confidence else draws
    ids = torch.tensor([prompt] * rows)
    sampling = Sampling(do_sample=True, temperature=1.0, top_k=3)
    counts, stats, drafted = collections.Counter(), collections.Counter(), set()
    for _ in range(draws // rows):
        out = lm.engine.generate_speculative(ids, torch.ones_like(ids), 3, -1, 0, draft=draft, sampling=sampling, lookup=lookup, confidence=confidence, slots=slots, history=history)
        counts.update(tuple(row) for row in out[:, len(prompt) :].tolist())
        stats.update(lm.engine.speculation)
        drafted.add(lm.engine.speculation["drafted"] > 0)
    assert 0 < stats["accepted"] < stats["drafted"], stats
    assert (stats["copied"] > 0) == bool(lookup) and (stats["lookup_rounds"] > 0) == (draft == 1), stats
    assert (stats["pooled"] > 0) == pooled and (not pooled or stats["pooled"] == stats["copied"]), stats
    if confidence:  # some calls stopped drafting at their one round's first draft, some drafted
        assert drafted == {False, True}
    assert bool(taken_over) == bool(slots)

    def top3(tokens):
        z = reference.fused_logits(models, "large-base", [("expert-qa", "small-base", 1.0)], tokens, lm.engine.vocab_size)
        top = z.topk(3)
        return dict(zip(top.indices.tolist(), torch.softmax(top.values, 0).tolist()))

    exact = {}
    for a, pa in top3(prompt).items():
        for b, pb in top3(prompt + [a]).items():
            for c, pc in top3(prompt + [a, b]).items():
                exact[(a, b, c)] = pa * pb * pc
    assert _tv(counts, exact, draws) < 0.035


def test_sampled_speculation_through_lm_eval_traces_drafts(tmp_path):
    """do_sample with speculate through generate_until (dlf solver): texts come back and the
    trace marks tokens that were drafts the fusion kept."""
    from dlf_plugin import trace

    torch.manual_seed(0)
    path = tmp_path / "trace.jsonl"
    lm = DLFLM(registry="toy", experts="fill", batch_size=4, speculate=3, trace=str(path))
    requests = toy_requests(2, until=(), max_gen_toks=8)
    for request in requests:
        request.arguments[1].update(do_sample=True, temperature=0.7)
    texts = lm.generate_until(requests)
    assert len(texts) == len(requests) and all(texts)
    drafted = [r["drafted"] for r in trace.read(path) if r["kind"] == "generate"]
    assert len(drafted) == 8 * len(requests) and True in drafted and False in drafted


def test_bad_speculate_values_are_refused(tiny_world):
    with pytest.raises(RegistryError, match="speculate needs at least one expert pair"):
        DLFLM(registry=str(tiny_world["registry"]), experts="", speculate=2)
    with pytest.raises(RegistryError, match="speculate"):
        DLFLM(registry=str(tiny_world["registry"]), experts="a1", speculate="two")
    with pytest.raises(RegistryError, match="lookup drafts for speculative decoding, which needs at least one expert pair"):
        DLFLM(registry=str(tiny_world["registry"]), experts="", lookup=4)
    for bad in ("-1", "four", 2.5, True):
        with pytest.raises(RegistryError, match="model_args lookup="):
            DLFLM(registry=str(tiny_world["registry"]), experts="a1", speculate=3, lookup=bad)
    for bad in ("-0.1", "1", 1.5, "sure", True):
        with pytest.raises(RegistryError, match=r"model_args draft_confidence=.* must be a number in \[0, 1\)"):
            DLFLM(registry=str(tiny_world["registry"]), experts="a1", speculate=3, draft_confidence=bad)
    with pytest.raises(RegistryError, match=r"model_args lookup_history='yes' must be True or False"):
        DLFLM(registry=str(tiny_world["registry"]), experts="a1", speculate=3, lookup=4, lookup_history="yes")
    with pytest.raises(RegistryError, match="lookup_history pools copies for lookup's drafts: set lookup=n"):
        DLFLM(registry=str(tiny_world["registry"]), experts="a1", speculate=3, lookup_history=True)
    for k in (0, 1):  # no drafts to stop
        with pytest.raises(RegistryError, match="draft_confidence=0.5 stops the expert's drafts, which it makes only with speculate"):
            DLFLM(registry=str(tiny_world["registry"]), experts="a1", speculate=k, lookup=4, draft_confidence="0.5")


def test_trace_marks_each_token_drafted_or_not_and_matches_plain_traces(tmp_path):
    """The trace of a speculative run has the plain run's lines (request, position, token,
    weights), plus ``drafted``: true for accepted drafts, false for fused tokens at a
    disagreement and for each generation's first token (from the prefill)."""
    from dlf_plugin import trace

    runs = {}
    for k in (0, 3):
        path = tmp_path / f"k{k}.jsonl"
        lm = DLFLM(registry="toy", experts="qa", solver="dlf", batch_size=8, speculate=k, trace=str(path))
        lm.generate_until(toy_requests(2))
        runs[k] = [r for r in trace.read(path) if r["kind"] == "generate"]
    key = lambda r: (r["request"], r["position"])  # noqa: E731
    plain, fast = sorted(runs[0], key=key), sorted(runs[3], key=key)
    assert [key(r) + (r["token"],) for r in fast] == [key(r) + (r["token"],) for r in plain]
    for a, b in zip(fast, plain):
        assert a["weights"] == pytest.approx(b["weights"], abs=1e-5)
    assert all("drafted" not in r for r in plain)
    assert not any(r["drafted"] for r in fast if r["position"] == 0)
    assert 0 < sum(r["drafted"] for r in fast) < len(fast)


def test_results_report_what_speculation_did_over_every_generation(tmp_path, monkeypatch):
    """config.dlf.speculation sums every generate call of the run: its prefills and rounds
    are the large model's reads (a prefill reads whole prompts; 4 rows that refill take one
    generate call for 8 requests, prefilled 4 at a time), its tokens the trace's
    lines, its accepted drafts at least those the trace marks drafted (a stop may cut kept
    drafts off); without speculation there is no such entry."""
    from dlf_plugin import trace

    path = tmp_path / "trace.jsonl"
    lm = DLFLM(registry="toy", experts="qa", batch_size=4, speculate=3, lookup=4, trace=str(path))
    widths = []
    large = lm.engine.models[lm.engine.large]
    hidden = large.hidden
    monkeypatch.setattr(large, "hidden", lambda ids, *a, **k: widths.append(ids.shape[1]) or hidden(ids, *a, **k))
    for _ in range(2):
        lm.generate_until(shown_requests(2))  # 8 requests, 4 rows
    report = lm.get_model_info()["dlf"]["speculation"]
    lines = [r for r in trace.read(path) if r["kind"] == "generate"]
    kept = sum(r["drafted"] for r in lines)
    assert report["prefills"] == sum(w > 5 for w in widths) == 4  # rounds read at most lookup + 1 = 5 tokens
    assert report["calls"] == 2
    assert report["prefills"] + report["rounds"] == len(widths)
    assert report["tokens"] == len(lines)
    assert 0 < kept <= report["accepted"] <= report["drafted"]
    assert report["copied"] > 0 and report["acceptance"] == report["accepted"] / report["drafted"]
    assert "speculation" not in DLFLM(registry="toy", experts="qa", batch_size=4).get_model_info()["dlf"]
