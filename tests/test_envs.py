"""Tests every registered ``rlmem/`` env passes (registering an env adds it here).

Per task class, ``test_kwargs`` (small sizes) and ``invalid_kwargs`` (a list of bad kwarg dicts) are read
from the :class:`rlmem.envs.core.MemoryTask` subclass.
"""

from __future__ import annotations

import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import load_env_creator
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torchrl.envs import Compose, InitTracker, TransformedEnv
from torchrl.envs.libs.gym import GymWrapper
from torchrl.envs.utils import check_env_specs

import rlmem  # noqa: F401  (registers the envs)
from rlmem.envs import ENV_IDS

IDS = sorted(i for i in gym.registry if i.startswith("rlmem/"))


def task_cls(env_id):
    return load_env_creator(gym.spec(env_id).entry_point).task_cls


def kwargs_for(env_id):
    return dict(getattr(task_cls(env_id), "test_kwargs", {}))


def make(env_id, **extra):
    return gym.make(env_id, **kwargs_for(env_id), **extra)


def make_vec(env_id, num_envs, autoreset_mode="NextStep"):
    return gym.make_vec(
        env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
        autoreset_mode=autoreset_mode, **kwargs_for(env_id),
    )


def random_actions(space, rng, n):
    """``n`` uniformly random actions of ``space`` (Discrete: ``[n]`` ints; Box: ``[n, *shape]`` floats)."""
    if isinstance(space, gym.spaces.Box):
        return rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(space.dtype)
    return rng.integers(space.n, size=n)


def one_action(action):
    """Row ``i`` of :func:`random_actions` as a single env's action (an int for Discrete)."""
    return action if np.ndim(action) else int(action)


def rollout_single(env, seed, actions_rng, n_steps):
    """Observations, rewards and dones of ``n_steps`` steps, resetting (unseeded) after each episode."""
    obs, _ = env.reset(seed=seed)
    out = [obs]
    rewards, dones = [], []
    for _ in range(n_steps):
        obs, r, term, trunc, _ = env.step(env.action_space.sample() if actions_rng is None else int(actions_rng()))
        rewards.append(r)
        dones.append(term or trunc)
        if term or trunc:
            out.append(obs)  # final obs of the episode
            obs, _ = env.reset()
        out.append(obs)
    return out, rewards, dones


def test_every_config_name_is_registered():
    assert IDS, "no rlmem/ envs registered"
    assert set(ENV_IDS.values()) == set(IDS)


def test_delayed_cue_make_with_kwargs():
    env = gym.make("rlmem/DelayedCue-v0", delay=50, n_cues=4)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (5,)
    n = 0
    done = False
    while not done:
        _, r, term, trunc, _ = env.step(0)
        done, n = term or trunc, n + 1
    assert n == 52


@pytest.mark.parametrize("env_id", IDS)
def test_gymnasium_check_env(env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gym_check_env(make(env_id).unwrapped, skip_render_check=True)


@pytest.mark.parametrize("env_id", IDS)
def test_sb3_check_env(env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sb3_check_env(make(env_id).unwrapped, warn=False)


@pytest.mark.parametrize("env_id", IDS)
def test_torchrl_check_env_specs(env_id):
    env = TransformedEnv(
        GymWrapper(make_vec(env_id, 4, "Disabled"), categorical_action_encoding=True), Compose(InitTracker())
    )
    check_env_specs(env, seed=0)


@pytest.mark.parametrize("env_id", IDS)
def test_seeded_determinism(env_id):
    runs = []
    for _ in range(2):
        env = make(env_id)
        env.action_space.seed(3)
        runs.append(rollout_single(env, seed=11, actions_rng=None, n_steps=200))
    (o1, r1, d1), (o2, r2, d2) = runs
    assert r1 == r2 and d1 == d2
    np.testing.assert_array_equal(np.stack(o1), np.stack(o2))
    # a different seed gives a different run
    env = make(env_id)
    env.action_space.seed(3)
    o3, _, _ = rollout_single(env, seed=12, actions_rng=None, n_steps=200)
    assert len(o3) != len(o1) or not np.array_equal(np.stack(o3), np.stack(o1))


@pytest.mark.parametrize("env_id", IDS)
@pytest.mark.parametrize("mode", ["NextStep", "SameStep", "Disabled"])
def test_vector_env_equals_single_envs(env_id, mode):
    """Vector env seeded s == single envs seeded s, s+1, ... (same actions), in every autoreset mode."""
    n, steps, seed = 3, 150, 5
    vec = make_vec(env_id, n, mode)
    singles = [make(env_id) for _ in range(n)]
    rng = np.random.default_rng(0)
    obs_v, _ = vec.reset(seed=seed)
    obs_s = [env.reset(seed=seed + i)[0] for i, env in enumerate(singles)]
    np.testing.assert_array_equal(obs_v, np.stack(obs_s))
    single_done = np.zeros(n, dtype=bool)
    for _ in range(steps):
        actions = random_actions(vec.single_action_space, rng, n)
        obs_v, r_v, term_v, trunc_v, info = vec.step(actions)
        for i, env in enumerate(singles):
            if mode == "NextStep" and single_done[i]:
                o, _ = env.reset()
                r, term, trunc = 0.0, False, False
            else:
                o, r, term, trunc, _ = env.step(one_action(actions[i]))
            single_done[i] = term or trunc
            assert r_v[i] == r and term_v[i] == term and trunc_v[i] == trunc
            if single_done[i] and mode == "SameStep":
                np.testing.assert_array_equal(info["final_obs"][i], o)
                o, _ = env.reset()
            np.testing.assert_array_equal(obs_v[i], o)
        if mode == "Disabled" and single_done.any():
            obs_v, _ = vec.reset(options={"reset_mask": single_done.copy()})
            for i in np.flatnonzero(single_done):
                np.testing.assert_array_equal(obs_v[i], singles[i].reset()[0])
            single_done[:] = False


def episode_returns(env_id, policy, n_episodes, seed=0):
    vec = make_vec(env_id, 16, "NextStep")
    rng = np.random.default_rng(seed)
    vec.reset(seed=seed)
    returns, current = [], np.zeros(16)
    done_prev = np.zeros(16, dtype=bool)
    while len(returns) < n_episodes:
        actions = policy(vec, rng)
        _, r, term, trunc, _ = vec.step(actions)
        current[~done_prev] += r[~done_prev]
        done = (term | trunc) & ~done_prev
        returns.extend(current[done].tolist())
        current[done] = 0.0
        done_prev = done
    return np.array(returns)


@pytest.mark.parametrize("env_id", IDS)
def test_oracle_reaches_documented_optimal_return(env_id):
    task = make_vec(env_id, 1).task
    returns = episode_returns(env_id, lambda vec, rng: vec.task.oracle_action(), 200)
    assert returns.mean() == pytest.approx(task.optimal_return(), abs=0.05 * max(1.0, abs(task.optimal_return())))


@pytest.mark.parametrize("env_id", IDS)
def test_random_policy_lands_near_documented_chance_return(env_id):
    task = make_vec(env_id, 1).task
    returns = episode_returns(env_id, lambda vec, rng: random_actions(vec.single_action_space, rng, 16), 2000)
    tol = 4 * returns.std() / np.sqrt(len(returns)) + 1e-6
    assert returns.mean() == pytest.approx(task.chance_return(), abs=tol)


@pytest.mark.parametrize("env_id", IDS)
def test_invalid_actions_raise_clear_errors(env_id):
    env = make(env_id)
    env.reset(seed=0)
    space = env.action_space
    if isinstance(space, gym.spaces.Box):  # continuous: finite values are clipped (as Gymnasium's envs do)
        valid = re.escape(f"[{space.low.min()}, {space.high.max()}]")
        for bad in (np.full(space.shape, np.nan), np.zeros((space.shape[0] + 1,)), "left"):
            with pytest.raises(ValueError, match=valid):
                env.step(bad)
        vec = make_vec(env_id, 2)
        vec.reset(seed=0)
        with pytest.raises(ValueError, match=valid):
            vec.step(np.zeros((2, space.shape[0] + 1)))
        return
    n = space.n
    for bad in (n, -1, 0.5):
        with pytest.raises(ValueError, match=r"\[0, "):
            env.step(bad)
    vec = make_vec(env_id, 2)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"\[0, "):
        vec.step(np.array([0, n]))


@pytest.mark.parametrize("env_id", IDS)
def test_invalid_kwargs_raise_clear_errors(env_id):
    cls = task_cls(env_id)
    bad_kwargs = getattr(cls, "invalid_kwargs", [])
    assert bad_kwargs, f"{cls.__name__} declares no invalid_kwargs to test"
    for bad in bad_kwargs:
        with pytest.raises(ValueError, match=next(iter(bad))):
            gym.make(env_id, **bad)
    with pytest.raises(ValueError, match="valid"):
        gym.make(env_id, difficulty="impossible")


@pytest.mark.parametrize("env_id", IDS)
def test_presets_build(env_id):
    for name in task_cls(env_id).presets:
        env = gym.make(env_id, difficulty=name)
        obs, _ = env.reset(seed=0)
        assert env.observation_space.contains(obs)
        obs, reward, term, trunc, _ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and np.isfinite(reward)
        assert isinstance(term, bool) and isinstance(trunc, bool)


def test_get_state_exposes_the_cue():
    """``get_state()`` shows the hidden cue and step index: the cue is the one-hot channel at t = 0, t counts
    the steps, and naming the cue at the query step is exactly what pays."""
    cues = set()
    for seed in range(12):
        env = gym.make("rlmem/DelayedCue-v0", delay=3, n_cues=4)
        obs, _ = env.reset(seed=seed)
        state = env.unwrapped.get_state()
        cue = int(state["cue"])
        cues.add(cue)
        np.testing.assert_array_equal(obs, np.eye(5)[cue])  # the cue channel only, no query flag yet
        assert state["t"] == 0
        for t in range(1, 5):  # 3 blank steps (the action is ignored), then the query step
            obs, r, term, _, _ = env.step((cue + 1) % 4)
            assert env.unwrapped.get_state()["t"] == t and env.unwrapped.get_state()["cue"] == cue
            assert r == 0.0 and not term
            np.testing.assert_array_equal(obs, np.eye(5)[4] if t == 4 else np.zeros(5))
        wrong = gym.make("rlmem/DelayedCue-v0", delay=3, n_cues=4)
        wrong.reset(seed=seed)
        for _ in range(4):
            wrong.step(cue)
        assert wrong.step((cue + 1) % 4)[1:3] == (0.0, True)  # any other action at the query earns nothing
        assert env.step(cue)[1:3] == (1.0, True)
    assert len(cues) > 1  # the cue is drawn, not fixed


@pytest.mark.parametrize("env_id", IDS)
def test_knobs_report_presets_and_defaults(env_id):
    """``knobs()`` (task, single env and vector env): the preset's value for every knob it sets, the default
    for every other knob (derived defaults resolved), explicit kwargs over both, plain Python values."""
    cls = task_cls(env_id)
    for difficulty in [None, *cls.presets]:
        preset = cls.presets.get(difficulty, {})
        knobs = gym.make(env_id, difficulty=difficulty).unwrapped.knobs()
        vec = gym.make_vec(env_id, num_envs=2, vectorization_mode="vector_entry_point", difficulty=difficulty)
        assert vec.knobs() == knobs == vec.task.knobs()
        assert list(knobs) == list(cls.defaults)
        for knob, default in cls.defaults.items():
            value = knobs[knob]
            assert type(value) in (int, float, str, bool), (knob, value)
            if knob in preset:
                assert value == preset[knob], (difficulty, knob)
            elif default is not None:
                assert value == default and type(value) is type(default), (difficulty, knob)
        # rebuilding from knobs() gives the same task; explicit kwargs beat the preset
        assert gym.make(env_id, **knobs).unwrapped.knobs() == knobs
        explicit = {k: v for k, v in cls.defaults.items() if v is not None}
        overridden = gym.make(env_id, difficulty=difficulty, **explicit).unwrapped.knobs()
        assert overridden == gym.make(env_id).unwrapped.knobs()


def test_knobs_derived_defaults_and_examples():
    assert gym.make("rlmem/DelayedCue-v0", difficulty="hard").unwrapped.knobs()["delay"] == 200
    assert gym.make("rlmem/DelayedCue-v0", difficulty="hard").unwrapped.knobs() == {
        "delay": 200, "n_cues": 8, "noise": 0.1}
    assert gym.make("rlmem/TMazePassive-v0", difficulty="medium").unwrapped.knobs() == {
        "corridor_length": 100, "goal_reward": 1.0, "penalty": -0.01}
    assert gym.make("rlmem/AssocRecall-v0", n_pairs=3).unwrapped.knobs()["n_queries"] == 3
    assert gym.make("rlmem/AssocRecall-v0", n_pairs=3, n_queries=2).unwrapped.knobs()["n_queries"] == 2
    assert gym.make("rlmem/CountRecall-v0", difficulty="hard").unwrapped.knobs() == {
        "num_decks": 4, "deck_type": "ranks"}
    knobs = gym.make("rlmem/MemoryLength-v0", memory_length=np.int64(7)).unwrapped.knobs()
    assert knobs == {"memory_length": 7, "num_bits": 1} and type(knobs["memory_length"]) is int


@pytest.mark.parametrize("env_id", IDS)
def test_sb3_contrib_recurrent_ppo_trains_unchanged(env_id):
    """The reference users compare against runs on every env as it is (no wrappers of ours)."""
    from sb3_contrib import RecurrentPPO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = RecurrentPPO("MlpLstmPolicy", make(env_id), n_steps=16, batch_size=16, n_epochs=1,
                             policy_kwargs={"lstm_hidden_size": 8, "net_arch": [8]}, seed=0, device="cpu")
        model.learn(32)
    assert model.num_timesteps == 32  # two rollouts of n_steps=16 on one env
    # the trained recurrent policy acts on the env directly: its actions are valid and the env accepts them
    env = make(env_id)
    obs, _ = env.reset(seed=0)
    lstm_state, episode_start = None, np.ones(1, dtype=bool)
    for _ in range(10):
        action, lstm_state = model.predict(obs, state=lstm_state, episode_start=episode_start, deterministic=True)
        assert env.action_space.contains(one_action(action))
        obs, _, term, trunc, _ = env.step(action)
        assert env.observation_space.contains(obs)
        episode_start = np.array([term or trunc])
        if term or trunc:
            obs, _ = env.reset()
