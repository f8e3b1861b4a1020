"""Any Gymnasium env: Box / MultiDiscrete actions, image and Dict observations, clear errors otherwise.

For every space kind: the agent builds, acts, PPO replays a few iterations, the log-probs PPO stores while
acting are those of the stored actions under the replayed policy (computed here by hand from the head's
outputs), and greedy evaluation takes the distribution's deterministic action.
"""

from __future__ import annotations

import math

import any_envs  # noqa: F401  (registers AnyEnvTest/ ids)
import gymnasium as gym
import numpy as np
import pytest
import torch
from torchrl.collectors import Collector
from torchrl.envs.utils import check_env_specs
from torchrl.modules import set_recurrent_mode

from rlmem.agents import ActorCritic, build_agent, check_agent_spaces
from rlmem.agents.encoders import DictEncoder, ImageEncoder, build_encoder
from rlmem.env_factory import env_spaces, make_torchrl_env, make_vector_env
from rlmem.evaluate import evaluate_greedy
from rlmem.ppo import PPOConfig, RecurrentPPO

AGENT = {"memory": "gru", "encoder_dim": 8, "hidden_size": 8}
SMALL = dict(num_envs=4, rollout_len=16, seq_len=8, minibatches=2, epochs=2, eval_episodes=4)
#: one env per space kind (the kind is in the test id)
KINDS = {
    "box_action": {"id": "Pendulum-v1"},
    "box_action_rlmem": {"id": "rlmem/PositionOnlyPendulum-v0"},
    "multidiscrete": {"id": "AnyEnvTest/MultiCue-v0"},
    "multidiscrete_same_n": {"id": "AnyEnvTest/MultiCue-v0", "nvec": [3, 3]},  # TorchRL stacks the specs
    "image_hwc": {"id": "AnyEnvTest/ImageCue-v0"},
    "image_chw": {"id": "AnyEnvTest/ImageCue-v0", "channels_first": True},
    "dict": {"id": "AnyEnvTest/DictCue-v0"},
}


def trainer_for(env_cfg, tmp_path, **ppo):
    return RecurrentPPO(build_agent(AGENT, env_cfg), env_cfg, PPOConfig(**{**SMALL, **ppo}), tmp_path, total_frames=128,
                        progress_bar=False)


def collect(trainer, seed=0):
    ppo = trainer.ppo
    env = make_torchrl_env(trainer.env_cfg, ppo.num_envs, trainer.agent.memory_module.make_tensordict_primer())
    env.set_seed(seed)
    collector = Collector(env, trainer.agent.policy, frames_per_batch=ppo.frames_per_batch, total_frames=-1)
    data = next(iter(collector)).reshape(ppo.num_envs, ppo.rollout_len)
    collector.shutdown()
    return data


def expected_log_prob(space: gym.Space, params, action: torch.Tensor) -> torch.Tensor:
    """log pi(action) from the head's outputs, written out by hand (no TorchRL distribution)."""
    if isinstance(space, gym.spaces.Discrete):
        return torch.log_softmax(params, -1).gather(-1, action.long().unsqueeze(-1)).squeeze(-1)
    if isinstance(space, gym.spaces.MultiDiscrete):
        parts = params.split([int(n) for n in space.nvec], -1)
        return sum(torch.log_softmax(p, -1).gather(-1, action[..., i:i + 1].long()).squeeze(-1)
                   for i, p in enumerate(parts))
    loc, scale = params  # action = mid + half * tanh(u), u ~ Normal(loc, scale)
    low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
    mid, half = (high + low) / 2, (high - low) / 2
    y = ((action - mid) / half).double()
    u = torch.atanh(y)
    normal = -((u - loc.double()) ** 2) / (2 * scale.double() ** 2) - scale.double().log() - 0.5 * math.log(2 * math.pi)
    return (normal - torch.log1p(-y**2) - half.double().log()).sum(-1).float()


@pytest.mark.parametrize("kind", KINDS)
def test_each_space_kind_trains_a_few_iterations_and_evaluates(kind, tmp_path):
    trainer = trainer_for(KINDS[kind], tmp_path)
    before = {k: v.clone() for k, v in trainer.agent.state_dict().items()}
    metrics = trainer.train()
    assert metrics["frames"] == 128 and math.isfinite(metrics["eval_return"])
    after = trainer.agent.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"encoder", "policy_head", "value_head"} <= changed  # PPO's gradients reach every part


@pytest.mark.parametrize("kind", KINDS)
def test_stored_log_probs_are_what_ppo_replays(kind, tmp_path):
    """While acting, PPO stores log pi(a) of each sampled action; replaying the rollout from the stored start
    states (sequence mode, as the loss does) must give the same log-probs, computed here by hand from the
    replayed head outputs, and the loss's own recomputation must agree (ratio 1: nothing clipped)."""
    trainer = trainer_for(KINDS[kind], tmp_path)
    data = collect(trainer)
    space = env_spaces(trainer.env_cfg)[1]
    agent = trainer.agent
    replay = data.exclude("features", "embed", "logits", "loc", "scale")
    with torch.no_grad():
        trainer._add_bootstrap_values(replay)  # advantages, as in an update (step mode)
        trainer.gae(replay)
        with set_recurrent_mode(True):
            agent.backbone(replay)
            params = agent.policy_params(replay["features"])
            expected = expected_log_prob(space, params, data["action"])
            out = trainer.loss_module(replay)
    assert data["action_log_prob"].shape == expected.shape == data.shape
    torch.testing.assert_close(data["action_log_prob"], expected, rtol=1e-4, atol=1e-4)
    assert float(out["clip_fraction"]) == 0.0 and abs(float(out["kl_approx"])) < 1e-5
    # the stored actions are valid actions of the env
    actions = data["action"].reshape(-1, *data["action"].shape[2:]).numpy()
    assert all(space.contains(a.astype(space.dtype)) for a in actions)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_actions_are_the_deterministic_mode(kind):
    env_cfg = KINDS[kind]
    obs_space, space, spec = env_spaces(env_cfg)
    agent = ActorCritic(obs_space, space, spec, AGENT).eval()
    if isinstance(space, gym.spaces.Box):  # a non-zero loc, so the squashing is exercised
        torch.nn.init.normal_(agent.policy_head.bias, 0.0, 2.0)
    vec = make_vector_env(env_cfg, 6, for_torchrl=False)
    obs, _ = vec.reset(seed=0)
    state = agent.memory.initial_state(6)
    is_init = torch.ones(6, dtype=torch.bool)
    action, _, _ = agent.act_greedy(obs, state, is_init)
    with torch.no_grad():  # by hand: the same step, then argmax / squashed loc
        from rlmem.agents.encoders import as_observation

        y, _ = agent.memory(agent.encoder(as_observation(obs)).unsqueeze(1), state, is_init.unsqueeze(1))
        head = agent.policy_head(y[:, 0])
        if isinstance(space, gym.spaces.Discrete):
            expected = head.argmax(-1)
        elif isinstance(space, gym.spaces.MultiDiscrete):
            expected = torch.stack([p.argmax(-1) for p in head.split([int(n) for n in space.nvec], -1)], -1)
        else:
            low, high = torch.as_tensor(space.low), torch.as_tensor(space.high)
            expected = (high + low) / 2 + (high - low) / 2 * torch.tanh(head)
    torch.testing.assert_close(action.to(expected.dtype), expected)
    vec.step(action.numpy())  # the env accepts them
    vec.close()
    result = evaluate_greedy(agent, env_cfg, 3, seed=0, success_threshold=None)
    assert math.isfinite(result["eval_return"]) and result["eval_length"] >= 1


def test_encoders_are_picked_from_the_observation_space():
    image_hwc = gym.spaces.Box(0, 255, (8, 8, 1), dtype=np.uint8)
    image_chw = gym.spaces.Box(0, 255, (3, 16, 16), dtype=np.uint8)
    encoder, dim = build_encoder(image_hwc, 8)
    assert isinstance(encoder, ImageEncoder) and encoder.channels_last and dim == 8
    assert encoder.to_float.scale == pytest.approx(1 / 255)
    encoder, _ = build_encoder(image_chw, 8)
    assert isinstance(encoder, ImageEncoder) and not encoder.channels_last
    float_image, _ = build_encoder(gym.spaces.Box(0.0, 1.0, (8, 8, 3), dtype=np.float32), 8)
    assert float_image.to_float.scale == 1.0  # only integer images are rescaled
    flat, _ = build_encoder(gym.spaces.Box(-1.0, 1.0, (5,), dtype=np.float32), 8)
    assert isinstance(flat[0], torch.nn.Linear) and flat[0].in_features == 5  # rlmem's original encoder
    dict_space = gym.spaces.Dict({"image": image_hwc, "vec": gym.spaces.Box(-1.0, 1.0, (3,)),
                                  "phase": gym.spaces.Discrete(3)})
    encoder, dim = build_encoder(dict_space, 8)
    assert isinstance(encoder, DictEncoder) and dim == 24 and isinstance(encoder.encoders[0], ImageEncoder)


def test_image_encoder_layouts_agree_and_bytes_are_scaled():
    """The same image as [H, W, C] and as [C, H, W] gives the same features with the same weights; uint8
    pixels are divided by 255 (a uint8 image equals its float copy under a float space)."""
    hwc, _ = build_encoder(gym.spaces.Box(0, 255, (8, 6, 3), dtype=np.uint8), 8)
    chw, _ = build_encoder(gym.spaces.Box(0, 255, (3, 8, 6), dtype=np.uint8), 8)
    chw.load_state_dict(hwc.state_dict())
    image = torch.randint(0, 256, (2, 5, 8, 6, 3), dtype=torch.uint8)  # [B, T, H, W, C]
    torch.testing.assert_close(hwc(image), chw(image.permute(0, 1, 4, 2, 3)))
    as_float, _ = build_encoder(gym.spaces.Box(0.0, 1.0, (8, 6, 3), dtype=np.float32), 8)
    as_float.load_state_dict(hwc.state_dict())
    torch.testing.assert_close(hwc(image), as_float(image.float() / 255))
    torch.testing.assert_close(hwc(image.float()), hwc(image))  # evaluation passes float copies of the bytes


def test_dict_observations_are_nested_under_observation():
    env = make_torchrl_env(KINDS["dict"], 3)
    td = env.reset()
    assert set(td["observation"].keys()) == {"image", "query", "phase"}
    assert td["observation", "image"].dtype == torch.uint8 and td["observation", "query"].dtype == torch.float32
    assert not {"image", "query", "phase"} & set(td.keys())
    check_env_specs(env, seed=0)
    env.close()


def test_position_only_pendulum_is_pendulum_v1_step_for_step():
    """Same seed, same torques (in range, out of range, float32 and float64) -> same angles, rewards and
    truncation as Gymnasium's Pendulum-v1, whose observation's first two entries are ours."""
    rng = np.random.default_rng(0)
    for seed in range(3):
        ours, ref = gym.make("rlmem/PositionOnlyPendulum-v0"), gym.make("Pendulum-v1")
        obs, _ = ours.reset(seed=seed)
        ref_obs, _ = ref.reset(seed=seed)
        np.testing.assert_array_equal(obs, ref_obs[:2])
        for t in range(200):
            action = rng.uniform(-3, 3, size=(1,)).astype(np.float32 if t % 2 else np.float64)
            obs, r, term, trunc, _ = ours.step(action)
            ref_obs, ref_r, ref_term, ref_trunc, _ = ref.step(action)
            np.testing.assert_array_equal(obs, ref_obs[:2])
            assert (r, term, trunc) == (ref_r, ref_term, ref_trunc)
        assert trunc  # both stop after 200 steps
        theta = ours.unwrapped.get_state()["state"][0]
        np.testing.assert_allclose(ref.unwrapped.state[0], theta, rtol=0, atol=0)


def test_pendulum_documented_returns_are_the_monte_carlo_means():
    from rlmem.envs.pendulum import MEASURED, policy_returns

    for policy in ("random", "oracle"):
        returns = policy_returns(policy, 200, n_episodes=4000, seed=1)
        assert MEASURED[policy, 200] == pytest.approx(returns.mean(), abs=4 * returns.std() / np.sqrt(4000))


@pytest.mark.parametrize("observation, action, match", [
    (gym.spaces.Tuple([gym.spaces.Discrete(2), gym.spaces.Text(3)]), None, r"observation\['1'\]"),
    (gym.spaces.MultiDiscrete([[2, 3], [2, 3]]), None, "unsupported observation space"),
    (gym.spaces.Text(8), None, "unsupported observation space"),
    (gym.spaces.Graph(gym.spaces.Box(0, 1, (2,)), None), None, "unsupported observation space"),
    (gym.spaces.Box(0, 1, (2, 3, 4, 5)), None, "unsupported observation space"),
    (gym.spaces.Dict({"a": gym.spaces.Box(0, 1, (2,)), "b": gym.spaces.Text(4)}), None, r"observation\['b'\]"),
    (gym.spaces.Dict({"state": gym.spaces.Box(0, 1, (2,))}), None, "named 'observation' or 'state'"),
    (None, gym.spaces.Tuple([gym.spaces.Discrete(2)]), "unsupported action space"),
    (None, gym.spaces.Box(-np.inf, np.inf, (2,)), "finite low and high"),
    (None, gym.spaces.Box(-1, 1, (2, 2)), "unsupported action space"),
    (None, gym.spaces.MultiDiscrete([[2, 3], [2, 3]]), "unsupported action space"),
    (None, gym.spaces.MultiBinary(3), "unsupported action space"),
])
def test_unsupported_spaces_raise_clear_errors(observation, action, match, tmp_path):
    env_cfg = {"id": "AnyEnvTest/Unsupported-v0", "observation_space": observation, "action_space": action}
    with pytest.raises(ValueError, match=match) as err:
        make_vector_env(env_cfg, 2, space_check=check_agent_spaces)  # what the agent builder passes
    assert "supported" in str(err.value) and "AnyEnvTest/Unsupported-v0" in str(err.value)
    with pytest.raises(ValueError, match=match):  # before anything is trained or written
        trainer_for(env_cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- MultiDiscrete and Tuple observations, info content, id suggestions ---------------------------------

@pytest.mark.parametrize("env_id", ["AnyEnvTest/MultiDiscreteObsCue-v0", "AnyEnvTest/TupleCue-v0",
                                    "AnyEnvTest/InfoCue-v0"])
def test_more_observation_spaces_and_any_info_train_4096_frames(env_id, tmp_path):
    """MultiDiscrete observations (one-hot per component), Tuple observations of supported spaces, and an env
    whose reset info holds a string-array key its step info does not: RecurrentPPO trains 4,096 frames."""
    env_cfg = {"id": env_id}
    ppo = PPOConfig(num_envs=16, rollout_len=32, seq_len=8, minibatches=2, epochs=1, eval_episodes=4)
    trainer = RecurrentPPO(build_agent(AGENT, env_cfg, seed=0), env_cfg, ppo, tmp_path, total_frames=4096,
                           progress_bar=False)
    metrics = trainer.train()
    assert metrics["frames"] == 4096 and math.isfinite(metrics["eval_return"])
    assert all(torch.isfinite(v).all() for v in trainer.agent.state_dict().values())


def test_multidiscrete_and_tuple_observations_are_encoded_per_component():
    from rlmem.agents.encoders import MultiDiscreteEncoder

    space = gym.spaces.MultiDiscrete([3, 2])
    encoder, dim = build_encoder(space, 5)
    assert isinstance(encoder, MultiDiscreteEncoder) and dim == 5
    x = torch.tensor([[0, 1], [2, 0]])
    onehot = torch.tensor([[1.0, 0, 0, 0, 1], [0, 0, 1, 1, 0]])  # one-hot of each component, concatenated
    linear = encoder.embed.weight  # [sum(nvec), out]: the Linear of the concatenated one-hots
    torch.testing.assert_close(encoder(x), torch.tanh(onehot @ linear + encoder.bias))
    assert encoder(x.unsqueeze(0).expand(4, 2, 2)).shape == (4, 2, 5)  # any batch dims
    obs_space, _, _ = env_spaces({"id": "AnyEnvTest/TupleCue-v0"})
    assert isinstance(obs_space, gym.spaces.Dict) and list(obs_space.spaces) == ["0", "1", "2"]
    vec = make_vector_env({"id": "AnyEnvTest/TupleCue-v0"}, 2, for_torchrl=False)
    obs, info = vec.reset(seed=0)
    assert set(obs) == {"0", "1", "2"} and info == {}
    vec.close()


def test_env_info_content_never_breaks_an_env():
    env = make_torchrl_env({"id": "AnyEnvTest/InfoCue-v0"}, 3)
    td = env.rollout(10, break_when_any_done=False)
    assert td["next", "observation"].shape == (3, 10, 4)
    for key in ("level", "seed_used", "note", "stats"):
        assert key not in td.keys(True, True) and key not in td["next"].keys(True, True)
    env.close()


def test_a_misspelled_env_id_suggests_the_registered_one():
    from rlmem.env_factory import resolve_env_id

    with pytest.raises(ValueError, match="did you mean 'CartPole-v1'"):
        resolve_env_id("CartPol-v1")
    with pytest.raises(ValueError, match="did you mean 'rlmem/DelayedCue-v0'"):
        resolve_env_id("rlmem/DelayedCeu-v0")
