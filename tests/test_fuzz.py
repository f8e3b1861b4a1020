"""Property-based fuzzing (hypothesis) of everything a user configures or sends: env knobs, actions and
memory-system constructor arguments.

The contract under test: a bad value fails fast with a ``ValueError`` (memories: ``ValueError`` or
``TypeError``) whose message names the offending knob / parameter (and, for actions, the valid range);
anything accepted works (finite observations inside the observation space, finite memory outputs of
the declared shape). Nothing else may escape, and an invalid action must leave the env untouched.

Drawn ranges are kept modest (per-knob caps below) so that valid draws stay fast: the point is the
mix of types and boundaries, not huge episodes.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.envs.registration import load_env_creator
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import rlmem
from rlmem.memory import available_memories, build_memory, memory_class, registry

ENV_IDS = sorted(i for i in gym.registry if i.startswith("rlmem/"))
# the invalid-action fuzzing below draws integer actions; continuous envs check theirs in tests/test_envs.py
DISCRETE_IDS = [i for i in ENV_IDS if isinstance(gym.make(i).action_space, gym.spaces.Discrete)]
MODES = ["NextStep", "SameStep", "Disabled"]
STEP_CAP = 150  # steps per drawn env (long episodes simply do not finish)
EPISODES = 2  # stop once this many episodes ended

# derandomize: the same examples on every run, so CI is reproducible (raise max_examples locally to search
# further: a new finding becomes a pinned example below)
FUZZ = settings(max_examples=25, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def task_cls(env_id):
    return load_env_creator(gym.spec(env_id).entry_point).task_cls


def names(message: str, name: str) -> bool:
    """True if ``message`` mentions ``name`` as a whole word (``k`` is not found inside ``deck``)."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


# --- value pools -------------------------------------------------------------------------------------
#: largest int drawn per knob / parameter: big enough to cross every bound, small enough to stay fast
ENV_INT_CAP = {"num_decks": 6, "n_cues": 60, "vocab_size": 120, "num_bits": 40, "n_items": 40, "n_pairs": 40,
               "n_queries": 40, "k": 320}
ENV_INT_CAP_DEFAULT = 1000

NOT_A_NUMBER = st.one_of(
    st.booleans(), st.text(max_size=4), st.just("3"), st.just([1]), st.just({"a": 1}), st.just(b"1"),
    st.just(1 + 2j),
)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def int_values(cap: int, none_ok: bool = True) -> st.SearchStrategy:
    """Valid-looking ints (boundaries and small values weighted up), their float twins, and junk."""
    ints = st.one_of(st.integers(-3, 4), st.integers(-3, cap), st.just(cap), st.integers(-(10**6), -4))
    non_integer = st.floats(-5, cap, allow_nan=False).filter(lambda v: v != int(v))
    floats = st.one_of(st.integers(0, cap).map(float), non_integer)
    pools = [ints, ints, floats, NON_FINITE, NOT_A_NUMBER, st.integers(1, 50).map(np.int64)]
    if none_ok:
        pools.append(st.none())
    return st.one_of(*pools)


def float_values(none_ok: bool = True) -> st.SearchStrategy:
    pools = [
        st.floats(-5, 5, allow_nan=False), st.floats(0, 1),
        st.sampled_from([0.0, -0.0, 1e-300, 1e6, 1e7, 1e300, -1e300]),
        st.integers(-3, 3), st.just(10**400), NON_FINITE, NOT_A_NUMBER, st.floats(0, 2).map(np.float32),
    ]
    if none_ok:
        pools.append(st.none())
    return st.one_of(*pools)


def knob_values(env_id: str, knob: str, default_value) -> st.SearchStrategy:
    if isinstance(default_value, bool) or not isinstance(default_value, (int, float, str)):
        return st.one_of(NOT_A_NUMBER, st.none())
    if isinstance(default_value, str):
        presets = task_cls(env_id).presets.values()
        valid = sorted({p[knob] for p in presets if knob in p} | {default_value})
        return st.one_of(st.sampled_from(valid), st.text(max_size=6), st.integers(-2, 5), NON_FINITE, st.none())
    if isinstance(default_value, int):
        return int_values(ENV_INT_CAP.get(knob, ENV_INT_CAP_DEFAULT))
    return float_values()


def difficulty_values(env_id: str) -> st.SearchStrategy:
    presets = sorted(task_cls(env_id).presets)
    return st.one_of(st.none(), st.sampled_from(presets), st.sampled_from([p.upper() for p in presets]),
                     st.text(max_size=6), st.integers(-2, 3), NON_FINITE, st.just(["easy"]), st.just({}))


def plausible_values(default_value, cap: int) -> st.SearchStrategy:
    """Values of the right type in a plausible range (most combinations of these are valid)."""
    if isinstance(default_value, str):
        return st.just(default_value)
    if isinstance(default_value, int):
        return st.one_of(st.integers(1, 8), st.integers(1, cap))
    return st.floats(-1, 1)


def env_kwargs(env_id: str) -> st.SearchStrategy:
    """Any subset of the task's knobs (plus ``difficulty``), each drawn from a mix of good and bad values,
    or (half the time) plausible values only, so that enough draws build and run."""
    # the effective knob values of a default env tell each knob's type (penalty / n_queries default to None)
    effective = gym.make(env_id).unwrapped.knobs()
    knobs = task_cls(env_id).defaults
    mixed = {k: knob_values(env_id, k, effective[k]) for k in knobs}
    mixed["difficulty"] = difficulty_values(env_id)
    plausible = {k: plausible_values(effective[k], ENV_INT_CAP.get(k, ENV_INT_CAP_DEFAULT)) for k in knobs}
    plausible["difficulty"] = st.one_of(st.none(), st.sampled_from(sorted(task_cls(env_id).presets)))
    return st.one_of(st.fixed_dictionaries({}, optional=mixed), st.fixed_dictionaries({}, optional=plausible))


# --- env construction + rollouts -----------------------------------------------------------------------
def check_construction_error(env_id: str, kwargs: dict, err: ValueError) -> None:
    """The error names a knob that was given (non-None), or the bad difficulty with the valid presets."""
    message = str(err)
    given_knobs = [k for k, v in kwargs.items() if v is not None and k != "difficulty"]
    if any(names(message, k) for k in given_knobs):
        return
    presets = sorted(task_cls(env_id).presets)
    if kwargs.get("difficulty") is not None and names(message, "difficulty"):
        assert all(p in message for p in presets), message
        return
    pytest.fail(f"{env_id}{kwargs}: the error names none of the knobs given: {message!r}")


def check_knobs(env_id: str, kwargs: dict, knobs: dict) -> None:
    """``knobs()``: given values (None = not given) > the difficulty preset > defaults, as plain Python."""
    cls = task_cls(env_id)
    assert set(knobs) == set(cls.defaults)
    preset = cls.presets[kwargs["difficulty"]] if kwargs.get("difficulty") is not None else {}
    for knob, value in knobs.items():
        default = cls.defaults[knob]
        assert type(value) in (int, float, str, bool), (knob, value)
        assert default is None or type(value) is type(default), (knob, value, default)
        want = kwargs.get(knob)
        if want is None:
            want = preset.get(knob, default)
        if want is not None:  # None: a derived default (checked in test_envs)
            assert value == want, (knob, value, want)


def construct(make, env_id: str, kwargs: dict):
    """The env, or None after checking that construction failed with a ValueError naming a knob."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make()
    except ValueError as err:
        event("env rejected")
        check_construction_error(env_id, kwargs, err)
        return None


def assert_obs_ok(space: gym.spaces.Box, obs) -> None:
    assert isinstance(obs, np.ndarray) and np.all(np.isfinite(obs)), obs
    assert space.contains(obs), (obs, space)


def random_actions(space, rng, n):
    """``n`` random actions of ``space``: ``[n]`` ints (Discrete) or ``[n, *shape]`` floats (Box)."""
    if isinstance(space, gym.spaces.Box):
        return rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(space.dtype)
    return rng.integers(space.n, size=n)


@pytest.mark.parametrize("env_id", ENV_IDS)
@FUZZ
@given(data=st.data())
def test_fuzz_env_kwargs_single(env_id, data):
    kwargs = data.draw(env_kwargs(env_id), label="kwargs")
    env = construct(lambda: gym.make(env_id, **kwargs), env_id, kwargs)
    if env is None:
        return
    event("env built")
    check_knobs(env_id, kwargs, env.unwrapped.knobs())
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    assert_obs_ok(env.observation_space, obs)
    finished = 0
    for _ in range(STEP_CAP):
        obs, reward, terminated, truncated, _ = env.step(random_actions(env.action_space, rng, 1)[0])
        assert_obs_ok(env.observation_space, obs)
        assert isinstance(reward, float) and math.isfinite(reward)
        assert isinstance(terminated, bool) and isinstance(truncated, bool)
        if terminated or truncated:
            finished += 1
            if finished == EPISODES:
                break
            obs, _ = env.reset()
            assert_obs_ok(env.observation_space, obs)
    env.unwrapped.get_state()


@pytest.mark.parametrize("env_id", ENV_IDS)
@FUZZ
@given(data=st.data())
def test_fuzz_env_kwargs_vector(env_id, data):
    kwargs = data.draw(env_kwargs(env_id), label="kwargs")
    num_envs = data.draw(st.integers(1, 4), label="num_envs")
    mode = data.draw(st.sampled_from(MODES), label="autoreset_mode")
    vec = construct(lambda: gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                                         autoreset_mode=mode, **kwargs), env_id, kwargs)
    if vec is None:
        return
    event("env built")
    check_knobs(env_id, kwargs, vec.knobs())
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    obs, _ = vec.reset(seed=seed)
    assert_obs_ok(vec.observation_space, obs)
    finished = 0
    for _ in range(STEP_CAP):
        obs, reward, terminated, truncated, info = vec.step(random_actions(vec.single_action_space, rng, num_envs))
        assert_obs_ok(vec.observation_space, obs)
        assert reward.shape == (num_envs,) and np.all(np.isfinite(reward))
        done = terminated | truncated
        if mode == "SameStep":
            for i in np.flatnonzero(done):
                assert_obs_ok(vec.single_observation_space, info["final_obs"][i])
        if mode == "Disabled" and done.any():
            obs, _ = vec.reset(options={"reset_mask": done})
            assert_obs_ok(vec.observation_space, obs)
        finished += int(done.sum())
        if finished >= EPISODES:
            break
    state = vec.get_state()
    assert all(len(v) == num_envs for v in state.values())


# --- actions: invalid ones raise and change nothing ------------------------------------------------------
def make_single(env_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gym.make(env_id, **getattr(task_cls(env_id), "test_kwargs", {}))


def make_vector(env_id, num_envs):
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="vector_entry_point",
                        **getattr(task_cls(env_id), "test_kwargs", {}))


def single_action(n: int) -> st.SearchStrategy:
    """``("valid", action, int)`` in one of the accepted forms, or ``("invalid", action, None)``."""
    a = st.integers(0, n - 1)
    valid = st.one_of(
        a, a.map(np.int64), a.map(np.int32), a.map(np.uint16), a.map(np.array), a.map(lambda v: np.array([v])),
        a.map(float), a.map(np.float32),
    ).map(lambda v: ("valid", v, int(np.asarray(v).reshape(-1)[0])))
    invalid = st.one_of(
        st.integers(n, n + 5), st.integers(-5, -1), st.integers(10**18, 10**30), st.integers(-(10**30), -(10**18)),
        st.just(np.uint64(2**64 - 1)),
        a.map(lambda v: v + 0.5), a.map(lambda v: v - 0.25), NON_FINITE, st.just(1e20),
        st.text(max_size=3), st.just("0"), st.none(), st.just(1 + 0j),
        a.map(lambda v: np.array([v, v])), a.map(lambda v: [[v]]), st.just([]), a.map(lambda v: [v, [v]]),
        st.just(np.array([0.5])), st.just(np.array([math.nan])), st.just(object()),
    ).map(lambda v: ("invalid", v, None))
    return st.one_of(valid, valid, invalid)


def vector_action(n: int, num_envs: int) -> st.SearchStrategy:
    ints = st.lists(st.integers(0, n - 1), min_size=num_envs, max_size=num_envs)
    valid = st.one_of(
        ints.map(np.array), ints, ints.map(tuple), ints.map(lambda v: np.array(v, dtype=np.float64)),
        ints.map(lambda v: np.array(v, dtype=np.int32)),
    ).map(lambda v: ("valid", v, np.asarray(v).astype(np.int64)))

    def poke(value):  # one row's action replaced by ``value``
        return st.tuples(ints, st.integers(0, num_envs - 1)).map(lambda t: t[0][: t[1]] + [value] + t[0][t[1] + 1 :])

    invalid = st.one_of(
        poke(n), poke(-1), poke(n + 7), poke(10**30), poke(0.5), poke(math.nan), poke(math.inf), poke("1"),
        poke(None), poke([0]),
        ints.map(lambda v: np.array(v + [0])), ints.map(lambda v: np.array(v[:-1])), ints.map(lambda v: np.array([v])),
        ints.map(lambda v: np.array(v)[:, None]), st.integers(0, n - 1), st.none(), st.text(max_size=3),
        ints.map(lambda v: np.array(v) + 0.5), ints.map(lambda v: [str(x) for x in v]),
    ).map(lambda v: ("invalid", v, None))
    return st.one_of(valid, valid, invalid)


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("env_id", DISCRETE_IDS)
@FUZZ
@given(data=st.data())
def test_fuzz_invalid_actions_single(env_id, data):
    env, twin = make_single(env_id), make_single(env_id)
    n = env.action_space.n
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    obs, _ = env.reset(seed=seed)
    obs_twin, _ = twin.reset(seed=seed)
    np.testing.assert_array_equal(obs, obs_twin)
    for kind, action, as_int in data.draw(st.lists(single_action(n), min_size=1, max_size=60), label="actions"):
        if kind == "invalid":
            with pytest.raises(ValueError, match=re.escape(f"[0, {n - 1}]")):
                env.step(action)
            continue
        out, out_twin = env.step(action), twin.step(as_int)
        np.testing.assert_array_equal(out[0], out_twin[0])
        assert out[1:4] == out_twin[1:4]
        assert_states_equal(env.unwrapped.get_state(), twin.unwrapped.get_state())
        if out[2] or out[3]:
            np.testing.assert_array_equal(env.reset()[0], twin.reset()[0])


@pytest.mark.parametrize("env_id", DISCRETE_IDS)
@FUZZ
@given(data=st.data())
def test_fuzz_invalid_actions_vector(env_id, data):
    num_envs = data.draw(st.integers(1, 3), label="num_envs")
    vec, twin = make_vector(env_id, num_envs), make_vector(env_id, num_envs)
    n = vec.single_action_space.n
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    np.testing.assert_array_equal(vec.reset(seed=seed)[0], twin.reset(seed=seed)[0])
    for kind, action, as_ints in data.draw(st.lists(vector_action(n, num_envs), min_size=1, max_size=60),
                                           label="actions"):
        if kind == "invalid":
            with pytest.raises(ValueError, match=re.escape(f"[0, {n - 1}]")):
                vec.step(action)
            continue
        out, out_twin = vec.step(action), twin.step(as_ints)
        for got, want in zip(out[:4], out_twin[:4]):
            np.testing.assert_array_equal(got, want)
        assert_states_equal(vec.get_state(), twin.get_state())


# --- memory constructors -------------------------------------------------------------------------------
#: largest int drawn per constructor parameter (models stay tiny; window / d_conv / dt_rank may go larger)
MEMORY_INT_CAP = {"d_model": 16, "hidden_size": 16, "n_layers": 2, "d_state": 6, "expand": 3, "mem_slots": 8,
                  "n_heads": 4, "d_conv": 24, "dt_rank": 32, "window": 128, "d_ff": 32}
MEMORY_INT_CAP_DEFAULT = 8


def memory_params(name: str) -> dict[str, inspect.Parameter]:
    params = inspect.signature(memory_class(name).__init__).parameters
    return {k: p for k, p in params.items() if k not in ("self", "d_in") and p.kind is p.POSITIONAL_OR_KEYWORD}


def param_values(param: inspect.Parameter) -> st.SearchStrategy:
    optional = param.default is None
    if isinstance(param.default, float):
        return float_values(none_ok=False)
    cap = MEMORY_INT_CAP.get(param.name, MEMORY_INT_CAP_DEFAULT)
    divisible = st.sampled_from([1, 2, 4, 8, 16]) if param.name in ("d_model", "n_heads") else st.nothing()
    return st.one_of(int_values(cap, none_ok=False), divisible, divisible, st.none() if optional else st.nothing(),
                     st.none())  # None where it is not optional must fail cleanly too


def plausible_param_values(param: inspect.Parameter) -> st.SearchStrategy:
    """Values of the right type in a plausible range (most combinations of these are valid)."""
    if isinstance(param.default, float):
        return st.floats(0, 1)
    if param.name in ("d_model", "n_heads"):
        return st.sampled_from([1, 2, 4, 8, 16][: 3 if param.name == "n_heads" else 5])
    values = st.integers(2, MEMORY_INT_CAP.get(param.name, MEMORY_INT_CAP_DEFAULT))
    return st.one_of(values, st.none()) if param.default is None else values


@pytest.mark.parametrize("name", available_memories())
@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_memory_constructor_args(name, data):
    params = memory_params(name)
    mixed = {k: param_values(p) for k, p in params.items()}
    plausible = {k: plausible_param_values(p) for k, p in params.items()}
    kwargs = data.draw(st.one_of(st.fixed_dictionaries({}, optional=mixed),
                                 st.fixed_dictionaries({}, optional=plausible)), label="kwargs")
    d_in = data.draw(st.integers(1, 5), label="d_in")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            memory = build_memory(name, d_in=d_in, **kwargs)
    except (ValueError, TypeError, FileNotFoundError) as err:  # FileNotFoundError: a model dir that is not there
        event("memory rejected")
        message = str(err)
        assert any(names(message, k) for k in kwargs), \
            f"{name}{kwargs}: the error names no parameter given: {message!r}"
        return
    event("memory built")
    B, T = 2, 3
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    x = torch.randn(B, T, d_in, generator=gen)
    is_init = torch.rand(B, T, generator=gen) < 0.3
    with torch.no_grad():
        y, state = memory(x, memory.initial_state(B), is_init)
    assert isinstance(memory.d_out, int) and y.shape == (B, T, memory.d_out)
    assert torch.isfinite(y).all(), kwargs
    assert all(torch.isfinite(v).all() for v in state.values(include_nested=True, leaves_only=True))


class _Recorder(rlmem.MemorySystem):
    """Counts its constructions: the builder must refuse a bad ``d_in`` before building anything."""

    built = 0

    def __init__(self, d_in: int):
        super().__init__()
        type(self).built += 1


@pytest.mark.parametrize("d_in", [0, -1, 2.0, 2.5, True, None, "4", math.nan])
def test_the_builder_rejects_a_bad_d_in_before_building(monkeypatch, d_in):
    monkeypatch.setitem(registry._REGISTRY, "_recorder", _Recorder)  # this test only
    with pytest.raises(ValueError, match=r"^d_in must be (an integer )?in \[1, inf\]"):
        build_memory("_recorder", d_in=d_in)
    assert _Recorder.built == 0


# --- the defects the fuzzer found, pinned -----------------------------------------------------------------
@pytest.mark.parametrize(
    "env_id, kwargs, match",
    [
        ("rlmem/DelayedCue-v0", {"difficulty": ["easy"]}, r"valid: \['easy', 'hard', 'medium'\]"),  # was TypeError
        ("rlmem/DelayedCue-v0", {"noise": 1e300}, "noise"),  # was inf observations
        ("rlmem/TMazePassive-v0", {"goal_reward": 10**400}, "goal_reward"),  # was TypeError from np.isfinite
        # a drawn knob that conflicts with a preset's: the message names the knob that was given
        ("rlmem/AssocRecall-v0", {"difficulty": "easy", "vocab_size": 4}, "vocab_size"),
        ("rlmem/SelectiveCopy-v0", {"difficulty": "easy", "n_items": 5}, "n_items"),
        ("rlmem/RepeatPrevious-v0", {"difficulty": "hard", "num_decks": 1}, "num_decks"),
    ],
)
def test_fuzz_findings_env_kwargs(env_id, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gym.make(env_id, **kwargs)


@pytest.mark.parametrize("action", ["1", None, 10**30, 1 + 0j, [0, [1]], [[0]], np.array([0, 1])])
def test_fuzz_findings_single_env_actions(action):
    """Each of these escaped as TypeError / OverflowError / a numpy reshape error, or was accepted."""
    env = gym.make("rlmem/DelayedCue-v0")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        env.step(action)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("gru", {"hidden_size": "3"}),  # TypeError from '<' naming nothing
        ("gru", {"hidden_size": True}),  # built a GRU of width 1 (d_out=True)
        ("mamba", {"d_model": 8, "dt_rank": True}),  # failed in forward
        ("ssm", {"max_timescale": math.inf}),  # NaN outputs
        ("transformer", {"d_ff": 0}),  # built an empty feed-forward
        ("transformer", {"gate_bias": math.nan}),  # NaN outputs
        ("transformer", {"gate_bias": None}),  # failed in forward
        ("miras", {"temperature": math.nan}),  # NaN outputs
        ("miras", {"surprise_threshold": math.nan}),  # NaN outputs
        ("infinity", {"d_model": 8, "n_heads": 2, "dt_rank": 2.5}),  # torch TypeError
    ],
)
def test_fuzz_findings_memory_args(name, kwargs):
    bad = next(k for k in kwargs if k not in ("d_model", "n_heads") or len(kwargs) == 1)
    with pytest.raises(ValueError, match=bad):
        build_memory(name, d_in=3, **kwargs)
