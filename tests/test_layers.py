"""rlmem's layers (pyproject.toml's import-linter contract) hold in a non-editable install.

Import-graph tools do not follow the editable install's mapping of envs/, agents/ and lm_tasks/ to
rlmem.*, so the package is installed (without dependencies) into a temporary folder and checked there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A site folder holding a non-editable install of this checkout (built from a copy: setuptools
    leaves a build/ folder beside the sources it builds)."""
    work = tmp_path_factory.mktemp("layers")
    source, site = work / "source", work / "site"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "multirun", "build", "*.egg-info", "__pycache__", ".pytest_cache", "docs"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(site), str(source)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return site


def lint_imports(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=env)


def test_every_module_is_seen_and_the_layers_contract_is_kept(installed, tmp_path):
    modules = {p.relative_to(installed).with_suffix("").as_posix().replace("/", ".")
               for p in (installed / "rlmem").rglob("*.py")}
    # the folders mapped by package-dir are there as rlmem.* modules, so the graph covers them
    assert {"rlmem.envs.core", "rlmem.agents.triggers", "rlmem.lm_tasks.tasks", "rlmem.validate"} <= modules
    out = lint_imports(installed, tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout
    analyzed = int(out.stdout.split("Analyzed ")[1].split(" files")[0])
    assert analyzed == len(modules), (analyzed, len(modules))


def test_an_import_against_the_layers_breaks_the_contract(installed, tmp_path):
    site = tmp_path / "site"
    shutil.copytree(installed, site)
    validate = site / "rlmem" / "validate.py"
    validate.write_text(validate.read_text() + "\nimport rlmem.ppo  # the bottom layer importing a trainer\n")
    out = lint_imports(site, tmp_path)
    assert out.returncode != 0
    assert "rlmem.validate is not allowed to import rlmem.ppo" in out.stdout
