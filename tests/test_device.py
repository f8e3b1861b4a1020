"""Training off the CPU (``device=cuda``).

Without a GPU, two checks stand in for it: every memory system and agent computes on the device of its
inputs (run under ``torch.device("meta")``, a tensor made without an explicit device lands on the meta
device and fails when it meets the CPU inputs), and the trainer's GPU layout (an agent that learns, a CPU
copy that acts) gives the run of a single agent exactly. The GPU runs themselves skip without CUDA.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchrl.modules import set_recurrent_mode

from rlmem.agents import build_agent
from rlmem import devices
from rlmem.devices import check_device
from rlmem.memory import available_memories, build_memory, memory_class
from rlmem.ppo import PPOConfig, RecurrentPPO
from test_ppo import SMALL, collect_one

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this machine has none)")
ENV = {"id": "rlmem/DelayedCue-v0", "delay": 3}


@pytest.mark.parametrize("value", ["tpu", "cuda:99", 3, None])
def test_a_device_this_machine_lacks_is_refused_naming_the_valid_ones(value):
    with pytest.raises(ValueError, match=r"is not a device of this machine.*valid: \['cpu'"):
        check_device(value)
    assert check_device("cpu") == torch.device("cpu")


def test_the_meta_device_check_can_fail():
    """The check below catches a tensor made on the default device."""
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="meta"), torch.device("meta"):
        x + torch.zeros(3)


@pytest.mark.parametrize("name", available_memories())
def test_every_memory_computes_on_the_device_of_its_inputs(name):
    memory = build_memory(name, d_in=6, **getattr(memory_class(name), "test_kwargs", {}))
    x = torch.randn(3, 12, 6)
    is_init = torch.zeros(3, 12, dtype=torch.bool)
    is_init[:, 0] = is_init[0, 5] = True
    state = memory.initial_state(3, x.device)
    readout = torch.randn(memory.d_out)
    with torch.device("meta"):
        y, _ = memory(x, state, is_init)  # sequence mode, resets inside
        (y * readout).sum().backward()
        with torch.no_grad():  # step mode
            for t in range(3):
                y_t, state = memory(x[:, t:t + 1], state, is_init[:, t:t + 1])
    assert y.device.type == y_t.device.type == "cpu"


@pytest.mark.parametrize(("memory", "trigger"), [("gru", None), ("infinity", None), ("darmt", "learned"),
                                                  ("darmt", "meco"), ("darmt", "ars")])
def test_the_ppo_replay_computes_on_the_device_of_its_batch(tmp_path, memory, trigger):
    """The agent (encoder, memory, trigger, heads) and TorchRL's PPO loss, forward and backward."""
    agent = build_agent({"memory": memory, "encoder_dim": 16}, ENV, {"policy": trigger} if trigger else None)
    trainer = RecurrentPPO(agent, ENV, PPOConfig(**SMALL), tmp_path)
    data = collect_one(trainer)
    trainer._add_bootstrap_values(data)
    with torch.no_grad():
        trainer.gae(data)
    with torch.device("meta"):
        with set_recurrent_mode(True):
            trainer.agent.backbone(data)
            out = trainer.loss_module(data)
        loss = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
        if agent.aux_loss() is not None:
            loss = loss + agent.aux_loss()
        loss.backward()
    assert all(p.grad is None or p.grad.device.type == "cpu" for p in agent.parameters())


def _separate_acting_copy(monkeypatch):
    """The trainer's GPU layout on the CPU: a copy acts, the original learns."""
    monkeypatch.setattr(RecurrentPPO, "_make_acting_agent", lambda self, agent: copy.deepcopy(agent))


GRU = {"memory": "gru", "encoder_dim": 16, "hidden_size": 16}
INFINITY = {"memory": "infinity", "encoder_dim": 16, "d_model": 16, "mem_slots": 8}


def _train(run_dir, agent_cfg=GRU, trigger=None, **kwargs):
    agent = build_agent(agent_cfg, ENV, {"policy": trigger} if trigger else None, seed=0)
    ppo = PPOConfig(**{**SMALL, "eval_interval": 128})
    trainer = RecurrentPPO(agent, ENV, ppo, run_dir, total_frames=4 * 64, progress_bar=False, **kwargs)
    return trainer, trainer.train()


@pytest.mark.parametrize(("agent_cfg", "trigger"), [(GRU, None), (INFINITY, "meco")], ids=["gru", "infinity-meco"])
def test_an_acting_copy_gives_the_run_of_a_single_agent(tmp_path, monkeypatch, agent_cfg, trigger):
    """Rollouts and evaluations from the acting copy, updates on the learner: the copy takes the weights
    (and a trigger's calibrated thresholds) after every update, so every number is that of one agent."""
    one, one_metrics = _train(tmp_path / "one", agent_cfg, trigger)
    assert one.acting_agent is one.agent
    _separate_acting_copy(monkeypatch)
    two, two_metrics = _train(tmp_path / "two", agent_cfg, trigger)
    assert two.acting_agent is not two.agent
    for key in ("episodic_return", "eval_return", "eval_success"):
        assert two_metrics[key] == one_metrics[key], key
    for (name, a), b in zip(one.agent.state_dict().items(), two.acting_agent.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_a_resumed_run_acts_with_the_checkpointed_weights(tmp_path, monkeypatch):
    _separate_acting_copy(monkeypatch)
    first, _ = _train(tmp_path)
    resumed = RecurrentPPO(build_agent(GRU, ENV), ENV,
                           PPOConfig(**{**SMALL, "eval_interval": 128}), tmp_path, total_frames=8 * 64)
    for (name, a), b in zip(first.agent.state_dict().items(), resumed.acting_agent.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


@NO_CUDA
@pytest.mark.parametrize("script, args", [
    ("train_rl.py", ["agent=infinity", "ppo.num_envs=8", "ppo.rollout_len=16", "ppo.seq_len=8", "ppo.minibatches=2",
                     "ppo.eval_episodes=8", "total_frames=256"]),
    ("train_lm.py", ["model=mamba", "task=assoc_recall", "steps=4", "eval_interval=2", "eval_batches=1"]),
])
def test_training_runs_on_cuda(tmp_path, script, args):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args, "device=cuda",
                          f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["device"] == "cuda"
    assert metrics.get("frames", metrics.get("steps")) == (256 if script == "train_rl.py" else 4)


def test_threads_auto_is_the_free_usable_cores_up_to_a_cap(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert devices.resolve_threads("auto", others_busy=0.0) == 3
    assert devices.resolve_threads("auto", others_busy=0.2) == 3  # a little background work takes no core
    assert devices.resolve_threads("auto", others_busy=1.0) == 2  # another training on one core
    assert devices.resolve_threads("auto", others_busy=2.9) == 1
    assert devices.resolve_threads("auto", others_busy=9.0) == 1  # never below one
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert devices.resolve_threads("auto", others_busy=0.0) == devices.MAX_AUTO_THREADS
    assert devices.resolve_threads(7) == 7
    for bad in (0, -1, 1.5, True, "all"):
        with pytest.raises(ValueError, match="valid: auto or an integer >= 1"):
            devices.resolve_threads(bad)


def test_cpu_load_counts_other_processes_and_not_this_one():
    """Bounds that hold whatever else the machine runs (other test workers included): while this process
    spins, what is counted as others' leaves room for this process's own share of the machine; a child's CPU
    time is counted in full."""
    import psutil  # an independent reading of the machine's CPU times

    def machine_busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + t.steal

    load = devices.CpuLoad()
    cpu0, busy0, t0 = time.process_time(), machine_busy(), time.monotonic()
    while time.monotonic() < t0 + 0.5:  # this process busy
        pass
    others = load.others_busy()
    wall = time.monotonic() - t0
    own_cores, machine_cores = (time.process_time() - cpu0) / wall, (machine_busy() - busy0) / wall
    assert own_cores > 0.2
    assert abs(others - (machine_cores - own_cores)) < 0.15, (others, machine_cores, own_cores)

    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    load.others_busy()
    subprocess.run([sys.executable, "-c", "import time\nt = time.time() + 1.0\nwhile time.time() < t: pass"],
                   check=True)
    seen, elapsed = load.others_busy(), time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert child_cpu > 0.3 and seen * elapsed >= child_cpu - 0.05, (child_cpu, seen * elapsed)


class FakeLoad:
    def __init__(self, readings):
        self.readings = list(readings)

    def others_busy(self):
        return self.readings.pop(0)


def test_thread_governor_follows_other_processes(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        governor = devices.ThreadGovernor(interval=10.0, load=FakeLoad([1.0, 1.0, 0.0]), cores=2)
        t0 = governor._next
        assert governor.update(now=t0 - 1) is None  # not due yet: nothing read
        assert governor.update(now=t0) == 1 and torch.get_num_threads() == 1  # another process took a core
        assert governor.update(now=t0 + 10) is None  # still taken: unchanged
        assert governor.update(now=t0 + 20) == 2 and torch.get_num_threads() == 2  # free again
    finally:
        torch.set_num_threads(before)


def test_threads_auto_runs_are_governed_after_every_iteration(tmp_path, caplog):
    """train_rl with threads=auto attaches the AutoThreads callback; it asks its governor after every
    iteration and logs a change."""
    from hydra import compose, initialize_config_dir

    from rlmem.callbacks import AutoThreads
    from rlmem.commands.train_rl import build_trainer
    from rlmem.conf import CONF_DIR

    overrides = ["env.delay=2", "ppo.num_envs=4", "ppo.rollout_len=8", "ppo.seq_len=8", "ppo.minibatches=1",
                 "total_frames=64", "agent.hidden_size=8", "agent.encoder_dim=8"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        auto = compose("train_rl", overrides=[*overrides, "threads=auto"])
        fixed = compose("train_rl", overrides=[*overrides, "threads=1"])
    before = torch.get_num_threads()
    try:
        trainer = build_trainer(auto, tmp_path / "auto")
        governed = [cb for cb in trainer.run.callbacks.callbacks if isinstance(cb, AutoThreads)]
        assert len(governed) == 1
        assert not any(isinstance(cb, AutoThreads)
                       for cb in build_trainer(fixed, tmp_path / "fixed").run.callbacks.callbacks)

        class Counting:
            calls = 0

            def update(self):
                Counting.calls += 1
                return 1 if Counting.calls == 2 else None

        governed[0].governor = Counting()
        with caplog.at_level("INFO", logger="rlmem.callbacks"):
            trainer.train()
        assert Counting.calls == 64 // 32  # one call per iteration of 4 envs x 8 steps
        assert sum("now 1 torch thread" in r.getMessage() for r in caplog.records) == 1
    finally:
        torch.set_num_threads(before)
