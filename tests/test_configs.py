"""Hydra configs: each env and agent config builds, env configs show every knob, one memory config feeds both
the RL agent and the LM model of a memory system, bad PPO values name the option."""

from __future__ import annotations


import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlmem.envs import ENV_IDS
from rlmem.ppo import PPOConfig
from rlmem.env_factory import make_vector_env
from rlmem.conf import CONF_DIR

CONF = CONF_DIR
AGENTS = sorted(p.stem for p in (CONF / "agent").glob("*.yaml"))
ENVS = sorted(p.stem for p in (CONF / "env").glob("*.yaml"))


def compose_rl(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train_rl", overrides=list(overrides))


def test_every_registered_env_has_a_config():
    assert set(ENV_IDS) <= set(ENVS), f"missing env configs: {set(ENV_IDS) - set(ENVS)}"


def task_cls(env_id):
    import gymnasium as gym
    from gymnasium.envs.registration import load_env_creator

    return load_env_creator(gym.spec(env_id).entry_point).task_cls


@pytest.mark.parametrize("name", sorted(ENV_IDS))
def test_env_config_lists_every_knob_null_with_its_default(name):
    """Knobs are null in the yaml so ``env.difficulty=...`` can take effect; the comment shows the default."""
    text = (CONF / "env" / f"{name}.yaml").read_text()
    conf = OmegaConf.to_container(OmegaConf.create(text))
    assert conf.pop("id") == ENV_IDS[name]
    cls = task_cls(ENV_IDS[name])
    assert set(conf) == {"difficulty", *cls.defaults}
    assert all(v is None for v in conf.values()), conf
    for knob, default in cls.defaults.items():
        line = next(line for line in text.splitlines() if line.startswith(f"{knob}:"))
        shown = line.split("# default", 1)[1].strip()
        assert yaml.safe_load(shown) == default, (knob, shown, default)


@pytest.mark.parametrize("name", sorted(ENV_IDS))
def test_difficulty_override_applies_the_preset(name):
    cls = task_cls(ENV_IDS[name])
    for difficulty, preset in cls.presets.items():
        cfg = OmegaConf.to_container(compose_rl(f"env={name}", f"env.difficulty={difficulty}").env)
        knobs = make_vector_env(cfg, 1).knobs()
        assert set(preset) <= set(knobs) == set(cls.defaults), (difficulty, sorted(knobs))
        for knob, value in preset.items():
            assert knobs[knob] == value, (difficulty, knob)
        for knob, default in cls.defaults.items():  # knobs the preset leaves alone keep their defaults
            if knob not in preset and default is not None:
                assert knobs[knob] == default, (difficulty, knob)


@pytest.mark.parametrize("env", ENVS)
def test_env_configs_build(env):
    cfg = OmegaConf.to_container(compose_rl(f"env={env}").env)
    vec = make_vector_env(cfg, 2)
    vec.reset(seed=0)
    vec.close()


@pytest.mark.parametrize("agent", AGENTS)
def test_agent_configs_build(agent):
    import torch
    from torchrl.data import Categorical

    from rlmem.agents import ActorCritic

    cfg = OmegaConf.to_container(compose_rl(f"agent={agent}").agent)
    agent_module = ActorCritic(5, 4, Categorical(4), cfg)  # a flat Box(5) observation, Discrete(4) actions
    action, _, _ = agent_module.act_greedy(torch.zeros(3, 5), agent_module.memory.initial_state(3),
                                        torch.ones(3, dtype=torch.bool))
    assert action.shape == (3,)


def test_overrides_reach_the_config():
    cfg = compose_rl("env.delay=50", "agent.hidden_size=128", "ppo.num_envs=8", "seed=3")
    assert (cfg.env.delay, cfg.agent.hidden_size, cfg.ppo.num_envs, cfg.seed) == (50, 128, 8, 3)
    lm = compose_lm("model=darmt", "model.d_model=32", "model.segment_len=4")
    assert (lm.model.memory, lm.model.d_model, lm.model.segment_len) == ("darmt", 32, 4)


MEMORIES = sorted(p.stem for p in (CONF / "memory").glob("*.yaml"))


def compose_lm(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train_lm", overrides=list(overrides))


def raw(path: str) -> dict:
    return yaml.safe_load((CONF / path).read_text())


def test_every_agent_and_model_is_a_memory_config_plus_its_width():
    """agent/<name>.yaml = memory/<name>.yaml + encoder_dim (no memory knob of its own); model/<name>.yaml =
    memory/<name>.yaml + d_model + the LM's own defaults, each stating the RL value it differs from."""
    import rlmem

    assert {p.stem for p in (CONF / "model").glob("*.yaml")} <= set(MEMORIES)
    for name in AGENTS:
        agent = raw(f"agent/{name}.yaml")
        memory = agent["defaults"][0].removeprefix("/memory/").removesuffix("@_here_")
        assert agent["defaults"] == [f"/memory/{memory}@_here_", "_self_"] and set(agent) == {"defaults", "encoder_dim"}
        composed = OmegaConf.to_container(compose_rl(f"agent={name}").agent)
        assert composed == {**raw(f"memory/{memory}.yaml"), "encoder_dim": 64}, name
    for name in MEMORIES:
        assert raw(f"memory/{name}.yaml")["memory"] in rlmem.available_memories()
        if not (CONF / "model" / f"{name}.yaml").exists():
            continue
        model = raw(f"model/{name}.yaml")
        assert model.pop("defaults") == [f"/memory/{name}@_here_", "_self_"] and model.pop("d_model") == 64
        lm_only = dict(model)
        composed = OmegaConf.to_container(compose_lm(f"model={name}").model)
        assert composed == {**raw(f"memory/{name}.yaml"), "d_model": 64, **lm_only}, name
        text = (CONF / "model" / f"{name}.yaml").read_text()
        for key, value in lm_only.items():
            assert value != raw(f"memory/{name}.yaml").get(key), (name, key)  # listed only where it differs
            line = next(line for line in text.splitlines() if line.startswith(f"{key}:"))
            assert "RL: " in line, (name, key)


def test_the_lm_and_rl_defaults_of_darmt_differ_where_model_darmt_says():
    """Before the merge agent/darmt.yaml and model/darmt.yaml disagreed silently (segment_len 8 vs 16, gated
    vs plain residuals); the values are unchanged and now stated in model/darmt.yaml."""
    rl = OmegaConf.to_container(compose_rl("agent=darmt").agent)
    lm = OmegaConf.to_container(compose_lm("model=darmt").model)
    assert (rl["segment_len"], rl["residual"], rl["n_layers"]) == (8, "gated", 1)
    assert (lm["segment_len"], lm["residual"], lm["n_layers"]) == (16, "plain", 2)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_envs": 0}, "num_envs"),
        ({"seq_len": 48}, "seq_len"),
        ({"gamma": 1.5}, "gamma"),
        ({"lr": -1.0}, "lr"),
        ({"minibatches": 10_000}, "minibatches"),
        ({"no_such_option": 1}, "valid"),
    ],
)
def test_bad_ppo_values_raise_naming_the_option(bad, match):
    base = OmegaConf.to_container(compose_rl().ppo)
    with pytest.raises(ValueError, match=match):
        PPOConfig.from_mapping({**base, **bad})
