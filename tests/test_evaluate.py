"""``rlmem-evaluate`` (rlmem.commands.evaluate) on a checkpoint from a short real training run, and the ``rgb_array`` render every
rlmem env has (what the script's GIFs are made of).

Expectations are built independently of ``rlmem.evaluate``'s episode loops: the agent is rebuilt here from
the checkpoint's configs, and per-episode returns come from a plain single-env loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.envs.registration import load_env_creator
from gymnasium.utils.env_checker import check_env as gym_check_env
from PIL import Image
from torchrl.data import Categorical

import rlmem  # noqa: F401  (registers the envs)
from rlmem.agents import ActorCritic
from rlmem.commands import evaluate as evaluate_command
from rlmem.evaluate import evaluate_greedy, evaluation_seed, greedy_episodes, record_episodes, write_gif

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DELAY, N_CUES = 3, 4  # a DelayedCue episode lasts DELAY + 2 steps
TRAIN_EVAL_EPISODES = 16
IDS = sorted(i for i in gym.registry if i.startswith("rlmem/"))


def script(name: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *overrides], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real (short) train_rl run: 2048 frames of a small GRU agent on DelayedCue(delay=3)."""
    run = tmp_path_factory.mktemp("evaluate") / "run"
    out = script("train_rl", "agent=gru", "agent.hidden_size=16", "agent.encoder_dim=16", "env=delayed_cue",
                 f"env.delay={DELAY}", "total_frames=2048", "ppo.num_envs=8", "ppo.rollout_len=32", "ppo.seq_len=32",
                 "ppo.epochs=2", "ppo.minibatches=2", "ppo.eval_interval=1000000",
                 f"ppo.eval_episodes={TRAIN_EVAL_EPISODES}", "logger.progress_bar=false", f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr
    assert (run / "checkpoints" / "last.pt").is_file()
    return run


@pytest.fixture(scope="module")
def trained(run_dir):
    """The trained agent, rebuilt here from the checkpoint's own configs (as RecurrentPPO builds it)."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    agent = ActorCritic(N_CUES + 1, N_CUES, Categorical(N_CUES), ckpt["agent_cfg"])
    agent.load_state_dict(ckpt["agent"])
    return agent.eval(), ckpt


def evaluate_cli(*overrides: str) -> dict:
    """``scripts/evaluate.py`` in a subprocess: the JSON on its stdout."""
    out = script("evaluate", *overrides)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def evaluate_main(capsys, *overrides: str) -> dict:
    """The command's ``main`` in this process: the JSON it prints."""
    capsys.readouterr()
    evaluate_command.main(list(overrides))
    return json.loads(capsys.readouterr().out)


@torch.no_grad()
def single_env_returns(agent, n_episodes: int, seed: int, **env_kwargs) -> tuple[list[float], list[int]]:
    """Greedy episode i in ``gym.make`` seeded ``seed + i``, one step at a time."""
    returns, lengths = [], []
    for i in range(n_episodes):
        env = gym.make("rlmem/DelayedCue-v0", **env_kwargs)
        obs, _ = env.reset(seed=seed + i)
        state, first, total, steps, done = agent.memory.initial_state(1), True, 0.0, 0, False
        while not done:
            x = agent.encoder(torch.as_tensor(obs)[None, None])
            y, state = agent.memory(x, state, torch.tensor([[first]]))
            obs, reward, terminated, truncated, _ = env.step(int(agent.policy_head(y[0, 0]).argmax()))
            first, total, steps, done = False, total + reward, steps + 1, terminated or truncated
        returns.append(total)
        lengths.append(steps)
    return returns, lengths


def test_evaluate_run_dir_matches_evaluate_greedy_and_the_runs_own_evaluation(run_dir, trained):
    agent, ckpt = trained
    result = evaluate_cli(f"checkpoint={run_dir}", f"episodes={TRAIN_EVAL_EPISODES}")
    # default seed: the run's own evaluations' (drawn from training seed 0)
    assert result["seed"] == evaluation_seed(0) != evaluation_seed(1)
    expected = evaluate_greedy(agent, ckpt["env_cfg"], TRAIN_EVAL_EPISODES, seed=evaluation_seed(0),
                               success_threshold=1 - 1e-6)
    for key in ("eval_return", "eval_success", "eval_length"):
        assert result[key] == pytest.approx(expected[key]), key
    # the training run's last evaluation (same weights, seed and episodes) is reproduced
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result["eval_return"] == pytest.approx(metrics["eval_return"])
    assert result["eval_success"] == pytest.approx(metrics["eval_success"])
    returns, lengths = single_env_returns(agent, TRAIN_EVAL_EPISODES, evaluation_seed(0), delay=DELAY)
    assert result["returns"] == returns and result["lengths"] == lengths == [DELAY + 2] * TRAIN_EVAL_EPISODES
    assert result["memory"] == "gru" and result["trained_frames"] == ckpt["frames"] == 2048
    assert result["env_kwargs"] == {"delay": DELAY, "n_cues": N_CUES, "noise": 0.0}
    # the JSON on stdout is also in the run dir
    assert Path(result["out"]) == run_dir / "eval.json"
    assert json.loads((run_dir / "eval.json").read_text()) == result


def test_evaluate_checkpoint_file_gives_the_same_numbers(run_dir, trained, capsys):
    agent, ckpt = trained
    result = evaluate_main(capsys, f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", "episodes=10", "seed=123",
                          f"out={run_dir / 'pt_eval.json'}")
    expected = evaluate_greedy(agent, ckpt["env_cfg"], 10, seed=123, success_threshold=1 - 1e-6)
    for key in ("eval_return", "eval_success", "eval_length"):
        assert result[key] == pytest.approx(expected[key]), key
    assert result["returns"] == single_env_returns(agent, 10, 123, delay=DELAY)[0]
    assert json.loads((run_dir / "pt_eval.json").read_text()) == result


def test_env_override_changes_the_evaluated_env(run_dir, trained, capsys):
    agent, _ = trained
    result = evaluate_main(capsys, f"checkpoint={run_dir}", "episodes=6", "env.delay=7")
    assert result["env_overrides"] == {"delay": 7}
    assert result["env_kwargs"]["delay"] == 7
    assert result["lengths"] == [7 + 2] * 6 and result["eval_length"] == 9.0
    assert result["returns"] == single_env_returns(agent, 6, evaluation_seed(0), delay=7)[0]
    # written next to the run's own eval.json, not over it
    assert Path(result["out"]) == run_dir / "eval_delay=7.json"


def test_video_writes_a_gif_of_the_first_episodes(run_dir, tmp_path, capsys):
    video = tmp_path / "video"
    result = evaluate_main(capsys, f"checkpoint={run_dir}", "episodes=5", f"video={video}", "video_episodes=2")
    gif = Image.open(video / "eval.gif")
    # per episode: the frame after reset and one after each of its DELAY + 2 steps
    assert gif.n_frames == result["video_frames"] == 2 * (DELAY + 3)
    sizes = set()
    for k in range(gif.n_frames):
        gif.seek(k)
        sizes.add(gif.size)
    assert len(sizes) == 1
    # the recorded episodes are the evaluation's first two, replayed
    assert result["recorded_returns"] == result["returns"][:2]
    assert json.loads((video / "eval.json").read_text()) == result


def config(**overrides):
    base = {"checkpoint": None, "episodes": 4, "seed": None, "env": {}, "video": None, "video_episodes": 1,
            "fps": 4, "out": None, "threads": 1, "imports": []}
    return {**base, **overrides}


def test_clear_errors(run_dir, tmp_path):
    evaluate = evaluate_command.evaluate
    with pytest.raises(ValueError, match="checkpoint=<run dir or .pt file> is required"):
        evaluate(config())
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        evaluate(config(checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="holds no checkpoints/last.pt"):
        evaluate(config(checkpoint=str(tmp_path)))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pt is not an rlmem checkpoint: torch cannot read it \(UnpicklingError: .*\); nothing in it ran$"):
        evaluate(config(checkpoint=str(tmp_path / "junk.pt")))
    for episodes in (0, -3):
        with pytest.raises(ValueError, match=r"episodes must be in \[1, inf\]"):
            evaluate(config(checkpoint=str(run_dir), episodes=episodes))
    with pytest.raises(ValueError, match=r"unknown env option\(s\) \['dealy'\].*valid: .*'delay'"):
        evaluate(config(checkpoint=str(run_dir), env={"dealy": 20}))
    with pytest.raises(ValueError, match="trained on observations of shape"):
        evaluate(config(checkpoint=str(run_dir), env={"n_cues": 8}))
    with pytest.raises(ValueError, match=r"video_episodes must be in \[1, inf\]"):
        evaluate(config(checkpoint=str(run_dir), video=str(tmp_path / "v"), video_episodes=0))
    with pytest.raises(ValueError, match=r"fps must be a finite number"):
        evaluate(config(checkpoint=str(run_dir), video=str(tmp_path / "v"), fps=0))


def test_more_video_episodes_than_evaluated_ones(run_dir, tmp_path):
    """Recorded episode i is seeded seed + i whether or not it is one of the evaluation's."""
    evaluate = evaluate_command.evaluate
    result = evaluate(config(checkpoint=str(run_dir), episodes=1, video=str(tmp_path / "v"), video_episodes=3))
    assert Image.open(tmp_path / "v" / "eval.gif").n_frames == result["video_frames"] == 3 * (DELAY + 3)
    assert result["recorded_returns"][:1] == result["returns"]


def test_errors_exit_with_code_2_and_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        evaluate_command.main([f"checkpoint={tmp_path}", "episodes=3"])
    out = capsys.readouterr()
    assert stop.value.code == 2
    assert out.out == ""
    assert out.err.strip().splitlines() == [
        f"evaluate: invalid configuration: checkpoint={tmp_path}: {tmp_path} holds no checkpoints/last.pt; is it a "
        "train_rl run dir? (a run writes it every logger.checkpoint_interval frames and at its end)"]


class Toy(gym.Env):
    """Any Gymnasium env that renders (not an rlmem TaskEnv): episodes of 2 .. 6 steps drawn at reset, reward
    1 for action 1; frames are 8 x 12 and show the step."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode=None):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.length = 0, int(self.np_random.integers(2, 7))
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), {}

    def step(self, action):
        self.t += 1
        obs = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return obs, float(action == 1), self.t >= self.length, False, {}

    def render(self):
        return np.full((8, 12, 3), 20 * self.t, dtype=np.uint8)


def test_recording_any_gymnasium_env_replays_the_evaluations_first_episodes(tmp_path):
    if "rlmem_test/Toy-v0" not in gym.registry:
        gym.register("rlmem_test/Toy-v0", entry_point=Toy)
    env_cfg = {"id": "rlmem_test/Toy-v0"}
    torch.manual_seed(0)
    agent = ActorCritic(2, 2, Categorical(2), {"memory": "gru", "encoder_dim": 8, "hidden_size": 8}).eval()
    returns, lengths, _ = greedy_episodes(agent, env_cfg, 5, seed=3)
    frames, recorded = record_episodes(agent, env_cfg, 3, seed=3)
    assert recorded.tolist() == returns[:3].tolist()
    assert [len(f) for f in frames] == (lengths[:3] + 1).tolist()  # reset frame + one per step
    assert len(set(lengths.tolist())) > 1  # the episodes really differ in length
    n = write_gif(tmp_path / "toy.gif", frames, fps=10, captions=["a", "b", "c"])
    gif = Image.open(tmp_path / "toy.gif")
    assert n == gif.n_frames == int((lengths[:3] + 1).sum())
    assert gif.size == (12, 8 + 20)  # the caption strip sits above the env's frame
    with pytest.raises(ValueError, match="fps must be > 0"):
        write_gif(tmp_path / "bad.gif", frames, fps=0)


# --- the rgb_array render of every rlmem env ------------------------------------------------------------
def make(env_id, **extra):
    kwargs = dict(getattr(load_env_creator(gym.spec(env_id).entry_point).task_cls, "test_kwargs", {}))
    return gym.make(env_id, **kwargs, **extra)


@pytest.mark.parametrize("env_id", IDS)
def test_render_rgb_array(env_id):
    env = make(env_id, render_mode="rgb_array")
    env.reset(seed=0)
    frames = [env.render()]
    env.action_space.seed(0)
    for _ in range(20):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        frames.append(env.render())
        if terminated or truncated:
            break
    first = frames[0]
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3
    assert all(f.shape == first.shape for f in frames)  # one size per env, as a video needs
    assert all((a != b).any() for a, b in zip(frames, frames[1:]))  # the step index at least changes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gym_check_env(env.unwrapped, skip_render_check=False)  # Gymnasium's own checks of the declared modes


@pytest.mark.parametrize("env_id", IDS)
def test_render_modes(env_id):
    env = make(env_id)
    env.reset(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert env.render() is None  # no render mode: Gymnasium's convention
    with pytest.raises(ValueError, match="valid: None, 'rgb_array'"):
        load_env_creator(gym.spec(env_id).entry_point)(render_mode="ansi")


def test_delayed_cue_frames_show_the_hidden_cue_and_the_last_action():
    def frame_after(seed, action):
        env = gym.make("rlmem/DelayedCue-v0", delay=5, render_mode="rgb_array")
        env.reset(seed=seed)
        obs, *_ = env.step(action)  # t = 1: a blank observation
        return obs, env.unwrapped.get_state(), env.render()

    cues = {seed: int(frame_after(seed, 0)[1]["cue"]) for seed in range(8)}
    a, b = next((s, t) for s in cues for t in cues if cues[s] != cues[t])
    (obs_a, _, frame_a), (obs_b, _, frame_b) = frame_after(a, 0), frame_after(b, 0)
    np.testing.assert_array_equal(obs_a, obs_b)  # nothing observable differs ...
    assert (frame_a != frame_b).any()  # ... but the hidden cue is drawn
    (obs_0, state_0, frame_0), (obs_1, state_1, frame_1) = frame_after(a, 0), frame_after(a, 1)
    np.testing.assert_array_equal(obs_0, obs_1)
    assert state_0 == state_1  # the ignored action changed nothing in the env ...
    assert (frame_0 != frame_1).any()  # ... and is drawn


def test_runs_of_different_seeds_evaluate_on_independent_episodes():
    """Episode i of a run's evaluation is seeded evaluation_seed(seed) + i: for seeds 0..199 and 64 episodes
    the seed ranges are disjoint (a base of 10_000 + seed made seeds 0 and 1 share 63 of 64 episodes) and
    never those of the training envs (seed + i)."""
    n, seeds = 64, range(200)
    ranges = sorted((evaluation_seed(s), evaluation_seed(s) + n) for s in seeds)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))
    assert min(start for start, _ in ranges) > max(seeds) + 1024  # above any training env's seed
    assert evaluation_seed(3) == evaluation_seed(3)  # a resumed run evaluates on the same episodes
