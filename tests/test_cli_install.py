"""A non-editable install (``pip install .``, here into a target folder) runs the commands from any directory:
console scripts and ``python -m rlmem.commands.<name>`` find their configs as package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """rlmem built from a copy of the sources (no build files in the checkout) and installed into a folder."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("rlmem", "envs", "agents", "lm_tasks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-compile", "--target", str(target), str(src)], capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return target


def run(installed: Path, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_the_installed_commands_run_from_any_directory(installed, tmp_path):
    conf = installed / "rlmem" / "conf"
    assert (conf / "memory" / "darmt.yaml").is_file() and (conf / "agent" / "darmt.yaml").is_file()
    for init in (p for top in ("rlmem", "envs", "agents", "lm_tasks") for p in (ROOT / top).rglob("__init__.py")):
        package = init.parent.relative_to(ROOT)
        package = package if package.parts[0] == "rlmem" else Path("rlmem", *package.parts)
        assert (installed / package / "__init__.py").is_file(), f"{package} is not installed: list it in pyproject.toml"
    scripts = {p.name for p in (installed / "bin").iterdir()}
    assert {"rlmem-train", "rlmem-train-lm", "rlmem-evaluate", "rlmem-benchmark"} <= scripts, scripts
    where = run(installed, [sys.executable, "-c", "import rlmem; print(rlmem.__file__)"], tmp_path)
    assert where.stdout.strip().startswith(str(installed)), where.stdout  # not the checkout's editable install
    # a console script: its own --help, a typo in one line; python -m: a real (tiny) run into ./outputs
    help_ = run(installed, [sys.executable, str(installed / "bin" / "rlmem-train-lm"), "--help"], tmp_path)
    assert help_.returncode == 0 and "model (default gru)" in help_.stdout and "agent (" not in help_.stdout
    typo = run(installed, [sys.executable, str(installed / "bin" / "rlmem-train"), "agent=gruu"], tmp_path)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines()[-1].startswith(
        "train_rl: invalid configuration: agent='gruu' is not a config of rlmem/conf/agent/ (did you mean 'gru'?)")
    trained = run(installed, [sys.executable, "-m", "rlmem.commands.train_rl", "agent=darmt", "total_frames=64",
                              "ppo.num_envs=4", "ppo.rollout_len=16", "ppo.seq_len=8", "ppo.minibatches=2",
                              "ppo.epochs=1", "ppo.eval_episodes=2", "logger.progress_bar=false"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "train_rl" / "darmt-delayed_cue").glob("*/metrics.json"))
    assert len(runs) == 1 and (runs[0].parent / "train_rl.log").is_file()
