"""scripts/train_lm.py and the training pieces in rlmem.lm_training."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import rlmem  # noqa: F401  (registers the memory systems)
from rlmem.lm_tasks import build_task
from rlmem.interrupts import TrainingInterrupted
from rlmem.lm_training import ConfigError, LMModel, answer_loss, evaluate, run, setup
from rlmem.run_io import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_COPY = {"name": "copy_memory", "n_items": 3, "delay": 2, "vocab_size": 6}  # chance 1/4
GRU = {"memory": "gru", "d_model": 32, "hidden_size": 32}


def train_lm(*overrides: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_lm.py"), *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_script_writes_outputs_and_a_gru_learns_copy_memory(tmp_path):
    proc = train_lm(
        "model=gru", "task=copy_memory", "task.n_items=3", "task.delay=2", "task.vocab_size=6",
        "steps=300", "eval_interval=100", "checkpoint_interval=100", f"hydra.run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 300 and metrics["tokens_per_s"] > 0 and metrics["wall_seconds"] > 0
    assert metrics["chance_accuracy"] == pytest.approx(0.25)
    assert metrics["eval_accuracy"] >= 0.6, metrics  # well above chance (0.25)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 300 and "model" in ckpt
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"lm/train_loss", "lm/eval_accuracy"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("lm/eval_accuracy")] == [100, 200, 300]


def test_script_rejects_bad_config_before_training(tmp_path):
    proc = train_lm("model.memory=nope", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "valid choices" in proc.stderr and "gru" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def cfg(**overrides):
    return {"model": dict(GRU), "task": dict(TINY_COPY), "steps": 10, "batch_size": 8, "eval_interval": 5,
            "eval_batches": 2, "checkpoint_interval": 5, **overrides}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"task": {"name": "copy"}}, "valid choices: assoc_recall, babi, copy_memory"),
        ({"task": {"name": "copy_memory", "items": 3}}, "valid: .*n_items"),
        ({"task": {"name": "copy_memory", "n_items": 0}}, "n_items"),
        ({"model": {"memory": "grux"}}, "valid choices: .*gru"),
        ({"model": {"memory": "gru", "hidden": 3}}, "valid: .*hidden_size"),
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"lr_schedule": "linear"}, r"lr_schedule must be one of \['constant', 'cosine'\]"),
        ({"warmup_steps": -1}, "warmup_steps must be"),
        ({"eval_seed": 0}, "eval_seed"),
        ({"stepz": 3}, "valid: .*steps"),
        ({"eval_every": 3}, "eval_every is now eval_interval"),  # the RL trainer's names, for both trainers
        ({"device": "tpu"}, r"device='tpu' is not a device of this machine.*valid: \['cpu'"),
        ({"device": "cuda:99"}, r"device='cuda:99' is not a device of this machine"),
    ],
)
def test_bad_config_values_name_the_valid_choices(overrides, match):
    with pytest.raises(ConfigError, match=match):
        setup(cfg(**overrides))


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    # a longer run continues a finished shorter one: with a constant learning rate the two parts add up exactly
    constant = {"lr_schedule": "constant", "warmup_steps": 0}
    full = run(cfg(steps=10, **constant), tmp_path / "full", progress=False)
    run(cfg(steps=5, **constant), tmp_path / "split", progress=False)
    resumed = run(cfg(steps=10, **constant), tmp_path / "split", progress=False)
    assert resumed["steps"] == 10
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert resumed["eval_accuracy"] == full["eval_accuracy"]
    # another task in the same run dir: refused, naming the key that differs
    with pytest.raises(ValueError, match=r"other settings \(task\.delay: 2 -> 3; checkpoint -> now\)"):
        run(cfg(steps=12, task={**TINY_COPY, "delay": 3}), tmp_path / "split", progress=False)


class ScalarLog:
    """A TensorBoard writer stand-in that records scalars and can send this process a signal at a step."""

    def __init__(self, stop_at: int | None = None):
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.stop_at = stop_at

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))
        if tag == "lm/train_loss" and step == self.stop_at:
            # SIGTERM (always taken over while training, unlike SIGINT in a background job): the trainer
            # checkpoints after this step and stops
            os.kill(os.getpid(), signal.SIGTERM)

    def flush(self):
        pass


def test_learning_rate_warms_up_then_follows_a_cosine_and_survives_an_interruption(tmp_path):
    lr, steps, warmup = 1e-3, 10, 3
    schedule = {"lr": lr, "warmup_steps": warmup, "lr_schedule": "cosine", "steps": steps}
    log = ScalarLog()
    run(cfg(**schedule), tmp_path / "full", writer=log, progress=False)
    expected = [lr * s / warmup for s in (1, 2, 3)]
    expected += [lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup + 1))) for s in range(4, 11)]
    assert [step for step, _ in log.scalars["lm/learning_rate"]] == list(range(1, 11))
    assert [v for _, v in log.scalars["lm/learning_rate"]] == pytest.approx(expected, rel=1e-12)
    assert expected[-1] > 0 and expected[3] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi / 8)))
    # a stop after step 4, then resume: the schedule continues from the step count, the weights end identical
    with pytest.raises(TrainingInterrupted):
        run(cfg(**schedule), tmp_path / "split", writer=ScalarLog(stop_at=4), progress=False)
    assert load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["step"] == 4
    rest = ScalarLog()
    run(cfg(**schedule), tmp_path / "split", writer=rest, progress=False)
    assert [v for _, v in rest.scalars["lm/learning_rate"]] == pytest.approx(expected[4:], rel=1e-12)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_loss_and_eval_use_answer_positions_only():
    task = build_task("copy_memory", n_items=2, delay=1, vocab_size=5)
    batch = next(task.batches(4, seed=0))
    torch.manual_seed(0)
    model = LMModel(task.vocab_size, "gru", d_model=8, hidden_size=8)
    logits = model(batch.inputs)
    assert logits.shape == (4, task.seq_len, task.vocab_size)
    perfect = torch.full_like(logits, -10.0)
    perfect[batch.mask] = perfect[batch.mask].scatter(1, batch.targets[batch.mask].unsqueeze(1), 10.0)
    assert answer_loss(perfect, batch.targets, batch.mask) < 1e-6  # non-answer positions never count

    assert answer_loss(perfect[batch.mask], batch.targets, batch.mask) < 1e-6
    torch.testing.assert_close(model(batch.inputs, batch.mask), logits[batch.mask])

    class Oracle(torch.nn.Module):
        def forward(self, inputs, mask):
            return perfect[mask]

    result = evaluate(Oracle(), [batch])
    assert result["accuracy"] == result["sequence_accuracy"] == 1.0


@pytest.mark.parametrize("memory", ["gru", "lstm", "mlp"])
def test_model_wrapper_shapes(memory):
    inputs = next(build_task("induction_head", seq_len=6, vocab_size=5).batches(2, seed=0)).inputs
    assert LMModel(5, memory, d_model=8, hidden_size=8)(inputs).shape == (2, 6, 5)


TINY_ARGS = ["model=gru", "task=copy_memory", "task.n_items=3", "task.delay=2", "task.vocab_size=6",
             "eval_interval=10", "checkpoint_interval=10"]


def test_a_finished_run_is_reported_not_retrained_and_never_overwritten(tmp_path):
    assert train_lm(*TINY_ARGS, "steps=20", f"hydra.run.dir={tmp_path}").returncode == 0
    first = (tmp_path / "metrics.json").read_bytes()
    metrics = json.loads(first)
    assert metrics["wall_seconds"] > 0 and metrics["tokens_per_s"] > 0 and metrics["seed"] == 0
    assert metrics["config"]["model"]["memory"] == "gru"
    log = (tmp_path / "train_lm.log").read_text()
    assert "step=10/20 train_loss=" in log and "step=20/20 train_loss=" in log  # one line per evaluation
    again = train_lm(*TINY_ARGS, "steps=20", f"hydra.run.dir={tmp_path}")
    assert again.returncode == 0 and "already finished at step 20" in again.stderr
    assert json.loads(again.stdout)["tokens_per_s"] == metrics["tokens_per_s"]
    fresh = train_lm(*TINY_ARGS, "steps=20", "resume=false", f"hydra.run.dir={tmp_path}")
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr
    assert (tmp_path / "metrics.json").read_bytes() == first


def test_resumed_run_counts_time_and_tokens_of_all_its_parts(tmp_path):
    run(cfg(steps=5), tmp_path, progress=False)
    first = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert first["train_seconds"] > 0 and first["wall_seconds"] >= first["train_seconds"]
    resumed = run(cfg(steps=10), tmp_path, progress=False)
    assert resumed["wall_seconds"] > first["wall_seconds"]
    tokens = 10 * 8 * build_task(**TINY_COPY).seq_len  # every step of the run, both parts
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert resumed["tokens_per_s"] == pytest.approx(tokens / last["train_seconds"])


def test_sigterm_checkpoints_and_says_how_to_resume(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train_lm.py"), *TINY_ARGS, "steps=1000000", "checkpoint_interval=100000",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while "step=20/" not in ((tmp_path / "train_lm.log").read_text() if (tmp_path / "train_lm.log").exists() else ""):
        assert proc.poll() is None and time.time() < deadline, "no evaluation logged"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in stderr
    step = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"]
    last = stderr.strip().splitlines()[-1]
    assert step >= 20 and f"stopped by SIGTERM at step {step}; checkpoint saved to " in last
    assert f"hydra.run.dir={tmp_path}" in last.split("resume with: ")[1]


def test_own_memory_from_the_command_line(user_project, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_lm.py"), *TINY_ARGS, "steps=10",
         "model.memory=my_memories:EMAMemory", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=user_project, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["model"] == "my_memories:EMAMemory"
