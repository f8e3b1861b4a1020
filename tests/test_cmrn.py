"""CMRN (rlmem/memory/cmrn.py): timescales, LRU slots, reads, fuzzy logic, routing, sparse == dense, per-row
top_k, aux losses in both trainers, diagnostics in TensorBoard, continual learning, errors.

Expectations are built independently of the code under test: hand-built states and hand-computed values,
a dense run of every expert as the reference of the sparse dispatch, hooks that count expert calls.
"""

from __future__ import annotations

import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlmem.memory import MemorySystem, build_memory, check_memory, registry
from rlmem.memory.baselines import GRUMemory
from rlmem.memory.cmrn import (CMRN, EXPERT_TYPES, PatternExpert, SymbolicExpert, add_expert, fuzzy_and, fuzzy_not,
                               fuzzy_or, lru_update, read_slots)

D_IN = 5
SMALL = {"d_model": 16, "n_timescales": 3, "n_experts": 3, "top_k": 2, "mem_slots": 3, "d_key": 8,
         "n_predicates": 6, "n_clauses": 4, "n_prototypes": 4}


def cmrn(dtype=torch.float64, seed=0, **kwargs) -> CMRN:
    torch.manual_seed(seed)
    return build_memory("cmrn", d_in=D_IN, **{**SMALL, **kwargs}).to(dtype).eval()


def inputs(B=4, T=10, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, generator=g).to(dtype)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:, 0] = True
    is_init[1, T // 2 + 1] = True
    return x, is_init


def run_steps(memory, x, state, is_init, top_k=None):
    ys = []
    for t in range(x.shape[1]):
        k = None if top_k is None else top_k[:, t : t + 1]
        y, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1], top_k=k)
        ys.append(y)
    return torch.cat(ys, 1), state


# -- contract, in both dispatch modes and at the edges of the knobs ------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"dispatch": "dense"},
    {"n_timescales": 1, "n_experts": 1, "top_k": 1, "mem_slots": 1},
    {"expert_types": "symbolic", "top_k": 3},
])
def test_contract_float64(kwargs):
    check_memory(cmrn(**kwargs))


def test_train_mode_without_noise_steps_equal_the_sequence_and_noise_changes_routing():
    """PPO acts and replays in training mode: with router_noise=0 (the agent config) both compute the same
    numbers; with noise, two calls route differently (why the RL config turns it off)."""
    x, is_init = inputs()
    quiet = cmrn(router_noise=0.0).train()
    y_seq, s_seq = quiet(x, quiet.initial_state(4), is_init)
    y_step, s_step = run_steps(quiet, x, quiet.initial_state(4), is_init)
    torch.testing.assert_close(y_step, y_seq)
    for key in s_seq.keys():
        torch.testing.assert_close(s_step[key], s_seq[key])
    noisy = cmrn(router_noise=3.0).train()
    torch.manual_seed(0)
    a = noisy(x, noisy.initial_state(4), is_init)[1]["mem_used"]
    b = noisy(x, noisy.initial_state(4), is_init)[1]["mem_used"]
    assert not torch.equal(a, b)  # different experts were written
    noisy.eval()
    y1, y2 = (noisy(x, noisy.initial_state(4), is_init)[0] for _ in range(2))
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # greedy in eval mode


# -- temporal abstraction ------------------------------------------------------------------------------------

def test_timescale_layer_i_changes_only_every_2_pow_i_steps_and_restarts_at_an_episode_start():
    memory = cmrn(n_timescales=3)
    B, T = 2, 14
    x = torch.randn(B, T, D_IN, dtype=torch.float64)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:, 0] = True
    is_init[1, 5] = True  # row 1 restarts: its clock restarts at step 5
    state, hs = memory.initial_state(B), []
    for t in range(T):
        _, state = memory(x[:, t : t + 1], state, is_init[:, t : t + 1])
        hs.append(state["h"])
    for b, start in ((0, 0), (1, 5)):
        for t in range(start + 1, T):
            c = t - start  # steps since the episode start at step t
            for i in range(3):
                same = torch.equal(hs[t][b, i], hs[t - 1][b, i])
                assert same == (c % 2**i != 0), (b, t, i)
    # right after the restart, row 1's layers 1, 2 are recomputed from zeros, not continued
    assert not torch.equal(hs[5][1, 2], hs[4][1, 2])
    assert state["count"].tolist() == [T, T - 5]


# -- persistent memory slots ----------------------------------------------------------------------------------

def test_read_softmax_over_written_slots_only():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    values = torch.tensor([[[1.0], [3.0], [100.0]]])
    used = torch.tensor([[5, 1, 0]])  # slot 2 never written: ignored although its score is largest
    read, w = read_slots(q, keys, values, used, scale=1.0)
    e = math.exp(2.0)
    torch.testing.assert_close(w, torch.tensor([[e / (e + 1), 1 / (e + 1), 0.0]]))
    torch.testing.assert_close(read, torch.tensor([[(e + 3) / (e + 1)]]))
    read, w = read_slots(q, keys, values, torch.zeros_like(used), scale=1.0)
    assert torch.equal(read, torch.zeros(1, 1)) and torch.equal(w, torch.zeros(1, 3))


def test_lru_slot_on_hand_built_usage():
    stamp = torch.tensor([9, 9, 9])
    used = torch.tensor([[5, 2, 2, 7],    # read refreshes slot 3, write: slots 1, 2 tie at 2 -> slot 1
                         [0, 0, 0, 0],    # empty: nothing to refresh, write slot 0
                         [4, 3, 6, 1]])   # read refreshes slot 3 (the least used): write goes to slot 1
    read_w = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.1, 0.9]])
    new, slot = lru_update(used, read_w, stamp)
    assert slot.tolist() == [1, 0, 1]
    assert new.tolist() == [[5, 9, 2, 9], [9, 0, 0, 0], [4, 9, 6, 9]]


def test_write_goes_to_the_least_recently_used_slot_of_the_chosen_expert_only():
    """A hand-built state: expert 0's slots used at steps (4, 2, 2), all keys equal (the read weights tie, the
    refresh goes to slot 0): the step writes slot 1 (the first of the tied least-used), nothing else."""
    memory = cmrn(n_experts=2, top_k=1, mem_slots=3)
    with torch.no_grad():  # route everything to expert 0
        memory.router.weight.zero_()
        memory.router.bias.copy_(torch.tensor([5.0, 0.0]))
    state = memory.initial_state(1)
    state["count"] = torch.tensor([6])
    state["mem_used"] = torch.tensor([[[4, 2, 2], [3, 1, 5]]])
    state["mem_k"] = torch.ones(1, 2, 3, SMALL["d_key"], dtype=torch.float64)
    state["mem_v"] = torch.randn(1, 2, 3, SMALL["d_model"], dtype=torch.float64)
    _, new = memory(torch.randn(1, 1, D_IN, dtype=torch.float64), state, torch.zeros(1, 1, dtype=torch.bool))
    assert new["mem_used"].tolist() == [[[7, 7, 2], [3, 1, 5]]]
    changed = (new["mem_k"] != state["mem_k"]).any(-1)
    assert changed.tolist() == [[[False, True, False], [False, False, False]]]
    assert torch.equal(new["mem_v"][0, 1], state["mem_v"][0, 1]) and torch.equal(new["mem_v"][0, 0, 0],
                                                                                state["mem_v"][0, 0, 0])


# -- expert cores ---------------------------------------------------------------------------------------------

def test_fuzzy_connectives_hand_computed():
    a = torch.tensor([0.5, 0.4])
    assert fuzzy_and(a).item() == pytest.approx(0.2)
    assert fuzzy_or(a).item() == pytest.approx(0.7)  # 0.5 + 0.4 - 0.2
    torch.testing.assert_close(fuzzy_not(a), torch.tensor([0.5, 0.6]))


def test_symbolic_expert_computes_a_crisp_formula_when_its_soft_choices_saturate():
    """Clause 0 = p0 AND NOT p1, clause 1 = p2; disjunction 0 = clause 0 OR clause 1."""
    expert = SymbolicExpert(d_model=4, n_predicates=3, n_clauses=2)
    big = 50.0
    with torch.no_grad():
        expert.membership.copy_(torch.tensor([[big, big, -big], [-big, -big, big]]))
        expert.polarity.copy_(torch.tensor([[big, -big, big], [big, big, big]]))
        expert.or_membership.copy_(torch.tensor([[big, big], [-big, -big]]))
    for p0 in (0.0, 1.0):
        for p1 in (0.0, 1.0):
            for p2 in (0.0, 1.0):
                conj, disj = expert.logic(torch.tensor([[p0, p1, p2]]))
                c0, c1 = bool(p0) and not bool(p1), bool(p2)
                torch.testing.assert_close(conj[0], torch.tensor([float(c0), float(c1)]), atol=1e-6, rtol=0)
                torch.testing.assert_close(disj[0, 0], torch.tensor(float(c0 or c1)), atol=1e-6, rtol=0)
                assert disj[0, 1].item() == pytest.approx(0.0, abs=1e-6)  # an empty OR is false


def test_pattern_expert_matches_the_nearest_prototype():
    expert = PatternExpert(d_model=2, d_key=3, n_prototypes=4)
    with torch.no_grad():
        expert.proj.weight.zero_()
        expert.proj.weight[:, :3] = torch.eye(3)
        expert.proj.bias.zero_()
        expert.log_temperature.fill_(3.0)
    u = torch.cat([expert.prototypes[2].detach(), torch.zeros(1)]).unsqueeze(0)  # [1, 2 d_model]
    w = expert.match(u)
    assert w.argmax().item() == 2 and w[0, 2] > 0.99


# -- routing, dispatch, per-row top_k ------------------------------------------------------------------------

def test_router_picks_the_top_k_logits_and_renormalizes_their_gates():
    memory = cmrn(n_experts=3, top_k=2, mem_slots=2)
    with torch.no_grad():
        memory.router.weight.zero_()
        memory.router.bias.copy_(torch.tensor([1.0, 3.0, 2.0]))  # top-2: experts 1 and 2
    calls = []
    for e, expert in enumerate(memory.experts):
        expert.core.register_forward_hook(lambda m, i, o, e=e: calls.append((e, o)))
    x = torch.randn(1, 1, D_IN, dtype=torch.float64)
    y, _ = memory(x, memory.initial_state(1), torch.ones(1, 1, dtype=torch.bool))
    assert sorted(e for e, _ in calls) == [1, 2]
    # recompute the output with the gates softmax([3, 2]) from the recorded expert outputs
    out = dict(calls)
    g1, g2 = torch.softmax(torch.tensor([3.0, 2.0], dtype=torch.float64), 0)
    moe = g1 * out[1] + g2 * out[2]
    d = memory.diagnostics()
    assert d["expert_usage/0"] == 0 and d["expert_usage/1"] == d["expert_usage/2"] == 0.5
    # y = LayerNorm(z + W_o moe): recover z from the expert input captured by a pre-hook
    captured = []
    memory.experts[1].core.register_forward_pre_hook(lambda m, i: captured.append(i[0]))
    memory(x, memory.initial_state(1), torch.ones(1, 1, dtype=torch.bool))
    z = captured[0][:, :16]
    torch.testing.assert_close(y[:, 0], memory.norm_out(z + memory.out(moe)))


@pytest.mark.parametrize("per_row", [False, True])
def test_sparse_dispatch_equals_the_dense_masked_reference_and_computes_only_chosen_experts(per_row):
    x, is_init = inputs(B=5, T=8)
    top_k = torch.randint(1, 4, (5, 8), generator=torch.Generator().manual_seed(3)) if per_row else None
    sparse = cmrn(n_experts=3, top_k=2, dispatch="sparse").train()  # train mode: gradients, no noise below
    sparse.router_noise = 0.0
    dense = cmrn(n_experts=3, top_k=2, dispatch="dense").train()
    dense.router_noise = 0.0
    dense.load_state_dict(sparse.state_dict())
    rows_seen = {"sparse": [0, 0, 0], "dense": [0, 0, 0]}
    for name, memory in (("sparse", sparse), ("dense", dense)):
        for e, expert in enumerate(memory.experts):
            expert.core.register_forward_hook(lambda m, i, o, e=e, name=name: rows_seen[name].__setitem__(
                e, rows_seen[name][e] + i[0].shape[0]))
    results = []
    for memory in (sparse, dense):
        y, state = memory(x, memory.initial_state(5), is_init, top_k=top_k)
        loss = (y * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum() + memory.aux_loss()
        grads = torch.autograd.grad(loss, list(memory.parameters()), allow_unused=True)
        results.append((y, state, memory.aux_loss().detach(), grads))
    (y_s, s_s, a_s, g_s), (y_d, s_d, a_d, g_d) = results
    torch.testing.assert_close(y_s, y_d)
    for key in s_d.keys():
        torch.testing.assert_close(s_s[key], s_d[key])
    torch.testing.assert_close(a_s, a_d)
    for gs, gd in zip(g_s, g_d):
        if gd is None or gs is None:
            assert (gs is None or not gs.any()) and (gd is None or not gd.any())
        else:
            torch.testing.assert_close(gs, gd)
    assigned = sum(round(v * (top_k.sum().item() if per_row else 2 * 5 * 8))
                   for k, v in sparse.diagnostics().items() if k.startswith("expert_usage/"))
    assert sum(rows_seen["sparse"]) == assigned == (top_k.sum().item() if per_row else 2 * 5 * 8)
    assert rows_seen["dense"] == [5 * 8] * 3  # dense: every expert on every row and step


def test_per_row_top_k_override():
    x, is_init = inputs(B=3, T=6)
    memory = cmrn(n_experts=3, top_k=2)
    y_default, s_default = memory(x, memory.initial_state(3), is_init)
    y_two, s_two = memory(x, memory.initial_state(3), is_init, top_k=torch.full((3, 6), 2))
    torch.testing.assert_close(y_two, y_default, rtol=0, atol=0)
    one = cmrn(n_experts=3, top_k=1)
    y_one, _ = one(x, one.initial_state(3), is_init)
    mixed = torch.tensor([[1] * 6, [2] * 6, [1] * 6])  # rows 0 and 2 as top_k=1, row 1 as top_k=2
    y_mixed, _ = memory(x, memory.initial_state(3), is_init, top_k=mixed)
    torch.testing.assert_close(y_mixed[[0, 2]], y_one[[0, 2]])
    torch.testing.assert_close(y_mixed[1], y_default[1])
    # step mode with the override equals sequence mode with it
    y_steps, _ = run_steps(memory, x, memory.initial_state(3), is_init, top_k=mixed)
    torch.testing.assert_close(y_steps, y_mixed)
    for bad, match in ((torch.full((3, 6), 4), r"top_k values must be in \[1, n_experts=3\]"),
                       (torch.zeros(3, 6, dtype=torch.long), r"\[1, n_experts=3\]"),
                       (torch.full((3, 5), 1), r"shape \[B, T\]"),
                       (torch.full((3, 6), 1.0), "integer")):
        with pytest.raises(ValueError, match=match):
            memory(x, memory.initial_state(3), is_init, top_k=bad)


# -- aux losses ---------------------------------------------------------------------------------------------

def test_balance_and_z_loss_values_for_a_uniform_router():
    memory = cmrn(n_experts=4, top_k=2, balance_coef=0.1, z_coef=0.01)
    with torch.no_grad():
        memory.router.weight.zero_()
        memory.router.bias.zero_()
    x, is_init = inputs()
    memory(x, memory.initial_state(4), is_init)
    # P_e = 1/4 for all e, sum_e f_e = 1 -> E * sum_e f_e / 4 = 1; logsumexp(0, 0, 0, 0) = ln 4
    assert memory.balance_loss().item() == pytest.approx(1.0)
    assert memory.z_loss().item() == pytest.approx(math.log(4) ** 2)
    assert memory.aux_loss().item() == pytest.approx(0.1 + 0.01 * math.log(4) ** 2)
    d = memory.diagnostics()
    assert d["routing_entropy"] == pytest.approx(math.log(4))
    assert cmrn(balance_coef=0.0, z_coef=0.0).aux_loss() is None


def test_balance_loss_gradient_lowers_the_probability_of_an_overused_expert():
    memory = cmrn(n_experts=3, top_k=1).train()
    memory.router_noise = 0.0
    with torch.no_grad():
        memory.router.weight.zero_()
        memory.router.bias.copy_(torch.tensor([2.0, 0.0, 0.0]))  # everything goes to expert 0
    x, is_init = inputs()
    memory(x, memory.initial_state(4), is_init)
    (grad,) = torch.autograd.grad(memory.balance_loss(), [memory.router.bias])
    assert grad[0] > 0 and grad[1] < 0 and grad[2] < 0  # descent moves probability away from expert 0


def test_aux_losses_train_the_router_only():
    """The load-balance and z-losses move the router's weights, not the shared features (embedding,
    temporal layers) that the experts and the policy read."""
    memory = cmrn(n_experts=3, top_k=1).train()
    x, is_init = inputs()
    memory(x, memory.initial_state(4), is_init)
    names = [n for n, p in memory.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(memory.aux_loss(), list(memory.parameters()), allow_unused=True)))
    assert grads["router.weight"] is not None and grads["router.weight"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if not n.startswith("router.")), \
        [n for n, g in grads.items() if g is not None]


def _spy_aux(monkeypatch):
    """Every aux_loss() a trainer asks for gets a hook recording the gradient that reaches it."""
    seen = []
    original = CMRN.aux_loss

    def spy(self):
        aux = original(self)
        if aux is not None and aux.requires_grad:
            record = {"grad": None}
            aux.register_hook(lambda g: record.__setitem__("grad", g.item()))
            seen.append(record)
        return aux

    monkeypatch.setattr(CMRN, "aux_loss", spy)
    return seen


def _scalar_tags(run_dir) -> set[str]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


TINY_AGENT = {"memory": "cmrn", "encoder_dim": 8, "d_model": 8, "n_timescales": 2, "n_experts": 3, "top_k": 1,
              "mem_slots": 2, "d_key": 4, "n_predicates": 4, "n_clauses": 2, "n_prototypes": 2, "router_noise": 0.0}


def test_ppo_adds_the_aux_loss_and_logs_the_diagnostics(tmp_path, monkeypatch):
    from rlmem.agents import build_agent
    from rlmem.ppo import PPOConfig, RecurrentPPO

    seen = _spy_aux(monkeypatch)
    ppo = PPOConfig(num_envs=4, rollout_len=16, seq_len=8, minibatches=2, epochs=1, eval_episodes=2,
                    eval_interval=10_000)
    trainer = RecurrentPPO(build_agent(TINY_AGENT, {"id": "rlmem/DelayedCue-v0", "delay": 2}),
                           {"id": "rlmem/DelayedCue-v0", "delay": 2}, ppo, tmp_path,
                           total_frames=128, progress_bar=False)
    metrics = trainer.train()
    # 2 iterations x 2 minibatches, each aux loss backpropagated with weight 1 in the total loss
    assert [r["grad"] for r in seen] == [1.0] * 4
    tags = _scalar_tags(tmp_path)
    assert {"memory/routing_entropy", "memory/usage_entropy", "losses/aux_loss"} <= tags
    assert {f"memory/expert_usage/{i}" for i in range(3)} <= tags
    assert sum(metrics["memory"][f"expert_usage/{i}"] for i in range(3)) == pytest.approx(1.0)


def lm_cfg(model, steps=3):
    return {"model": model, "task": {"name": "copy_memory", "n_items": 3, "delay": 2, "vocab_size": 6},
            "steps": steps, "batch_size": 4, "eval_interval": steps, "eval_batches": 1, "checkpoint_interval": steps,
            "progress_bar": False}


def test_train_lm_adds_the_aux_loss_and_logs_the_diagnostics(tmp_path, monkeypatch):
    from rlmem.lm_training import run

    seen = _spy_aux(monkeypatch)
    model = {**{k: v for k, v in TINY_AGENT.items() if k != "encoder_dim"}, "router_noise": 1.0}
    metrics = run(lm_cfg(model), tmp_path, progress=False)
    assert [r["grad"] for r in seen] == [1.0] * 3
    tags = _scalar_tags(tmp_path)
    assert {"memory/routing_entropy", "memory/expert_usage/0", "lm/aux_loss"} <= tags
    assert metrics["memory"]["routing_entropy"] > 0


class _DiagnosticsProbe(GRUMemory):
    """Any memory system can report numbers: a GRU reporting its last output's mean absolute value."""

    def forward(self, x, state, is_init):
        y, state = super().forward(x, state, is_init)
        self._mean_abs = float(y.detach().abs().mean())
        return y, state

    def diagnostics(self):
        return {"mean_abs_output": self._mean_abs}


def test_the_diagnostics_hook_is_generic(tmp_path, monkeypatch):
    from rlmem.lm_training import run

    monkeypatch.setitem(registry._REGISTRY, "_diagnostics_probe", _DiagnosticsProbe)  # this test only
    run(lm_cfg({"memory": "_diagnostics_probe", "d_model": 8, "hidden_size": 8}, steps=2), tmp_path, progress=False)
    assert "memory/mean_abs_output" in _scalar_tags(tmp_path)
    assert MemorySystem.diagnostics(build_memory("gru", d_in=2, hidden_size=2)) == {}


# -- continual learning -------------------------------------------------------------------------------------

def test_add_expert_freezes_the_old_experts_and_grows_the_router():
    memory = cmrn(n_experts=2, top_k=1).train()
    memory.router_noise = 0.0
    old_router = memory.router.weight.detach().clone()
    index = add_expert(memory, "pattern")
    assert index == 2 and memory.n_experts == 3 and memory.expert_types[-1] == "pattern"
    assert memory.router.out_features == 3 and memory.noise.out_features == 3
    assert torch.equal(memory.router.weight[:2], old_router)
    frozen = {n: p.detach().clone() for n, p in memory.named_parameters() if n.startswith(("experts.0", "experts.1"))}
    new = {n: p.detach().clone() for n, p in memory.named_parameters() if n.startswith("experts.2")}
    assert frozen and new and not any(p.requires_grad for n, p in memory.named_parameters() if n in frozen)
    optimizer = torch.optim.Adam(memory.parameters(), lr=1e-2)
    x, is_init = inputs()
    for _ in range(2):
        # every expert computes (top_k = 3), so the frozen ones would get gradients if they were trainable
        y, _ = memory(x, memory.initial_state(4), is_init, top_k=torch.full((4, 10), 3))
        loss = (y * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum() + memory.aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = dict(memory.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), n
    assert any(not torch.equal(params[n], before) for n, before in new.items())
    assert not torch.equal(memory.router.weight[:2], old_router)  # the router keeps learning
    check_memory(memory.eval())  # the grown system still satisfies the contract
    with pytest.raises(ValueError, match=r"valid: \['general', 'symbolic', 'pattern'\]"):
        add_expert(memory, "generative")


# -- errors ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"n_experts": 3, "top_k": 4}, r"top_k must be in \[1, 3\] \(n_experts=3\), got 4"),
    ({"top_k": 0}, r"top_k must be in \[1, 3\]"),
    ({"expert_types": ["general", "generative", "pattern"]}, r"unknown expert_types \['generative'\]; "
                                                             r"valid: \['general', 'symbolic', 'pattern'\]"),
    ({"expert_types": ["general"]}, "expert_types has 1 entries, n_experts=3"),
    ({"mem_slots": 0}, r"mem_slots must be in \[1, inf\]"),
    ({"n_timescales": 0}, r"n_timescales must be in \[1, inf\]"),
    ({"n_experts": 0}, "n_experts must be"),
    ({"dispatch": "all"}, r"dispatch must be one of \['sparse', 'dense'\]"),
    ({"router_noise": -1.0}, "router_noise"),
    ({"balance_coef": -0.1}, "balance_coef"),
])
def test_bad_knobs_raise_naming_the_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_memory("cmrn", d_in=D_IN, **{**SMALL, **kwargs})


def test_expert_types_default_cycles_every_type():
    assert cmrn(n_experts=4, top_k=1).expert_types == ["general", "symbolic", "pattern", "general"]
    assert list(EXPERT_TYPES) == ["general", "symbolic", "pattern"]
