"""Adaptive compute triggers: the contract's ``trigger``, the policies, the joint log-prob replay, the cost
transform, compute accounting and the errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rlmem.agents import build_agent
from rlmem.agents.triggers import ARS, MeCo, TriggeredMemory, build_trigger_policy
from torchrl.collectors import Collector
from torchrl.envs import ExplorationType
from torchrl.modules import set_recurrent_mode

from rlmem.compute import ComputeMeter, PathCost, TriggerCost, measure_path_flops
from rlmem.env_factory import make_torchrl_env
from rlmem.memory import build_memory, check_memory
from rlmem.ppo import PPOConfig, RecurrentPPO

ROOT = Path(__file__).resolve().parents[1]
INFINITY = {"memory": "infinity", "encoder_dim": 16, "d_model": 16, "n_heads": 2, "mem_slots": 8, "d_state": 4}
ENV = {"id": "rlmem/DelayedCue-v0", "delay": 3}
SMALL = dict(num_envs=4, rollout_len=16, seq_len=8, minibatches=2, epochs=1, eval_episodes=4)


def collect(agent, env_cfg=ENV, num_envs=4, steps=16, extra=()):
    env = make_torchrl_env(env_cfg, num_envs, agent.memory_module.make_tensordict_primer(), extra)
    env.set_seed(0)
    collector = Collector(env, agent.policy, frames_per_batch=num_envs * steps, total_frames=-1,
                          exploration_type=ExplorationType.RANDOM)
    data = next(iter(collector)).reshape(num_envs, steps)
    collector.shutdown()
    return data


# -- the contract --------------------------------------------------------------------------------------------

def test_deep_tier_skip_equals_the_step_loop_with_no_deep_write():
    """miras skips the deep tier's computation on a step where no row fires: the same numbers as the full step
    with the deep gate scaled to 0 (what the sequence mode computes)."""
    torch.manual_seed(0)
    memory = build_memory("miras", d_in=6, d_model=8, mem_slots=4, n_heads=2)
    x = torch.randn(3, 5, 6)
    is_init = torch.zeros(3, 5, dtype=torch.bool)
    is_init[:, 0] = True
    trigger = torch.tensor([[1, 0, 0, 1, 0]] * 3, dtype=torch.bool)  # steps 1, 2, 4: nobody fires
    with torch.no_grad():
        y_seq, s_seq = memory(x, memory.initial_state(3), is_init, trigger=trigger)
        state, ys = memory.initial_state(3), []
        for t in range(5):
            y, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1], trigger=trigger[:, t : t + 1])
            ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_seq)
    for key in s_seq.keys():
        torch.testing.assert_close(state[key], s_seq[key])
    # and the deep tier really was not written on those steps: it equals the state after step 0's write
    with torch.no_grad():
        _, after0 = memory(x[:, :1], memory.initial_state(3), is_init[:, :1], trigger=trigger[:, :1])
        _, after2 = memory(x[:, :3], memory.initial_state(3), is_init[:, :3], trigger=trigger[:, :3])
    torch.testing.assert_close(after2["deep"], after0["deep"])
    assert not torch.equal(after2["fast"], after0["fast"])


def test_path_flops_are_the_deep_tier_prediction():
    """FlopCounterMode counts matrix products: a deep-tier write adds the prediction ``M k`` per head,
    2 * n_heads * d_head * mem_slots FLOPs (d_head = d_model / n_heads), the rest of the write is elementwise."""
    memory = build_memory("infinity", d_in=16, d_model=32, n_heads=4, mem_slots=8, d_state=4)
    cost = measure_path_flops(memory)
    assert cost.path == 2 * 4 * (32 // 4) * 8
    assert cost.base > 10 * cost.path
    assert all(p.requires_grad for p in memory.parameters())  # restored after counting


@pytest.mark.parametrize("policy", ["learned", "meco", "ars", "never"])
def test_triggered_memory_keeps_the_memory_contract(policy):
    torch.manual_seed(0)
    sizes = {k: v for k, v in INFINITY.items() if k not in ("memory", "encoder_dim")}
    inner = build_memory("infinity", d_in=5, **sizes)
    probe = (lambda y, kind: torch.sigmoid(y[..., 0])) if policy in ("meco", "ars") else None
    memory = TriggeredMemory(inner, build_trigger_policy({"policy": policy}, 5 + inner.d_out), probe)
    check_memory(memory)


# -- the agent: joint log-prob, replay ----------------------------------------------------------------------

def test_replaying_stored_triggers_gives_the_acting_log_probs():
    """The collector's stored log-prob is log p(trigger) + log p(action); the PPO replay (sequence mode from the
    stored start states, with the stored triggers) recomputes exactly it."""
    torch.manual_seed(0)
    agent = build_agent(INFINITY, ENV, {"policy": "learned", "init_bias": 0.0})
    data = collect(agent)
    fired = data["trigger"].float().mean()
    assert 0.2 < fired < 0.8  # sampled, not constant (the head starts at p = 0.5)
    replay = data.clone().exclude("features", "trigger_logits")
    with set_recurrent_mode(True):
        agent.backbone(replay)
        dist = agent.actor.get_dist(replay)
        log_prob = dist.log_prob(replay["action"])
    torch.testing.assert_close(log_prob, data["action_log_prob"], rtol=0, atol=1e-6)
    # the joint log-prob holds the trigger's own term, computed here from the stored logits
    bernoulli = torch.distributions.Bernoulli(logits=data["trigger_logits"]).log_prob(data["trigger"].float())
    base = torch.distributions.Categorical(logits=agent.policy_params(data["features"])).log_prob(data["action"])
    torch.testing.assert_close(data["action_log_prob"], base + bernoulli, rtol=0, atol=1e-6)
    # and gradients of the PPO objective reach the trigger head through the replayed logits
    with set_recurrent_mode(True):
        agent.backbone(replay)
        agent.actor.get_dist(replay).log_prob(replay["action"]).sum().backward()
    assert agent.memory.policy.head.weight.grad.abs().sum() > 0


def test_trigger_never_equals_the_memory_without_its_deep_tier():
    """trigger=never: no deep-tier writes; the same outputs as the same weights with lr_deep = 0."""
    torch.manual_seed(0)
    never = build_agent(INFINITY, ENV, {"policy": "never"})
    data = collect(never)
    assert not data["trigger"].any()
    plain = build_agent({**INFINITY, "lr_deep": 0.0}, ENV)
    unwrapped = {k.replace(".memory.memory.", ".memory."): v for k, v in never.state_dict().items()}
    plain.load_state_dict(unwrapped)
    replay = data.clone().select("observation", "is_init", "memory_state")
    for key in ("trigger_prev_y",):
        replay["memory_state"] = replay["memory_state"].exclude(key)
    with set_recurrent_mode(True):
        plain.backbone(replay)
    torch.testing.assert_close(replay["features"], data["features"])
    always = build_agent(INFINITY, ENV)  # the memory as it is: its outputs differ once the deep tier is written
    always.load_state_dict(unwrapped)
    with set_recurrent_mode(True):
        always.backbone(replay)
    assert not torch.allclose(replay["features"], data["features"])


def test_greedy_evaluation_reports_the_trigger_rate():
    from rlmem.evaluate import evaluate_greedy

    for policy, rate in (("never", 0.0), ("always", 1.0)):
        agent = build_agent(INFINITY, ENV, {"policy": policy})
        assert evaluate_greedy(agent, ENV, 3, seed=0, success_threshold=1.0)["eval_trigger_rate"] == rate


# -- the fixed policies --------------------------------------------------------------------------------------

def test_meco_dual_threshold_and_calibration():
    meco = MeCo(target_rate=0.3, margin=0.2)
    assert math.isinf(meco.hi)  # uncalibrated: every step fires
    scores = torch.rand(64, 500, generator=torch.Generator().manual_seed(0))  # i.i.d. uniform
    meco.calibrate(scores)
    # i.i.d. scores: the two-threshold chain fires at p_up / (p_up + p_down), p_up = 1 - F(hi), p_down = F(lo);
    # with margin m of the mass in the band that is target r for hi = F^-1(1 - r (1 - m)), lo = F^-1((1 - r)(1 - m))
    assert meco.lo.item() == pytest.approx(0.56, abs=0.02) and meco.hi.item() == pytest.approx(0.76, abs=0.02)
    assert meco.hi.item() - meco.lo.item() == pytest.approx(0.2, abs=0.01)
    state = {"trigger_last": torch.tensor([True, False, True, False])}
    score = torch.tensor([0.9, 0.9, 0.7, 0.7])
    fire, state = meco.decide(None, score, state)
    assert fire.tolist() == [True, True, True, False]  # above hi: fire; between: keep the previous decision
    fire, _ = meco.decide(None, torch.tensor([0.5, 0.7, 0.7, 0.7]), state)
    assert fire.tolist() == [False, True, True, False]  # below lo: don't; between: as before


def test_ars_suppresses_at_certain_checkpoints_and_tightens():
    ars = ARS(checkpoint_every=2, certainty=0.9, tighten=0.1, floor=0.7)
    state = ars.initial_state(1, "cpu")
    fires, thresholds = [], []
    # certainty = 1 - score; checkpoints at steps 2, 4, 6, 8
    certainty = [0.5, 0.5, 0.95, 0.5, 0.85, 0.5, 0.75, 0.5, 0.72]
    for c in certainty:
        fire, state = ars.decide(None, torch.tensor([1 - c]), state)
        fires.append(bool(fire))
        thresholds.append(round(float(state["trigger_threshold"]), 4))
    # step 2: 0.95 >= 0.9 -> suppress, threshold 0.8; step 4: 0.85 >= 0.8 -> suppress, 0.7; step 6: 0.75 >= 0.7
    # -> suppress, stays at the floor 0.7; step 8: 0.72 >= 0.7 -> suppressed still
    assert fires == [True, True, False, False, False, False, False, False, False]
    assert thresholds[2] == 0.8 and thresholds[4] == 0.7 and thresholds[6] == 0.7
    state = ars.initial_state(1, "cpu")
    for c in [0.5, 0.5, 0.95, 0.5, 0.6]:  # a less certain checkpoint fires again and resets the threshold
        fire, state = ars.decide(None, torch.tensor([1 - c]), state)
    assert bool(fire) and float(state["trigger_threshold"]) == pytest.approx(0.9)


# -- the cost -------------------------------------------------------------------------------------------------

def test_cost_transform_charges_firing_steps_and_keeps_the_env_return():
    agent = build_agent(INFINITY, ENV, {"policy": "learned", "init_bias": 0.0})  # steps that fire and that don't
    penalty_coef, cost_mflops = 3.0, 0.01
    data = collect(agent, extra=[TriggerCost(penalty_coef, cost_mflops)])
    env_reward = data["next", "reward"] + penalty_coef * cost_mflops * data["trigger"].float().unsqueeze(-1)
    # the env's own reward is 0 except at the end of an episode: recovering it exactly shows the charge
    assert set(env_reward.flatten().round(decimals=5).tolist()) <= {0.0, 1.0}
    fired = data["trigger"].unsqueeze(-1)
    charged = fired & (env_reward == 0)
    assert charged.any() and torch.allclose(data["next", "reward"][charged], torch.tensor(-0.03))
    assert (~fired).any() and set(data["next", "reward"][~fired].tolist()) <= {0.0, 1.0}  # not charged
    # RewardSum sits before the charge: episode returns are the env's
    done = data["next", "done"]
    assert set(data["next", "episode_reward"][done].tolist()) <= {0.0, 1.0}


def test_compute_meter_sums_flops_over_episodes_across_rollouts():
    meter = ComputeMeter(2, PathCost(base=10.0, path=5.0))
    fired = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    done = torch.tensor([[False, False, False], [False, True, False]])
    out = meter.update(fired, done)
    assert out["episode_flops"] == [20.0] and out["flops_per_step"] == pytest.approx((15 + 10 + 15 + 30) / 6)
    out = meter.update(torch.ones(2, 1, dtype=torch.bool), torch.tensor([[True], [True]]))
    assert out["episode_flops"] == [55.0, 25.0] and out["trigger_rate"] == 1.0


def test_training_logs_compute_and_a_resume_with_another_trigger_is_refused(tmp_path):
    agent = build_agent(INFINITY, ENV, {"policy": "learned", "cost_coef": 1.0})
    trainer = RecurrentPPO(agent, ENV, PPOConfig(**SMALL), tmp_path, total_frames=128, progress_bar=False)
    metrics = trainer.train()
    compute = metrics["compute"]
    cost = agent.path_cost
    assert compute["flops_per_step"] == pytest.approx(cost.base + cost.path * compute["trigger_rate"])
    assert 0 <= compute["trigger_rate"] <= 1 and compute["episode_flops"] > cost.base
    assert json.loads((tmp_path / "metrics.json").read_text())["compute"] == compute
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"compute/trigger_rate", "compute/flops_per_step", "compute/episode_flops",
            "compute/eval_trigger_rate"} <= set(events.Tags()["scalars"])
    other = build_agent(INFINITY, ENV, {"policy": "never"})
    from rlmem.run import RunDirError

    with pytest.raises(RunDirError, match="trigger"):
        RecurrentPPO(other, ENV, PPOConfig(**SMALL), tmp_path, total_frames=256, progress_bar=False)


# -- errors -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trigger, match", [
    ({"policy": "sometimes"}, r"^trigger.policy='sometimes' is not a trigger policy; valid choices: always, ars, learned, "
                              r"meco, never$"),
    ({"policy": "lerned"}, r"is not a trigger policy \(did you mean 'learned'\?\)"),
    ({"policy": "learned", "cost_coef": -0.5}, "trigger.cost_coef"),
    ({"policy": "learned", "cost": -1}, "trigger.cost"),
    ({"policy": "meco", "probe": "vibes"}, r"valid: \['entropy', 'max_prob', 'hidden_var'\]"),
    ({"policy": "ars", "checkpoint_every": 4, "patience": 3}, r"^trigger.patience is not an option of trigger=ars; valid: "),
])
def test_bad_trigger_configs_fail_when_the_agent_is_built(trigger, match):
    with pytest.raises(ValueError, match=match):
        build_agent(INFINITY, ENV, trigger)


def test_a_memory_without_a_gated_path_cannot_take_a_trigger_policy():
    with pytest.raises(ValueError, match="has no gated path.*infinity, miras, darmt, stm, cmrn"):
        build_agent({"memory": "gru", "hidden_size": 8}, ENV, {"policy": "learned"})
    build_agent({"memory": "gru", "hidden_size": 8}, ENV, {"policy": "always"})  # nothing to gate: fine


def test_probes_of_the_policy_need_discrete_actions():
    with pytest.raises(ValueError, match="trigger.probe=hidden_var"):
        build_agent(INFINITY, {"id": "rlmem/PositionOnlyPendulum-v0"}, {"policy": "meco"})
    build_agent(INFINITY, {"id": "rlmem/PositionOnlyPendulum-v0"}, {"policy": "meco", "probe": "hidden_var"})


def test_cli_rejects_an_unknown_trigger_before_training(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_rl.py"), "agent=infinity", "trigger=sometimes",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0
    assert "trigger" in out.stderr and "learned" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_learned_trigger_with_a_continuous_action_head_trains(tmp_path):
    """TanhNormal has no analytic entropy or mode: the joint distribution still replays its log-probs, and a
    PPO update (Monte Carlo entropy) runs finite."""
    torch.manual_seed(0)
    env = {"id": "rlmem/PositionOnlyPendulum-v0"}
    agent = build_agent(INFINITY, env, {"policy": "learned", "init_bias": 0.0})
    data = collect(agent, env_cfg=env)
    replay = data.clone().exclude("features", "trigger_logits")
    with set_recurrent_mode(True):
        agent.backbone(replay)
        dist = agent.actor.get_dist(replay)
        torch.testing.assert_close(dist.log_prob(replay["action"]), data["action_log_prob"], rtol=1e-5, atol=1e-4)
        assert torch.isfinite(dist.entropy()).all()
    trainer = RecurrentPPO(agent, env, PPOConfig(**SMALL), tmp_path, total_frames=64, progress_bar=False)
    assert math.isfinite(trainer.train()["compute"]["trigger_rate"])


@pytest.mark.parametrize("memory", ["darmt", "stm", "cmrn", "miras"])
def test_every_gated_memory_replays_learned_triggers_exactly(memory):
    """Each system's gated path under a learned trigger: the replay recomputes the acting log-probs."""
    from rlmem.memory import memory_class

    torch.manual_seed(0)
    sizes = dict(memory_class(memory).test_kwargs)
    if memory == "cmrn":
        sizes["router_noise"] = 0.0  # as agent=cmrn sets it: fresh router noise would route the replay differently
    agent = build_agent({"memory": memory, "encoder_dim": 8, **sizes}, ENV, {"policy": "learned", "init_bias": 0.0})
    assert agent.path_cost.path > 0
    data = collect(agent)
    assert 0 < data["trigger"].float().mean() < 1
    replay = data.clone().exclude("features", "trigger_logits")
    with set_recurrent_mode(True):
        agent.backbone(replay)
        log_prob = agent.actor.get_dist(replay).log_prob(replay["action"])
    torch.testing.assert_close(log_prob, data["action_log_prob"], rtol=1e-5, atol=1e-5)


def test_meco_calibrates_on_each_rollout_while_training(tmp_path):
    """The trainer hands each rollout to the agent: MeCo's thresholds become the quantiles of its probe scores
    (recomputed here from the rollout the trainer saw last)."""
    torch.manual_seed(0)
    agent = build_agent(INFINITY, ENV, {"policy": "meco", "probe": "hidden_var", "target_rate": 0.4})
    seen = []
    original = agent.after_rollout
    agent.after_rollout = lambda data: (seen.append(data.select("trigger_score", "is_init").clone()), original(data))
    RecurrentPPO(agent, ENV, PPOConfig(**SMALL), tmp_path, total_frames=128, progress_bar=False).train()
    meco = agent.memory.policy
    fresh = MeCo(probe="hidden_var", target_rate=0.4)
    fresh.calibrate(seen[-1]["trigger_score"], seen[-1]["is_init"].reshape(seen[-1].batch_size))
    assert math.isfinite(meco.lo) and meco.lo <= meco.hi
    torch.testing.assert_close(torch.stack([meco.lo, meco.hi]), torch.stack([fresh.lo, fresh.hi]))


@pytest.mark.parametrize("memory, own", [("cmrn", "top_k")])  # darmt's and stm's own switches are gone
def test_the_contract_trigger_and_a_systems_own_switch_are_not_both_taken(memory, own):
    from rlmem.memory import memory_class

    m = build_memory(memory, d_in=4, **memory_class(memory).test_kwargs)
    x, is_init = torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)
    switch = torch.ones(2, 3, dtype=torch.long) if own == "top_k" else torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="not both"):
        m(x, m.initial_state(2), is_init, trigger=torch.ones(2, 3, dtype=torch.bool), **{own: switch})
