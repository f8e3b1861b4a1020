"""Steps/s of rlmem's vectorized envs vs POPGym's implementation of the same task in ``SyncVectorEnv``.

Both sides step ``--num-envs`` copies with the same pre-drawn uniformly random actions and Gymnasium's
default next-step autoreset; rlmem envs run at their ``easy`` preset, POPGym's at its ``Easy`` class
(the same task sizes). The two are timed in alternation for ``--rounds`` rounds and each keeps its best
round, so load from other processes on a shared machine hits both sides alike. Prints a markdown table
(copied into ``docs/envs.md``)::

    python scripts/bench_envs.py                    # all envs, ~25 s
    python scripts/bench_envs.py --measure-chance   # also re-measure CartPole's random-policy return
"""

from __future__ import annotations

import argparse
import time
import warnings

import gymnasium as gym
import numpy as np
import popgym.envs as popgym_envs

import rlmem  # noqa: F401  (registers the envs)
from rlmem.envs import ENV_IDS

#: rlmem config name -> POPGym class of the same task at the Easy difficulty (None: POPGym has none)
POPGYM_TWIN = {
    "delayed_cue": None,
    "tmaze_passive": None,
    "tmaze_active": None,
    "repeat_previous": "RepeatPreviousEasy",
    "repeat_first": "RepeatFirstEasy",
    "count_recall": "CountRecallEasy",
    "autoencode": "AutoencodeEasy",
    "position_only_cartpole": "PositionOnlyCartPoleEasy",
    "memory_length": None,
}


def steps_per_second(env: gym.vector.VectorEnv, seconds: float, seed: int = 0) -> float:
    """Env steps per second (``num_envs`` per vector step), random actions, after a short warm-up."""
    n = env.single_action_space.n
    actions = np.random.default_rng(seed).integers(n, size=(1024, env.num_envs))
    env.reset(seed=seed)
    for a in actions[:20]:
        env.step(a)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for a in actions[:64]:
            env.step(a)
        steps += 64
    return steps * env.num_envs / (time.perf_counter() - start)


def rlmem_vec(config_name: str, num_envs: int) -> gym.vector.VectorEnv:
    return gym.make_vec(ENV_IDS[config_name], num_envs=num_envs, vectorization_mode="vector_entry_point",
                        difficulty="easy")


def popgym_vec(class_name: str, num_envs: int) -> gym.vector.VectorEnv:
    cls = getattr(popgym_envs, class_name)
    return gym.vector.SyncVectorEnv([cls for _ in range(num_envs)])


def measure_chance(n_episodes: int) -> None:
    from rlmem.envs.cartpole import RANDOM_POLICY_MEAN_LENGTH, random_policy_lengths

    lengths = random_policy_lengths(n_episodes)
    sem = lengths.std() / np.sqrt(n_episodes)
    print(f"CartPole random policy over {n_episodes} episodes: mean length {lengths.mean():.3f} +- {sem:.3f} "
          f"(longest {lengths.max()}); documented RANDOM_POLICY_MEAN_LENGTH = {RANDOM_POLICY_MEAN_LENGTH}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=0.5, help="timing window per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best one counts")
    parser.add_argument("--envs", nargs="*", default=list(POPGYM_TWIN), help="rlmem config names")
    parser.add_argument("--measure-chance", action="store_true", help="re-measure CartPole's chance return")
    parser.add_argument("--chance-episodes", type=int, default=2_000_000)
    args = parser.parse_args()

    print(f"{args.num_envs} envs, uniformly random actions, easy presets, best of {args.rounds} rounds\n")
    print("| env | rlmem vector env (steps/s) | POPGym + SyncVectorEnv (steps/s) | ratio |")
    print("|---|---:|---:|---:|")
    for name in args.envs:
        twin = POPGYM_TWIN[name]
        ours_env = rlmem_vec(name, args.num_envs)
        twin_env = None if twin is None else popgym_vec(twin, args.num_envs)
        ours = theirs = 0.0
        for _ in range(args.rounds):
            ours = max(ours, steps_per_second(ours_env, args.seconds))
            if twin_env is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # POPGym's envs trip Gymnasium's passive checker warnings
                    theirs = max(theirs, steps_per_second(twin_env, args.seconds))
        if twin is None:
            print(f"| {name} | {ours:,.0f} | - | - |", flush=True)
            continue
        print(f"| {name} | {ours:,.0f} | {theirs:,.0f} ({twin}) | {ours / theirs:.1f}x |", flush=True)
    if args.measure_chance:
        print()
        measure_chance(args.chance_episodes)


if __name__ == "__main__":
    main()
