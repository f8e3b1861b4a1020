"""train_rl end to end as a user runs it (``scripts/train_rl.py`` in subprocesses): outputs and logs, kill and
resume, Ctrl-C / SIGTERM, reruns into a finished run, multiruns with a bad job, own code; config errors of the
built trainer in this process (typos on the command line: tests/test_cli_errors.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlmem.commands import train_rl
from rlmem.commands.train_rl import build_trainer
from rlmem.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_rl.py"
TINY = ["ppo.num_envs=8", "ppo.rollout_len=16", "ppo.seq_len=8", "ppo.minibatches=2", "ppo.epochs=2",
        "ppo.eval_episodes=8", "ppo.eval_interval=1024"]
BATCH = 8 * 16


def run(*args, timeout=240, cwd=ROOT):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def start(*args, default_sigint=False):
    """A training subprocess; with ``default_sigint`` it gets Python's Ctrl-C handling even when the test
    runner ignores SIGINT (a background job of a non-interactive shell)."""
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if default_sigint else None
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc


def scalar_tags(run_dir: Path) -> set[str]:
    acc = events(run_dir)
    return set(acc.Tags()["scalars"]) | {f"text:{t}" for t in acc.Tags().get("tensors", [])}


def wait_for(condition, what: str, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {what} within {timeout} s")


def ckpt_frames(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "last.pt"
    return torch.load(path, weights_only=False)["frames"] if path.exists() else -1


def metrics_frames(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "metrics.json").read_text())["frames"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def test_smoke_run_writes_outputs_logs_and_the_settings_it_really_used(tmp_path):
    out = run("agent=gru", "env=delayed_cue", "env.difficulty=easy", "total_frames=2000", *TINY,
              f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("frames", "wall_seconds", "fps", "eval_return", "eval_success"):
        assert key in metrics, key
    assert metrics["frames"] == 2048 and metrics["fps"] > 0 and 0 <= metrics["eval_success"] <= 1
    # what the run really used: the preset's knobs (the yaml leaves them null), seed, size, config
    assert metrics["env_kwargs"] == {"delay": 5, "n_cues": 2, "noise": 0.0}
    assert metrics["seed"] == 0 and metrics["total_frames"] == 2000 and metrics["frames_per_batch"] == BATCH
    assert metrics["parameters"] > 1000 and metrics["config"]["agent"]["memory"] == "gru"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["frames"] == metrics["frames"]
    tags = scalar_tags(tmp_path)
    for tag in ("charts/episodic_return", "charts/SPS", "charts/eval_return", "charts/eval_success",
                "losses/value_loss", "losses/policy_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert any("hyperparameters" in t for t in tags)
    # not a terminal: no progress bar, one-line summaries in the job log, integers printed as integers
    log = (tmp_path / "train_rl.log").read_text()
    assert "\r" not in out.stderr and "\r" not in log
    assert "frames=1024 fps=" in log and "frames=2048 fps=" in log
    assert "(total_frames=2000 rounded up to whole batches of 128)" in log
    assert "done: frames=2048 " in out.stderr and "e+0" not in out.stderr


def test_any_gymnasium_id_trains(tmp_path):
    out = run("agent=lstm", "env=gym", "env.id=CartPole-v1", "total_frames=1024", *TINY, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames"] == 1024 and metrics["env_kwargs"]["max_episode_steps"] == 500
    # CartPole pays 1 per step: the greedy evaluation really ran CartPole episodes to their end
    assert metrics["eval_return"] == metrics["eval_length"] >= 8


def test_killed_run_resumes_from_its_checkpoint_with_one_clean_tensorboard_line(tmp_path):
    args = ["agent=gru", "env=delayed_cue", "env.delay=2", *TINY, "logger.checkpoint_interval=1024",
            f"hydra.run.dir={tmp_path}"]
    proc = start(*args, "total_frames=10000000")
    try:
        # kill once scalars past the checkpoint are on disk: those must not survive the resume
        wait_for(lambda: ckpt_frames(tmp_path) >= 1024 and metrics_frames(tmp_path) >= ckpt_frames(tmp_path) + 2 * BATCH,
                 "a checkpoint followed by more iterations", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    killed_at = ckpt_frames(tmp_path)
    assert max(e.step for e in events(tmp_path).Scalars("charts/SPS")) > killed_at  # the kill lost iterations
    out = run(*args, f"total_frames={killed_at + 1024}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from {tmp_path / 'checkpoints' / 'last.pt'} at frames={killed_at}" in out.stderr
    final = killed_at + 1024
    assert ckpt_frames(tmp_path) == final, "resumed run did not continue from the checkpoint"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["frames"] == final and metrics["eval_frames"] == final
    # every iteration once, in order: no duplicated steps, no curve stepping backwards
    steps = [e.step for e in events(tmp_path).Scalars("charts/SPS")]
    assert steps == list(range(BATCH, final + 1, BATCH))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_checkpoints_and_says_how_to_resume(tmp_path, sig, code):
    args = ["agent=gru", "env=delayed_cue", "env.delay=2", *TINY, "logger.checkpoint_interval=1000000",
            f"hydra.run.dir={tmp_path}"]
    proc = start(*args, "total_frames=10000000", default_sigint=True)
    wait_for(lambda: metrics_frames(tmp_path) >= 2 * BATCH, "two iterations", proc)
    assert ckpt_frames(tmp_path) == -1  # no periodic checkpoint yet: only the stop writes one
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr
    stopped_at = ckpt_frames(tmp_path)
    assert stopped_at == metrics_frames(tmp_path) >= 2 * BATCH
    last = stderr.strip().splitlines()[-1]  # one line: where it stopped, the checkpoint, how to resume
    assert f"stopped by {signal.Signals(sig).name} at frames={stopped_at}; checkpoint saved to " in last
    resume = last.split("resume with: ")[1]
    assert "train_rl.py" in resume and f"hydra.run.dir={tmp_path}" in resume and "total_frames=10000000" in resume
    out = run(*args, f"total_frames={stopped_at + BATCH}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ckpt_frames(tmp_path) == stopped_at + BATCH


def test_a_finished_run_is_reported_not_retrained_and_never_overwritten(tmp_path):
    args = ["agent=gru", "env=delayed_cue", "env.delay=2", "total_frames=256", *TINY, f"hydra.run.dir={tmp_path}"]
    assert run(*args).returncode == 0
    kept = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*")  # noqa: E731  (Hydra rewrites .hydra/)
                    if p.is_file() and p.suffix != ".log" and ".hydra" not in p.parts}
    before = kept()
    again = run(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr and "frames=256" in again.stderr
    fresh = run(*args, "resume=false")
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr
    assert kept() == before


def test_a_multirun_goes_on_past_a_bad_job_and_names_it(tmp_path):
    out = run("-m", "env.delay=2,-3,1", "total_frames=128", *TINY, f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 1
    report = out.stdout + out.stderr  # the sweep's own log (Hydra's) goes to stdout
    assert "multirun: 1 of 3 jobs failed" in report
    assert "job 1 [env.delay=-3" in report and "delay must be in [0, inf], got -3" in report
    assert metrics_frames(tmp_path / "0") == metrics_frames(tmp_path / "2") == 128
    assert not (tmp_path / "1" / "metrics.json").exists()


@pytest.mark.parametrize("memory_args", [["imports=[my_memories]", "agent.memory=ema"],
                                         ["agent.memory=my_memories:EMAMemory"]])
def test_own_memory_and_env_from_the_command_line(user_project, tmp_path, memory_args):
    out = run(*memory_args, "+agent.decay=0.5", "env=gym", "env.id=my_envs:MyCue-v0", "total_frames=128", *TINY,
              f"hydra.run.dir={tmp_path / 'run'}", cwd=user_project)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["frames"] == 128 and metrics["env_id"] == "my_envs:MyCue-v0"
    assert metrics["config"]["agent"]["memory"] == memory_args[-1].split("=")[1]
    assert metrics["parameters"] == (5 * 64 + 64) + (64 * 4 + 4) + (64 + 1)  # encoder + heads: EMA has none


@pytest.mark.parametrize(
    "override, expected",
    [
        ("env.id=my_envs:NeedsBox2D-v0", "NeedsBox2D-v0 needs an optional dependency: Box2D is not installed"),
        ("env.id=no_such_module:MyCue-v0", "cannot import module 'no_such_module'"),
        ("agent.memory=my_memories:Nope", "module 'my_memories' has no attribute 'Nope'"),
    ],
)
def test_own_code_errors_are_one_line(user_project, tmp_path, override, expected, monkeypatch, capsys):
    monkeypatch.chdir(user_project)
    monkeypatch.syspath_prepend(str(user_project))
    with pytest.raises(SystemExit) as stop:
        train_rl.main(["env=gym", override, "total_frames=128", *TINY, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("train_rl: invalid configuration: ")
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("env.n_cues=1", "n_cues"),
        ("ppo.num_envs=0", "num_envs"),
        ("ppo.lr=abc", "ppo.lr must be a number, not a string, got 'abc'"),
        ("env.delay=-1", r"env.delay must be in \[0, inf\], got -1"),
        ("ppo.anneal_lr=3", "ppo.anneal_lr must be true or false"),
        ("ppo.epochs=1.5", "ppo.epochs must be an integer .*, got 1.5"),
        ("seed=abc", "seed must be an integer .*, got 'abc'"),
        ("threads=0", r"threads=0 is not a thread count; valid: auto or an integer >= 1"),
        ("threads=many", r"threads='many' is not a thread count; valid: auto or an integer >= 1"),
        ("total_frames=0", "total_frames"),
        ("logger.progress_bar=maybe", "logger.progress_bar must be true or false"),
        ("agent.hidden_size=0", "agent.hidden_size"),
        ("+agent.no_such_param=3", "valid"),
        ("env=gym env.id=NoSuchEnv-v0", "env.id='NoSuchEnv-v0' is not a registered Gymnasium id"),
        ("imports=[no_such_module_xyz]", "cannot import module 'no_such_module_xyz'"),
        ("compile=maybe", "compile must be true or false"),
        ("device=tpu", r"device='tpu' is not a device of this machine.*valid: \['cpu'"),
        ("compile=true collector=process", "compile=true needs collector=sync"),
        ("agent=infinity trigger=learned trigger.cost_coef=-1", r"trigger.cost_coef must be .*\[0.0, inf\], got -1"),
        ("trigger=learned", "has no gated path"),
    ],
)
def test_invalid_values_raise_in_build_trainer(tmp_path, override, expected):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train_rl", overrides=[*TINY, *override.split()])
    with pytest.raises((ValueError, TypeError, KeyError, ImportError), match=expected):
        build_trainer(cfg, tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_seed_sets_the_agents_initial_weights(tmp_path):
    """Whatever the process's RNG held before (a fresh process starts from a random torch seed), seed=s
    gives the same initial weights, and another seed other ones."""
    from hydra import compose, initialize_config_dir

    weights = []
    for i, seed in enumerate((0, 0, 1)):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train_rl", overrides=[*TINY, f"seed={seed}"])
        torch.manual_seed(1000 + i)  # a different RNG state before every build
        weights.append(torch.cat([p.detach().flatten() for p in build_trainer(cfg, tmp_path / str(i)).agent.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])
