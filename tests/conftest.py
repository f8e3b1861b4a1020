"""Shared fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def user_project(tmp_path) -> Path:
    """A copy of ``tests/user_project``: a user's own folder with ``my_memories.py`` (an EMA memory system)
    and ``my_envs.py`` (Gymnasium envs), to run the scripts from as a user would."""
    project = tmp_path / "project"
    shutil.copytree(Path(__file__).parent / "user_project", project)
    return project
