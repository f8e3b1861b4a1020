"""Checkpoints load with ``weights_only=True``: what rlmem writes loads, a crafted pickle runs nothing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rlmem.agents import build_agent, load_trained_agent
from rlmem.evaluate import read_checkpoint
from rlmem.ppo import PPOConfig, RecurrentPPO
from rlmem.run_io import CheckpointError, load_checkpoint, save_checkpoint

ENV = {"id": "rlmem/DelayedCue-v0", "delay": 2}
AGENT = {"memory": "gru", "encoder_dim": 8, "hidden_size": 8}
SMALL = {"num_envs": 4, "rollout_len": 16, "seq_len": 8, "minibatches": 2, "epochs": 1, "eval_episodes": 4}


class Payload:
    """Unpickling it runs ``os.system("touch <marker>")``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_checkpoint(path, marker):
    """A file that looks like a train_rl checkpoint, with code in its pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"agent": Payload(marker), "agent_cfg": AGENT, "env_cfg": ENV, "frames": 0}, path)
    return path


def test_what_rlmem_writes_is_weights_only_and_numpy_becomes_tensors(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"a": np.arange(3), "b": np.float64(0.5), "rng": np.random.default_rng(0)
                                        .bit_generator.state, "t": (1, [None, True, "x"])})
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert torch.equal(loaded["a"], torch.arange(3)) and loaded["b"] == 0.5 and type(loaded["b"]) is float
    assert loaded["rng"]["bit_generator"] == "PCG64"
    with pytest.raises(TypeError, match=r"checkpoint\['x'\]\['y'\]: a builtins.object cannot be saved"):
        save_checkpoint(tmp_path / "d.pt", {"x": {"y": object()}})


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "not an rlmem checkpoint" in message
    assert "objects rlmem does not write" in message and "numpy" in message  # older numpy checkpoints: said so
    assert not marker.exists()


def test_resume_from_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = crafted_checkpoint(tmp_path / "evil" / "checkpoints" / "last.pt", marker)
    for resume in (path, True):
        with pytest.raises(ValueError, match="is not an rlmem checkpoint"):
            RecurrentPPO(build_agent(AGENT, ENV), ENV, PPOConfig(**SMALL), tmp_path / "evil", resume=resume,
                         total_frames=64, verbose=0)
    assert not marker.exists()


def test_evaluating_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = crafted_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", marker)
    with pytest.raises(ValueError, match="is not an rlmem checkpoint"):
        read_checkpoint(tmp_path / "run")
    with pytest.raises(ValueError, match="is not an rlmem checkpoint"):
        load_trained_agent(path)  # what scripts/evaluate.py calls
    assert not marker.exists()


def test_a_trained_run_resumes_and_evaluates_from_its_weights_only_checkpoint(tmp_path):
    trainer = RecurrentPPO(build_agent(AGENT, ENV), ENV, PPOConfig(**SMALL), tmp_path, total_frames=64, verbose=0)
    trainer.train()
    ckpt = torch.load(trainer.checkpoint_path, weights_only=True)  # nothing allow-listed
    assert ckpt["frames"] == 64 and ckpt["identity"]["agent"] == AGENT and ckpt["progress"] == 64
    _agent, read = load_trained_agent(tmp_path)
    assert read["frames"] == 64 and read_checkpoint(tmp_path)["frames"] == 64
