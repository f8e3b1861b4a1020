"""Shared fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    """One torch thread per test process: the suite runs one worker per core (pytest-xdist), and two torch
    threads per worker on shared cores wait for each other at every op (several times slower)."""
    torch.set_num_threads(1)


@pytest.fixture
def user_project(tmp_path) -> Path:
    """A copy of ``tests/user_project``: a user's own folder with ``my_memories.py`` (an EMA memory system)
    and ``my_envs.py`` (Gymnasium envs), to run the scripts from as a user would."""
    project = tmp_path / "project"
    shutil.copytree(Path(__file__).parent / "user_project", project)
    return project


@pytest.fixture(autouse=True)
def _same_torch_rng_in_every_test():
    """A fresh process starts torch's RNG from a random seed: a test that builds a model before anything
    seeds it would get other weights on every run (and could pass or fail by luck)."""
    torch.manual_seed(0)
