"""Hostile and careless registry files: the loader raises RegistryError, naming the file (and
the line or key), and nothing else, quickly and in little memory."""

from __future__ import annotations

import copy
import time
import tracemalloc

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlf_plugin.registry import MAX_EXPANDED_NODES, Registry, RegistryError, load_registry

VALID = {
    "name": "fuzz",
    "description": "a registry to break",
    "defaults": {"dtype": "float32", "device": "cpu"},
    "models": {
        "large": {"path": "large", "dtype": "float32"},
        "small": {"hub": "org/small", "revision": "main"},
        "expert": {"placeholder": "not published", "tokenizer": "org/small"},
    },
    "large": "large",
    "pairs": {"p": {"expert": "expert", "base": "small", "tasks": ["toy_qa"], "chat_template": False}},
}
BIG = "__BIG_INTEGER__"


def load_text(tmp_path, text: str | bytes):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path, load_registry(str(path))


def test_the_fuzzing_skeleton_is_valid(tmp_path):
    assert isinstance(load_text(tmp_path, yaml.safe_dump(VALID))[1], Registry)


@pytest.mark.parametrize(
    "text,line,key",
    [
        ("name: x\nmodels:\n  a: {path: a}\n  b: {path: b}\n  c: {path: c}\nlarge: a\npairs:\n"
         "  p: {expert: b, base: c}\n  p: {expert: c, base: b}\n", 9, "'p'"),
        ("name: x\nmodels:\n  a: {path: a, path: b}\nlarge: a\n", 3, "'path'"),
        ("name: x\nmodels:\n  a: {path: a}\n  a: {hub: org/a}\nlarge: a\n", 4, "'a'"),
        ("name: x\nname: y\nmodels: {a: {path: a}}\nlarge: a\n", 2, "'name'"),
    ],
)
def test_duplicate_keys_at_any_level_name_file_line_and_key(tmp_path, text, line, key):
    with pytest.raises(RegistryError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert str(tmp_path / "hostile.yaml") in message and f"line {line}: key {key} is given twice" in message


def test_merge_keys_may_override_what_they_bring(tmp_path):
    text = "name: x\ndefaults: &d {dtype: float32}\nmodels:\n  a: {<<: *d, path: a, dtype: float16}\nlarge: a\n"
    assert load_text(tmp_path, text)[1].models["a"].dtype == "float16"


def test_nested_aliases_cannot_blow_up(tmp_path):
    """Nine levels of nine aliases: 510 bytes standing for 9^9 (387 million) strings."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(lines) + "\nname: *l8\nmodels: {a: {path: a}}\nlarge: a\n"
    assert len(text) < 600
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(RegistryError, match=f"aliases expand to more than {MAX_EXPANDED_NODES:,} values"):
        load_text(tmp_path, text)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 10 * 2**20, (seconds, peak)


@pytest.mark.parametrize(
    "text,message",
    [
        ("name: x\nmodels: {a: {path: a}, b: {path: b}, c: {path: c}}\nlarge: a\npairs: {p: {expert: [b], base: c}}\n",
         r"pairs\.p\.expert must be a non-empty string \(no NUL\), got \['b'\]"),
        ("name: x\nmodels: {a: {path: a}}\nlarge: {a: 1}\n", r"large must be a non-empty string"),
        ("name: " + "9" * 6000 + "\nmodels: {a: {path: a}}\nlarge: a\n", r"is not valid YAML: .*4300 digits"),
        ("name: x\ndescription: " + "9" * 4000 + "\nmodels: {a: {path: a}}\nlarge: a\n", r"description must be a non-empty string .*\.\.\.$"),
        ("name: x\nmodels: {1: {path: a}}\nlarge: a\n", r"a key of models must be a non-empty string \(no NUL\), got 1"),
        ('name: x\nmodels: {a: {path: "a\\0b"}}\nlarge: a\n', r"models\.a\.path must be a non-empty string \(no NUL\)"),
        ("name: x\nmodels: {a: {path: a}}\nlarge: a\npairs: [1, 2]\n", r"pairs must be a mapping, got list"),
        (b"name: \xff\xfe\nmodels: {}\n", r"is not valid YAML"),
    ],
)
def test_values_of_the_wrong_type_are_registry_errors(tmp_path, text, message):
    with pytest.raises(RegistryError, match=message) as info:
        load_text(tmp_path, text)
    assert str(tmp_path / "hostile.yaml") in str(info.value)
    assert len(str(info.value)) < 600  # a huge value is clipped, not printed whole


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["", " ", "\x00", "auto", "large", "small", "expert", "p", "../..", "/", "~", "org/x"]),
)
values = st.one_of(
    st.just(BIG),
    st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)), max_leaves=8),
)


def key_paths(node, prefix=()) -> list[tuple]:
    """Every key of the skeleton at every depth, as a path from the top."""
    paths = []
    for key, value in node.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += key_paths(value, (*prefix, key))
    return paths


PATHS = key_paths(VALID)


@st.composite
def hostile_registries(draw) -> str:
    """The valid skeleton with a few values anywhere replaced by anything, or keys added."""
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        *parents, key = draw(st.sampled_from(PATHS))
        node = doc
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if not isinstance(node, dict):  # an earlier replacement removed this branch
            continue
        if draw(st.integers(0, 4)) == 0:  # a new key beside it
            key = draw(st.one_of(st.text(max_size=8), st.integers(), st.sampled_from(["path", "hub", "tasks", "dtype"])))
        node[key] = draw(values)
    return yaml.safe_dump(doc).replace(BIG, "9" * draw(st.sampled_from([10, 5000])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=hostile_registries())
def test_hypothesis_registries_raise_registry_error_or_load(tmp_path, text):
    try:
        result = load_text(tmp_path, text)[1]
    except RegistryError as exc:
        assert str(tmp_path / "hostile.yaml") in str(exc)
    else:
        assert isinstance(result, Registry)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_hypothesis_arbitrary_bytes_raise_registry_error(tmp_path, raw):
    with pytest.raises(RegistryError):
        load_text(tmp_path, raw)
