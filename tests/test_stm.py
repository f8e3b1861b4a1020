"""STM (rlmem/memory/stm.py): the frozen generator (out of every optimizer, unchanged by training, gradients
through it), the per-row refinement switch, the write gate's retention, the denoising loss, generator
sources and checkpoints, clear errors; and scripts/stm_fit.py's smoke run.

The Diffuser starts as the identity (zero output projections), so tests that need refinement to change
something give it random output weights first (:func:`live`).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlmem.causal_lm import tiny_causal_lm
from rlmem.memory import build_memory, check_memory
from rlmem.memory.stm import STM
from rlmem.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
D_IN = 5
SMALL = {"d_model": 8, "n_slots": 3, "n_refine": 2, "n_heads": 2, "generator_hidden": 16, "generator_layers": 1,
         "generator_heads": 2}


def stm(seed=0, **kwargs) -> STM:
    torch.manual_seed(seed)
    return build_memory("stm", d_in=D_IN, **{**SMALL, **kwargs})


def live(memory: STM, seed: int = 1, scale: float = 0.5) -> STM:
    """Random Diffuser output weights (as after training): refinement then changes the buffer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (memory.diffuser.out, memory.diffuser.ff[-1]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * scale)
    return memory


def inputs(B=3, T=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, generator=g)
    is_init = torch.zeros(B, T, dtype=torch.bool)
    is_init[:, 0] = True
    return x, is_init


def generator_tensors(memory: STM) -> dict[str, torch.Tensor]:
    return {n: b for n, b in memory.named_buffers() if n.startswith("generator.")}


# -- the frozen generator ---------------------------------------------------------------------------------

def test_generator_weights_are_frozen_buffers_not_parameters():
    memory = stm()
    frozen = generator_tensors(memory)
    assert len(frozen) > 5  # embeddings, attention, MLP and norm weights of the decoder
    assert all(not b.requires_grad for b in frozen.values())
    assert not any(n.startswith("generator.") for n, _ in memory.named_parameters())
    ids = {id(p) for p in memory.parameters()}
    assert not any(id(b) in ids for b in frozen.values())
    saved = memory.state_dict()  # persistent: a checkpoint holds the generator it was trained with
    assert all(n in saved for n in frozen if not n.endswith("inv_freq"))


def test_an_optimizer_step_changes_the_trainable_weights_but_not_the_generator():
    memory = stm()
    frozen = {n: b.clone() for n, b in generator_tensors(memory).items()}
    encoder = memory.encoder[0].weight.detach().clone()
    optimizer = torch.optim.Adam(memory.parameters(), lr=1e-2)
    x, is_init = inputs()
    y, _ = memory(x, memory.initial_state(3), is_init)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    optimizer.step()
    assert not torch.equal(memory.encoder[0].weight, encoder)
    for n, b in generator_tensors(memory).items():
        assert torch.equal(b, frozen[n]), n


def test_the_trainers_optimizers_hold_no_generator_tensor(tmp_path):
    """Built exactly as train_rl.py and train_lm.py build them."""
    from rlmem.lm_training import LMTrainer
    from rlmem.agents import build_agent
    from rlmem.ppo import PPOConfig, RecurrentPPO

    agent = {"memory": "stm", "encoder_dim": 8, **SMALL}
    ppo_cfg = PPOConfig.from_mapping({"num_envs": 2, "rollout_len": 8, "seq_len": 8, "minibatches": 1})
    trainer = RecurrentPPO(build_agent(agent, {"id": "rlmem/DelayedCue-v0"}),
                           {"id": "rlmem/DelayedCue-v0"}, ppo_cfg, tmp_path / "rl", total_frames=16)
    memory = trainer.agent.memory
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in trainer.agent.parameters()} == in_optimizer
    assert not any(id(b) in in_optimizer for b in generator_tensors(memory).values())
    assert id(memory.encoder[0].weight) in in_optimizer

    cfg = OmegaConf.load(CONF_DIR / "train_lm.yaml")
    cfg = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("defaults", "hydra")}
    cfg.update(steps=1, progress_bar=False, model={"memory": "stm", "d_model": 8, **{k: v for k, v in SMALL.items()
                                                                                      if k != "d_model"}},
               task={"name": "copy_memory", "n_items": 2, "delay": 2})
    lm = LMTrainer(cfg, tmp_path / "lm", progress=False)
    in_optimizer = {id(p) for group in lm.optimizer.param_groups for p in group["params"]}
    assert not any(id(b) in in_optimizer for b in generator_tensors(lm.model.memory).values())
    assert id(lm.model.memory.encoder[0].weight) in in_optimizer


def test_gradient_reaches_the_buffer_through_the_generator():
    """The buffer reaches y only through the generator; its autograd gradient matches central differences."""
    memory = stm().double().eval()
    x, _ = inputs(B=2, T=1)
    x = x.double()
    # a buffer holding content (an empty slot sits at the kink of the generator's RMSNorm)
    buf = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64).requires_grad_(True)
    w = torch.randn(2, 1, memory.d_out, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    no_reset = torch.zeros(2, 1, dtype=torch.bool)

    def readout(b):
        state = memory.initial_state(2).clone()
        state["buffer"] = b
        return (memory(x, state, no_reset)[0] * w).sum()

    (grad,) = torch.autograd.grad(readout(buf), buf)
    assert grad.abs().max() > 1e-3
    direction = torch.randn(buf.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = 1e-3  # the generator's norms compute in float32: smaller steps drown in its rounding
    with torch.no_grad():
        numeric = (readout(buf + eps * direction) - readout(buf - eps * direction)) / (2 * eps)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=2e-3, atol=1e-5)


def test_generator_stays_in_eval_mode_when_the_memory_trains():
    memory = stm().train()
    assert memory.encoder.training and not memory.generator.training
    assert not any(m.training for m in memory.generator.modules())


# -- the refinement switch -----------------------------------------------------------------------------------

def test_refine_off_for_one_row_changes_only_that_row():
    memory = live(stm()).eval()
    x, is_init = inputs()
    refine = torch.ones(3, 6, dtype=torch.bool)
    refine[1] = False
    with torch.no_grad():
        y_on, s_on = memory(x, memory.initial_state(3), is_init)
        y_off, s_off = memory(x, memory.initial_state(3), is_init, trigger=refine)
        # the expectation for row 1: the same weights without a Diffuser at all
        plain = stm(n_refine=0)
        plain.load_state_dict({k: v for k, v in memory.state_dict().items() if not k.startswith("diffuser.")})
        y_plain, s_plain = plain.eval()(x, plain.initial_state(3), is_init)
    torch.testing.assert_close(y_off[[0, 2]], y_on[[0, 2]])
    torch.testing.assert_close(s_off["buffer"][[0, 2]], s_on["buffer"][[0, 2]])
    torch.testing.assert_close(y_off[1], y_plain[1])
    torch.testing.assert_close(s_off["buffer"][1], s_plain["buffer"][1])
    assert (y_off[1] - y_on[1]).abs().max() > 1e-3  # refinement does something in the other runs


def test_refine_switched_at_some_steps_step_mode_equals_sequence_mode():
    memory = live(stm()).eval()
    x, is_init = inputs()
    is_init[2, 3] = True
    refine = torch.rand(3, 6, generator=torch.Generator().manual_seed(6)) < 0.5
    refine[:, 4] = False  # a step where no row refines
    with torch.no_grad():
        y_seq, s_seq = memory(x, memory.initial_state(3), is_init, trigger=refine)
        state, ys = memory.initial_state(3), []
        for t in range(6):
            y, state = memory(x[:, t:t + 1], state, is_init[:, t:t + 1], trigger=refine[:, t:t + 1])
            ys.append(y)
        y_all, _ = memory(x, memory.initial_state(3), is_init)
    torch.testing.assert_close(torch.cat(ys, 1), y_seq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["buffer"], s_seq["buffer"], rtol=1e-4, atol=1e-5)
    assert (y_seq - y_all).abs().max() > 1e-3


def test_refinement_changes_the_next_state_only_when_it_persists():
    x, is_init = inputs()
    off = torch.zeros(3, 6, dtype=torch.bool)
    for persist in (False, True):
        memory = live(stm(persist_refinement=persist)).eval()
        with torch.no_grad():
            _, s_on = memory(x, memory.initial_state(3), is_init)
            _, s_off = memory(x, memory.initial_state(3), is_init, trigger=off)
        differs = (s_on["buffer"] - s_off["buffer"]).abs().max() > 1e-3
        assert bool(differs) == persist, persist


def test_persistent_refinement_passes_the_contract():
    # small weights: a persistent refinement is applied 2 x 12 times in a row here, large ones blow up
    check_memory(live(stm(persist_refinement=True), scale=0.05))


def test_diffuser_updates_are_relative_to_the_slot_scale():
    """D(a b) = a D(b) for a > 0: a slot written with a closed gate (tiny) is refined like a large one."""
    memory = live(stm()).double()
    buf = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    for level in (0, 1):
        for a in (0.1, 10.0):
            # up to LayerNorm's eps (1e-5 against a variance of a^2): an update of fixed size would be off by 10x
            torch.testing.assert_close(memory.diffuser(a * buf, level), a * memory.diffuser(buf, level),
                                       rtol=2e-2, atol=1e-3 * a)


def test_the_trigger_must_be_a_bool_tensor_of_shape_b_t():
    memory = stm()
    x, is_init = inputs()
    with pytest.raises(ValueError, match=r"trigger must be a bool tensor of shape \[B, T\]"):
        memory(x, memory.initial_state(3), is_init, trigger=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="trigger must be a bool"):
        memory(x, memory.initial_state(3), is_init, trigger=torch.ones(3, 6))


# -- write gate and Diffuser ---------------------------------------------------------------------------------

def test_slots_keep_most_of_their_content_for_hundreds_of_steps_at_init():
    """With the write's value at zero, a slot is multiplied by (1 - g_k a_k) per step: after 300 steps of
    random inputs the content left equals the product of those factors, and about half of it is left."""
    memory = stm(n_slots=8, n_refine=0).eval()
    with torch.no_grad():
        memory.writer.value.weight.zero_()
        memory.writer.value.bias.zero_()
        T = 300
        x = torch.randn(2, T, D_IN, generator=torch.Generator().manual_seed(7))
        state = memory.initial_state(2).clone()
        state["buffer"] = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(8))  # slots holding content
        buf0 = state["buffer"].clone()
        factor = torch.ones(2, 8, 1)
        buf = buf0
        for t in range(T):  # the retention factors, from the write weights alone
            w = memory.writer.write_weights(buf[:, 1:], memory.encoder(x[:, t]))
            factor = factor * (1 - w)
            buf = torch.cat([buf[:, :1], buf[:, 1:] * (1 - w)], 1)
        _, end = memory(x, state, torch.zeros(2, T, dtype=torch.bool))
    torch.testing.assert_close(end["buffer"][:, 1:], factor * buf0[:, 1:], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(end["buffer"][:, 0], buf0[:, 0])  # the mode slot is not written
    assert factor.min() > 0.3 and factor.mean() > 0.45, factor.flatten()  # ~half left after 300 steps


def test_the_diffuser_starts_as_the_identity_and_iterations_are_conditioned():
    memory = stm()
    buf = torch.randn(4, 4, 8)
    torch.testing.assert_close(memory.diffuser(buf, 0), buf, rtol=0, atol=0)
    live(memory)
    assert (memory.diffuser(buf, 0) - memory.diffuser(buf, 1)).abs().max() > 1e-3


def test_denoising_aux_loss():
    memory = stm(aux_coef=0.5, aux_noise=0.0)
    x, is_init = inputs()
    memory.eval()
    memory(x, memory.initial_state(3), is_init)
    assert memory.aux_loss() is None  # not training
    memory.train()
    with torch.no_grad():
        memory(x, memory.initial_state(3), is_init)
    assert memory.aux_loss() is None  # no autograd
    memory(x, memory.initial_state(3), is_init)
    assert memory.aux_loss().item() == 0.0  # no noise, identity Diffuser: the clean buffer comes back exactly
    noisy = live(stm(aux_coef=0.5, aux_noise=0.5)).train()
    noisy(x, noisy.initial_state(3), is_init)
    aux = noisy.aux_loss()
    assert aux.dim() == 0 and torch.isfinite(aux) and aux > 0
    grads = torch.autograd.grad(aux, [noisy.diffuser.ff[-1].weight, noisy.encoder[0].weight], allow_unused=True)
    assert grads[0].abs().max() > 0
    assert grads[1] is None  # the loss trains the Diffuser only: its inputs and targets are detached
    assert stm(aux_coef=0.0).train().aux_loss() is None


def test_a_copy_of_a_module_after_a_training_forward_is_possible():
    memory = stm(aux_coef=0.1).train()
    x, is_init = inputs()
    memory(x, memory.initial_state(3), is_init)
    assert copy.deepcopy(memory).aux_loss() is None


# -- generator sources and checkpoints ------------------------------------------------------------------------

def test_checkpoint_restores_the_generator_it_was_trained_with():
    a, b = stm(generator_seed=0).eval(), stm(seed=1, generator_seed=1).eval()
    x, is_init = inputs()
    assert not torch.equal(a.generator.layers[0].mlp.up_proj.weight, b.generator.layers[0].mlp.up_proj.weight)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(b(x, b.initial_state(3), is_init)[0], a(x, a.initial_state(3), is_init)[0],
                                   rtol=0, atol=0)


def test_tiny_generator_has_its_own_seed_and_leaves_the_global_rng_alone():
    a, b = stm(seed=0, generator_seed=0), stm(seed=0, generator_seed=5)
    after_a = (stm(seed=0, generator_seed=0), torch.rand(4))[1]
    after_b = (stm(seed=0, generator_seed=5), torch.rand(4))[1]
    assert torch.equal(after_a, after_b)  # the global RNG moved alike whatever the generator's seed
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # trainable weights come from the global seed only
    assert not torch.equal(a.generator.layers[0].self_attn.q_proj.weight, b.generator.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generator_from_a_local_directory(tmp_path, arch):
    lm = tiny_causal_lm(arch, vocab_size=20, hidden_size=16, n_layers=1, n_heads=2, seed=3)
    lm.save_pretrained(tmp_path / "lm")
    memory = stm(generator=str(tmp_path / "lm"))
    assert memory.generator_hidden == 16 and isinstance(memory.to_generator, torch.nn.Linear)  # 8 != 16
    saved = dict(lm.base_model.named_parameters())
    for name, tensor in memory.generator.named_buffers():
        if name in saved:
            assert torch.equal(tensor, saved[name].detach()), name
    check_memory(memory)


def test_tiny_gpt2_generator_passes_the_contract_and_same_width_needs_no_projection():
    memory = stm(generator="tiny-gpt2", d_model=16)
    assert isinstance(memory.to_generator, torch.nn.Identity) and isinstance(memory.from_generator, torch.nn.Identity)
    check_memory(memory)


# -- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_slots": 0}, ValueError, "n_slots must be in"),
    ({"n_refine": -1}, ValueError, "n_refine must be in"),
    ({"d_model": 9}, ValueError, "divisible by n_heads"),
    ({"aux_coef": -1.0}, ValueError, "aux_coef"),
    ({"generator": "/no/such/dir"}, FileNotFoundError, "valid choices: tiny"),
    ({"generator_hidden": 15}, ValueError, "divisible by generator_heads"),
])
def test_bad_knobs_raise_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        stm(**kwargs)


def test_a_directory_without_a_causal_lm_raises_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="does not hold"):
        stm(generator=str(tmp_path / "empty"))
    from transformers import ViTConfig, ViTModel  # an image encoder: a model, but no causal LM

    ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="does not hold a causal LM"):
        stm(generator=str(tmp_path / "vit"))


# -- scripts/stm_fit.py --------------------------------------------------------------------------------------

def run_fit(*overrides, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "stm_fit.py"), *overrides],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_stm_fit_smoke_writes_the_summary_per_k(tmp_path):
    out = tmp_path / "fit"
    proc = run_fit("smoke=true", f"hydra.run.dir={out}", "progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["per_K"], key=int) == ["4", "8"]
    for K, s in summary["per_K"].items():
        for key in ("converged_q", "converged_a", "converged_joint", "decode_both"):
            assert 0.0 <= s[key] <= 1.0, (K, key)
        records = [json.loads(p.read_text()) for p in sorted((out / "examples" / f"K{K}").glob("ex*.json"))]
        assert len(records) == s["examples"] == 2
        assert s["converged_joint"] == sum(r["stages"]["joint"]["converged"] for r in records) / 2
        assert all(r["text"]["q"].startswith("where") for r in records)
        contents = torch.load(out / f"contents_K{K}.pt", weights_only=True)
        assert contents["joint"].shape[:2] == (2, int(K))
    assert "| 4 |" in (out / "summary.md").read_text()
    assert (out / "generator" / "config.json").exists()  # pretrained in the run, reused by a rerun


def test_stm_fit_rejects_a_missing_generator_directory(tmp_path):
    proc = run_fit("smoke=true", f"hydra.run.dir={tmp_path / 'fit'}", "generator=/no/such/dir", "progress_bar=false")
    assert proc.returncode != 0
    assert "no such directory" in proc.stderr
