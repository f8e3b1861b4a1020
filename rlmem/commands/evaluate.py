"""Evaluate and watch a trained agent: ``rlmem-evaluate checkpoint=<run dir or .pt> episodes=N``.

Rebuilds the agent with the configs stored in its checkpoint (``agent_cfg``, ``env_cfg``), runs ``episodes``
greedy episodes (argmax actions) and reports the mean return, the success rate and the mean length.

- ``env.<knob>=value`` evaluates on a changed env, e.g. ``env.delay=20`` for a DelayedCue agent trained at
  another delay (the trained env config updated with the overrides; unknown knobs and changed
  observation / action spaces are refused).
- ``video=DIR`` records the first ``video_episodes`` episodes as ``DIR/eval.gif`` from the env's
  ``rgb_array`` frames (rlmem's envs draw the observation, the hidden state and the last action).
- A summary line goes to stderr; the results as JSON go to stdout and to ``out`` (default
  ``DIR/eval.json`` with a video, else ``<run dir>/eval.json``; see rlmem/conf/evaluate.yaml).

Exit codes: 0 done, 2 invalid configuration (missing checkpoint, episodes < 1, unknown env knob, ...).
Also ``python -m rlmem.commands.evaluate`` and, in a checkout, ``python scripts/evaluate.py``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlmem.agents import load_trained_agent
from rlmem.cli import CONFIG_ERRORS
from rlmem.commands._hydra import fail, run_hydra
from rlmem.env_factory import effective_env_kwargs, success_threshold
from rlmem.evaluate import (
    check_same_spaces,
    evaluation_seed,
    greedy_episodes,
    make_render_env,
    override_env_config,
    record_episodes,
    resolve_checkpoint,
    run_dir_of,
    summarize,
    write_gif,
)
from rlmem.user_code import import_modules
from rlmem.validate import check_float, check_int

log = logging.getLogger("rlmem.evaluate")


def default_seed(run_dir: Path) -> int:
    """The seed of the run's own evaluations (:func:`rlmem.evaluate.evaluation_seed` of its training seed,
    from its ``metrics.json``; of seed 0 if unknown)."""
    metrics = run_dir / "metrics.json"
    seed = json.loads(metrics.read_text()).get("seed") if metrics.exists() else None
    return evaluation_seed(seed if isinstance(seed, int) else 0)


def default_out(run_dir: Path, video: Path | None, overrides: dict[str, Any]) -> Path:
    if video is not None:
        return video / "eval.json"
    suffix = "".join(f"_{k}={v}" for k, v in sorted(overrides.items())).replace("/", "-")
    return run_dir / f"eval{suffix}.json"


def to_json(result: dict[str, Any]) -> str:
    """One key per line in the order above, lists and dicts inline; NaN (no success threshold) as null."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    lines = [f"  {json.dumps(key)}: {json.dumps(clean(value), allow_nan=False)}" for key, value in result.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def evaluate(config: dict[str, Any]) -> dict[str, Any]:
    """Everything ``rlmem-evaluate`` does, from its resolved config; returns the JSON results."""
    import_modules(config["imports"])
    torch.set_num_threads(check_int("threads", config["threads"], low=1))
    if config["checkpoint"] in (None, "???"):
        raise ValueError("checkpoint=<run dir or .pt file> is required")
    episodes = check_int("episodes", config["episodes"], low=1)
    video = None if config["video"] is None else Path(config["video"])
    if video is not None:
        video_episodes = check_int("video_episodes", config["video_episodes"], low=1)
        fps = check_float("fps", config["fps"], low=1e-3)
    overrides = dict(config["env"] or {})

    checkpoint = resolve_checkpoint(config["checkpoint"])
    run_dir = run_dir_of(checkpoint)
    seed = default_seed(run_dir) if config["seed"] is None else check_int("seed", config["seed"], low=0)
    agent, ckpt = load_trained_agent(checkpoint)
    env_cfg = override_env_config(ckpt["env_cfg"], overrides)
    check_same_spaces(ckpt["env_cfg"], env_cfg)
    env_kwargs = effective_env_kwargs(env_cfg)
    threshold = success_threshold(env_cfg)
    if video is not None:
        make_render_env(env_cfg).close()  # an env that cannot render fails now, not after the evaluation

    returns, lengths, fired = greedy_episodes(agent, env_cfg, episodes, seed)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint.resolve()),
        "memory": ckpt["agent_cfg"].get("memory"),
        "trained_frames": ckpt["frames"],
        "env_id": env_cfg["id"],
        "env_kwargs": env_kwargs,
        "env_overrides": overrides,
        "episodes": episodes,
        "seed": seed,
        **summarize(returns, lengths, threshold, fired),
        "eval_return_std": float(returns.std()),
        "trigger": ckpt.get("trigger_cfg", {"policy": "always"}),
        "success_threshold": threshold,
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
    }
    if video is not None:
        frames, recorded = record_episodes(agent, env_cfg, video_episodes, seed)
        captions = [f"{result['memory']} agent, greedy - episode {i + 1}/{video_episodes}"
                    for i in range(video_episodes)]
        gif = video / "eval.gif"
        n_frames = write_gif(gif, frames, fps, captions)
        result.update(video=str(gif.resolve()), video_frames=n_frames, recorded_returns=recorded.tolist())
    out = default_out(run_dir, video, overrides) if config["out"] is None else Path(config["out"])
    result["out"] = str(out.resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_json(result))
    knobs = ", ".join(f"{k}={v}" for k, v in env_kwargs.items())
    success = "n/a (no success threshold)" if threshold is None else f"{result['eval_success']:.3f}"
    log.info("%s agent (%d frames) on %s(%s): %d greedy episodes, return %.3f +- %.3f, success %s, length %.1f%s",
             result["memory"], ckpt["frames"], env_cfg["id"], knobs, episodes, result["eval_return"],
             result["eval_return_std"], success, result["eval_length"],
             f"; GIF {result['video']} ({result['video_frames']} frames)" if video is not None else "")
    return result


def _job(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("torchrl").setLevel(logging.WARNING)
    config = OmegaConf.to_container(cfg, resolve=True)
    try:
        result = evaluate(config)
    except CONFIG_ERRORS as err:
        fail("evaluate", str(err.args[0]) if len(err.args) == 1 else str(err))
    print(to_json(result), end="")


def env_overrides_without_plus(argv: list[str]) -> list[str]:
    """``env.delay=20`` -> ``++env.delay=20``: the keys of ``env`` are not known before the checkpoint is
    read, and Hydra refuses new keys without a ``+``; ``+``/``++`` forms pass unchanged."""
    return [f"++{arg}" if arg.startswith("env.") and "=" in arg else arg for arg in argv]


def main(argv: Sequence[str] | None = None) -> None:
    """``rlmem-evaluate checkpoint=... [overrides]``."""
    args = env_overrides_without_plus(list(sys.argv[1:] if argv is None else argv))
    run_hydra("evaluate", "evaluate", _job, __doc__, args)


if __name__ == "__main__":
    main()
