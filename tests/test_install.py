"""Installing dlf into fresh virtual environments, then the real ``lm_eval`` command in a subprocess.

Each environment gets dlf alone (``pip install --no-deps``, regular and editable);
its dependencies are borrowed from the test interpreter's site-packages through a
path-only .pth line, which leaves that site's own .pth hooks (and its dlf) inactive.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}


def source_copy(src: Path, dest: Path) -> Path:
    """Build from a copy: setuptools writes egg-info and build/ beside the sources it builds."""
    skip = shutil.ignore_patterns(".venv*", ".git", "build", "out", "*.egg-info", "__pycache__", ".hypothesis")
    shutil.copytree(src, dest, ignore=skip)
    return dest


def make_env(root: Path, editable: bool) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "env")], check=True)
    source = source_copy(REPO, root / "src")
    root = root / "env"
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in parents))
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(cmd + (["-e", str(source)] if editable else [str(source)]), check=True, env=ENV, cwd=root)
    if not editable:  # a third-party solver package, discovered through its entry point
        subprocess.run(cmd + [str(source / "tests" / "example_solver_plugin")], check=True, env=ENV, cwd=root)
    return python


_ENVS: dict[str, tuple] = {}


def environment(kind: str, tmp_path_factory):
    """One fresh environment per kind per session, built on first use."""
    if kind not in _ENVS:
        root = tmp_path_factory.mktemp(f"venv-{kind}")
        _ENVS[kind] = (kind, make_env(root, editable=kind == "editable"), root)
    return _ENVS[kind]


@pytest.fixture(params=["regular", "editable"])
def installed(request, tmp_path_factory):
    return environment(request.param, tmp_path_factory)


@pytest.fixture
def regular(tmp_path_factory):
    return environment("regular", tmp_path_factory)


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def test_install_resolves_dlf_and_keeps_builtin_models(installed):
    kind, python, root = installed
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip())
    assert (site / "dlf_plugin.pth").read_text() == "import dlf_plugin.startup\n"
    code = (
        "import dlf_plugin, sys; from lm_eval.api.registry import get_model; "
        "print(get_model('dlf').__module__, get_model('hf').__name__, get_model('dummy').__name__, "
        "'dlf_plugin.lm' in sys.modules or 'lazy', dlf_plugin.__file__)"
    )
    out = run(python, "-c", code, cwd=root)
    assert out.returncode == 0, out.stderr
    module, hf, dummy, _, location = out.stdout.split()
    assert (module, hf, dummy) == ("dlf_plugin.lm", "HFLM", "DummyLM")
    assert location.startswith(str(root / "src") if kind == "editable" else str(site))
    # Start-up stays light: the hook imports neither torch nor lm-eval.
    light = run(python, "-c", "import sys; print('torch' in sys.modules, 'lm_eval' in sys.modules)", cwd=root)
    assert light.stdout.split() == ["False", "False"]
    # The entry point newer lm-eval releases read.
    eps = run(python, "-c", "from importlib.metadata import entry_points as e; print([x.value for x in e(group='lm_eval.models') if x.name == 'dlf'])", cwd=root)
    assert eps.stdout.strip() == "['dlf_plugin.lm:DLFLM']"


def _results(out_dir: Path) -> dict:
    [path] = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    return json.loads(Path(path).read_text())


def test_lm_eval_command_runs_dlf_and_records_metadata(regular, tiny_world):
    kind, python, root = regular
    out_dir = root / "results"
    args = [
        "-m", "lm_eval", "run", "--model", "dlf",
        "--model_args", f"registry={tiny_world['registry']},experts=a1+b,solver=static,weight=0.5",
        "--tasks", "toy_qa,toy_mc", "--include_path", str(REPO / "tasks"),
        "--limit", "3", "--batch_size", "2", "--output_path", str(out_dir), "--log_samples",
        "--use_cache", str(root / "cache"),
    ]
    first = run(python, *args, cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    results = _results(out_dir)
    meta = results["config"]["dlf"]
    assert meta["registry"]["sha256"] == hashlib.sha256(tiny_world["registry"].read_bytes()).hexdigest()
    assert meta["registry"]["path"] == str(tiny_world["registry"])
    assert [p["name"] for p in meta["pairs"]] == ["a1", "b"]
    assert meta["pairs"][1] == {"name": "b", "expert": "expert-b", "base": "small-b", "tasks": ["toy_qa"], "chat_template": False}
    assert set(meta["models"]) == {"large", "small-a", "small-b", "expert-a1", "expert-b"}
    large = meta["models"]["large"]
    assert large["source"] == str(tiny_world["root"] / "large") and len(large["content_sha256"]) == 64
    assert meta["solver"] == {"name": "static", "options": {"weight": 0.5, "weights": None}, "plugin": "dlf_plugin.solvers.builtin"}
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root).stdout.strip())
    version = run(python, "-c", "import dlf_plugin; print(dlf_plugin.__version__)", cwd=root).stdout.strip()
    assert meta["dlf_version"] == version and meta["versions"]["lm_eval"]
    assert set(results["results"]) == {"toy_qa", "toy_mc"}
    assert glob.glob(str(out_dir / "**" / "samples_toy_qa_*.jsonl"), recursive=True)
    assert glob.glob(str(root / "cache*.db"))

    # --use_cache: a second run answers from the cache, with the same numbers.
    second = run(python, *args, cwd=root)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Cached requests" in second.stderr + second.stdout
    again = sorted(glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True))[-1]
    assert json.loads(Path(again).read_text())["results"] == results["results"]
    assert site.is_dir()

    # The same cache for the large base alone: refused, naming what differs; nothing written.
    written = glob.glob(str(out_dir / "**" / "*"), recursive=True)
    base_only = [a.replace("experts=a1+b,solver=static,weight=0.5", "experts=") for a in args]
    third = run(python, *base_only, cwd=root)
    assert third.returncode != 0
    assert "was filled by a different dlf configuration (differs in: models, pairs, solver, views)" in third.stderr, third.stderr[-3000:]
    assert glob.glob(str(out_dir / "**" / "*"), recursive=True) == written


def test_lm_eval_hf_model_beside_dlf(regular, tiny_world):
    """--model hf still works with dlf installed."""
    kind, python, root = regular
    hf = run(python, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={tiny_world['root'] / 'large'}",
             "--device", "cpu", "--tasks", "toy_mc", "--include_path", str(REPO / "tasks"), "--limit", "2", cwd=root)
    assert hf.returncode == 0, hf.stderr[-3000:]
    assert "toy_mc" in hf.stdout


def readme_toy_blocks() -> list[tuple[str, str]]:
    """The fenced (language, code) blocks of README "Using it" that use the toy registry."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)
    return [(lang, code) for lang, code in blocks if re.search(r"registry=.?toy", code)]


def test_readme_toy_commands_run_as_written_from_any_directory(regular, tmp_path):
    """README "Using it": the toy command and the Python snippet, run as written (after the
    install line) in an empty directory with a regular install: the bundled tasks resolve,
    the results folder is named after the fusion, the tables print, no warning repeats."""
    kind, python, root = regular
    [(shell, command), (lang, snippet)] = readme_toy_blocks()
    assert (shell, lang) == ("bash", "python")
    install, command = command.split("\n", 1)
    assert install == "pip install ."
    bin_dir = python.parent
    shim = bin_dir / "lm_eval"  # dlf is installed alone here; lm-eval's script is the test interpreter's
    shim.write_text(f"#!/bin/sh\nexec {python} -m lm_eval \"$@\"\n")
    shim.chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}"}
    work = tmp_path / "anywhere"
    work.mkdir()
    tasks = subprocess.run(["dlf-tasks"], capture_output=True, text=True, env=env, cwd=work, check=True).stdout.strip()
    assert Path(tasks) == Path(run(python, "-c", "import dlf_plugin; print(dlf_plugin.__file__)", cwd=work).stdout.strip()).parent / "_bundled" / "tasks"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("|toy_")}
    assert set(rows) == {"toy_qa", "toy_fill"} and all("exact_match" in line for line in rows.values())
    [folder] = (work / "results").iterdir()
    assert folder.name == "dlf__toy__qa+fill__dlf__route-task"
    assert len(list(folder.glob("results_*.json"))) == 1
    warnings = [line.split("] ", 1)[1] for line in done.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == len(set(warnings)), warnings
    assert not [w for w in warnings if "pretrained" in w or "Custom kwargs" in w], warnings
    printed = subprocess.run([str(python), "-c", snippet], capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert re.search(r"^\|toy_qa\s*\|.*\|exact_match\|.*\|\s*\d\.\d+\|", printed.stdout, flags=re.MULTILINE), printed.stdout


def test_bad_input_through_the_command_writes_nothing(regular, tiny_world, tmp_path):
    """A bad registry and a bad solver option through the real command: dlf's message, no
    traceback (DLF_TRACEBACK=1 brings it back), nothing written."""
    kind, python, root = regular
    out_dir = root / "bad-results"
    registry = tmp_path / "bad.yaml"
    registry.write_text(tiny_world["registry"].read_text().replace("pairs:", "pairs:\n  a9: {expert: nowhere, base: small-a}", 1))
    common = ["-m", "lm_eval", "run", "--model", "dlf", "--tasks", "toy_mc", "--include_path", str(REPO / "tasks"), "--output_path", str(out_dir)]
    bad = run(python, *common, "--model_args", f"registry={registry},experts=a1", cwd=root)
    assert bad.returncode != 0
    assert f"dlf: error: {registry}: pairs.a9.expert" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    shown = subprocess.run([str(python), *common, "--model_args", f"registry={tiny_world['registry']},experts=a1,solver=static,weight=-1"],
                           capture_output=True, text=True, cwd=root, env={**ENV, "DLF_TRACEBACK": "1"}, timeout=300)
    assert shown.returncode != 0
    assert "Traceback" in shown.stderr and "SolverOptionError: model_args weight=-1" in shown.stderr
    assert not out_dir.exists()


def test_third_party_solver_package_through_the_command(regular, tiny_world):
    """tests/example_solver_plugin, pip-installed, is found by its entry point and really used."""
    kind, python, root = regular
    out_dir = root / "plugin-results"
    result = run(python, "-m", "lm_eval", "run", "--model", "dlf",
                 "--model_args", f"registry={tiny_world['registry']},experts=a1+b,solver=example-agreement,scale=0.5",
                 "--tasks", "toy_mc", "--include_path", str(REPO / "tasks"), "--limit", "3",
                 "--output_path", str(out_dir), "--log_samples", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = _results(out_dir)["config"]["dlf"]["solver"]
    assert meta == {"name": "example-agreement", "options": {"scale": 0.5}, "plugin": "example"}

    # The same requests in-process, with the same solver class registered by hand.
    sys.path.insert(0, str(REPO / "tests" / "example_solver_plugin"))
    import dlf_example_solver
    from lm_eval.api.instance import Instance

    from dlf_plugin import hooks
    from dlf_plugin.lm import DLFLM

    [samples] = glob.glob(str(out_dir / "**" / "samples_toy_mc_*.jsonl"), recursive=True)
    rows = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    requests, logged = [], []
    for row in rows:
        for args, resp in zip(row["arguments"].values(), row["filtered_resps"]):
            requests.append(Instance("loglikelihood", None, (args["arg_0"], args["arg_1"]), len(requests)))
            logged.append(float(resp[0]))

    class Plugin:
        @hooks.hookspecs.hookimpl
        def register_solvers(self, register):
            register(dlf_example_solver.AgreementSolver)

    pm = hooks.get_plugin_manager()
    pm.register(Plugin(), name="example-in-process")
    hooks.reset_solvers()
    try:
        lm = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="example-agreement", scale=0.5)
        ours = [lp for lp, _ in lm.loglikelihood(requests)]
    finally:
        pm.unregister(name="example-in-process")
        hooks.reset_solvers()
    assert ours == pytest.approx(logged, rel=1e-5, abs=1e-4)
    static = DLFLM(registry=str(tiny_world["registry"]), experts="a1+b", solver="static", weight=0.5)
    assert [lp for lp, _ in static.loglikelihood(requests)] != pytest.approx(logged, rel=1e-5, abs=1e-4)
