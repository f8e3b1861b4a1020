"""Greedy evaluation episodes (argmax actions), outside the collector, and what ``scripts/evaluate.py``
builds on: loading a trained agent from its checkpoint, env overrides, and recording episodes as a GIF.

Episode ``i`` of an evaluation with seed ``s`` is the env seeded ``s + i`` (row ``i`` of a vector env
seeded ``s``), so a recorded episode ``i`` (a single env seeded ``s + i``) replays it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rlmem.env_factory import MissingDependencyError, as_observation, make_vector_env, split_env_config
from rlmem.run_io import load_checkpoint

#: what a train_rl checkpoint must hold to rebuild its agent (see ``RecurrentPPO._state``)
CHECKPOINT_KEYS = ("agent", "agent_cfg", "env_cfg", "frames")


def evaluation_seed(train_seed: int) -> int:
    """The seed of a run's evaluation episodes (episode ``i`` gets ``evaluation_seed(seed) + i``): drawn from
    the training seed, so runs of different seeds evaluate on independent episodes (consecutive bases such
    as ``10_000 + seed`` made seeds 0 and 1 share all but one of their episodes) and none replays a training
    env's seed (``seed + i``, small numbers)."""
    return int(np.random.SeedSequence([train_seed, 0x5EED_E7A1]).generate_state(1)[0] >> 1) + 1_000_000


class EvaluationStopped(Exception):
    """``should_stop()`` became true during an evaluation (a trainer's Ctrl-C / SIGTERM)."""


@torch.no_grad()
def greedy_episodes(agent, env_cfg: Mapping[str, Any], n_episodes: int, seed: int,
                    max_steps: int = 100_000,
                    should_stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Run one greedy episode in each of ``n_episodes`` parallel envs (env ``i`` seeded ``seed + i``).

    Returns ``(returns [n_episodes] float64, lengths [n_episodes] int64, fired [n_episodes] int64 or None)``:
    ``fired`` counts the steps on which the memory's gated path ran (``act_greedy``'s trigger), None for an
    agent whose memory has no gated path. An episode still running after ``max_steps`` steps counts with
    what it has so far.
    """
    vec = make_vector_env(env_cfg, n_episodes, for_torchrl=False)
    obs, _ = vec.reset(seed=seed)
    state = agent.memory.initial_state(n_episodes)
    is_init = torch.ones(n_episodes, dtype=torch.bool)
    done = np.zeros(n_episodes, dtype=bool)
    returns = np.zeros(n_episodes)
    lengths = np.zeros(n_episodes, dtype=np.int64)
    fired = np.zeros(n_episodes, dtype=np.int64) if getattr(agent, "path_cost", None) is not None else None
    for _ in range(max_steps):
        if should_stop is not None and should_stop():
            vec.close()
            raise EvaluationStopped
        action, state, trigger = agent.act_greedy(as_observation(obs), state, is_init)
        is_init = torch.zeros_like(is_init)
        obs, reward, terminated, truncated, _ = vec.step(action.numpy())
        returns[~done] += reward[~done]
        lengths[~done] += 1
        if fired is not None:
            fired[~done] += trigger.numpy()[~done]
        done |= terminated | truncated
        if done.all():
            break
    vec.close()
    return returns, lengths, fired


def summarize(returns: np.ndarray, lengths: np.ndarray, success_threshold: float | None,
              fired: np.ndarray | None = None) -> dict[str, float]:
    """``eval_return`` (mean), ``eval_success`` (fraction of returns >= ``success_threshold``, NaN when the env
    defines none) and ``eval_length`` (mean steps) of ``returns: [n]``, ``lengths: [n]``; with ``fired: [n]``
    (steps on which the gated path ran) also ``eval_trigger_rate`` (fraction of all steps)."""
    success = float("nan") if success_threshold is None else float(np.mean(returns >= success_threshold))
    out = {"eval_return": float(returns.mean()), "eval_success": success, "eval_length": float(lengths.mean())}
    if fired is not None:
        out["eval_trigger_rate"] = float(fired.sum() / max(lengths.sum(), 1))
    return out


def evaluate_greedy(
    agent, env_cfg: Mapping[str, Any], n_episodes: int, seed: int, success_threshold: float | None,
    max_steps: int = 100_000, should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Run one greedy episode in each of ``n_episodes`` parallel envs.

    Returns ``eval_return`` (mean), ``eval_success`` (fraction of episodes with return >=
    ``success_threshold``, NaN when the env defines none), ``eval_length`` (mean steps) and
    ``eval_trigger_rate`` (fraction of steps on which the memory's gated path ran).
    """
    returns, lengths, fired = greedy_episodes(agent, env_cfg, n_episodes, seed, max_steps, should_stop)
    return summarize(returns, lengths, success_threshold, fired)


# --- trained agents -----------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir (``<dir>/checkpoints/last.pt``), its ``checkpoints`` dir, or a ``.pt`` file -> the file."""
    given = Path(path).expanduser()
    if not given.exists():
        raise FileNotFoundError(f"checkpoint={path}: no such file or directory; give a train_rl run dir "
                                "(holding checkpoints/last.pt) or a checkpoint .pt file")
    if given.is_file():
        return given
    for candidate in (given / "checkpoints" / "last.pt", given / "last.pt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"checkpoint={path}: {given} holds no checkpoints/last.pt; is it a train_rl run dir? "
                            "(a run writes it every logger.checkpoint_interval frames and at its end)")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The train_rl checkpoint of a run dir or ``.pt`` file, loaded weights-only (a crafted file is refused
    with a one-line :class:`~rlmem.run_io.CheckpointError` and runs nothing); raises naming what is missing."""
    path = resolve_checkpoint(path)
    ckpt = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint={path}: not a train_rl checkpoint (missing {missing})")
    return ckpt


def run_dir_of(checkpoint: Path) -> Path:
    """The run dir of ``<run dir>/checkpoints/last.pt``; for a checkpoint elsewhere, its own folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def override_env_config(env_cfg: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``env_cfg`` updated with ``overrides``.

    For an rlmem env the keys must be its knobs or ``difficulty`` (the error names them); any other
    Gymnasium env checks its own kwargs when it is built.
    """
    merged = {**env_cfg, **overrides}
    env_id, _ = split_env_config(merged)
    if env_id.startswith("rlmem/"):
        task_cls = getattr(gym.envs.registration.load_env_creator(gym.spec(env_id).entry_point), "task_cls", None)
        if task_cls is not None:
            valid = {"id", "difficulty", *task_cls.defaults}
            unknown = sorted(set(overrides) - valid)
            if unknown:
                raise ValueError(f"unknown env option(s) {unknown} for {env_id}; valid: {sorted(valid)}")
    return merged


def check_same_spaces(trained_cfg: Mapping[str, Any], env_cfg: Mapping[str, Any]) -> None:
    """Raise unless ``env_cfg`` gives the observation and action spaces the agent was trained on."""
    spaces = []
    for cfg in (trained_cfg, env_cfg):
        vec = make_vector_env(cfg, 1, for_torchrl=False)
        spaces.append((vec.single_observation_space.shape, vec.single_action_space))
        vec.close()
    (trained_obs, trained_act), (obs, act) = spaces
    if trained_obs != obs or trained_act != act:
        raise ValueError(f"the agent was trained on observations of shape {trained_obs} and actions {trained_act}; "
                         f"env {dict(env_cfg)} has {obs} and {act}; only overrides that keep both can be evaluated")


# --- recording ----------------------------------------------------------------------------------------
def make_render_env(env_cfg: Mapping[str, Any]) -> gym.Env:
    """A single env with ``render_mode="rgb_array"``; clear errors for envs that cannot render."""
    env_id, kwargs = split_env_config(env_cfg)
    entry_point = gym.spec(env_id).entry_point
    creator = entry_point if callable(entry_point) else gym.envs.registration.load_env_creator(entry_point)
    render_modes = getattr(creator, "metadata", {}).get("render_modes", [])
    if "rgb_array" not in render_modes:
        raise ValueError(f"video: {env_id} cannot be recorded, it has no 'rgb_array' render mode "
                         f"(its render modes: {render_modes})")
    try:
        env = gym.make(env_id, render_mode="rgb_array", **kwargs)
        env.reset(seed=0)
        env.render()  # Gymnasium's own envs import their drawing packages here
    except gym.error.DependencyNotInstalled as err:
        raise MissingDependencyError(f"video: rendering {env_id} needs an optional dependency: {err}") from None
    return env


@torch.no_grad()
def record_episodes(agent, env_cfg: Mapping[str, Any], n_episodes: int, seed: int,
                    max_steps: int = 100_000) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Greedy episodes ``i = 0 .. n_episodes - 1`` in a single env seeded ``seed + i`` (so they replay the
    first episodes of :func:`greedy_episodes` with the same seed), rendered.

    Returns ``(frames, returns [n_episodes])``: ``frames[i]`` holds ``length_i + 1`` frames ``[H, W, 3]``
    uint8, after the reset and after every step.
    """
    env = make_render_env(env_cfg)
    episodes, returns = [], np.zeros(n_episodes)
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        state = agent.memory.initial_state(1)
        is_init = torch.ones(1, dtype=torch.bool)
        frames = [env.render()]
        for _ in range(max_steps):
            action, state, _ = agent.act_greedy(as_observation(obs, batch=True), state, is_init)
            is_init = torch.zeros_like(is_init)
            obs, reward, terminated, truncated, _ = env.step(int(action[0]) if action.dim() == 1 else action[0].numpy())
            returns[i] += reward
            frames.append(env.render())
            if terminated or truncated:
                break
        episodes.append(frames)
    env.close()
    return episodes, returns


def write_gif(path: str | Path, episodes: Sequence[Sequence[np.ndarray]], fps: float,
              captions: Sequence[str] | None = None, hold_last: int = 3) -> int:
    """Write the episodes' frames back to back as one looping GIF (Pillow, no video codec needed).

    ``captions[i]`` is drawn in a strip above episode ``i``'s frames with the step number; each episode's
    last frame is shown ``hold_last`` times as long. Returns the number of frames written.
    """
    from PIL import Image, ImageDraw

    from rlmem.envs.render import load_font

    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    font = load_font(12)
    images, durations = [], []
    frame_ms = 1000.0 / fps
    for i, frames in enumerate(episodes):
        for step, frame in enumerate(frames):
            image = Image.fromarray(np.asarray(frame, dtype=np.uint8))
            if captions is not None:
                strip = Image.new("RGB", (image.width, 20), (255, 255, 255))
                ImageDraw.Draw(strip).text((6, 3), f"{captions[i]}   step {step}", fill=(20, 20, 20), font=font)
                framed = Image.new("RGB", (image.width, image.height + 20))
                framed.paste(strip, (0, 0))
                framed.paste(image, (0, 20))
                image = framed
            # one adaptive palette per frame: rlmem frames hold few colours, so this is lossless for them
            images.append(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=128))
            durations.append(round(frame_ms * (hold_last if step == len(frames) - 1 else 1)))
    if not images:
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=True)
    return len(images)
