"""What a memory's gated path costs, and charging it to the reward.

- :func:`measure_path_flops`: FLOPs of one acting step of a memory with its gated path on and off,
  counted once with ``torch.utils.flop_counter.FlopCounterMode`` (it counts matrix products, convolutions
  and attention: the work that scales with model size; elementwise ops are not counted);
- :class:`TriggerCost`: a TorchRL transform that subtracts ``cost_coef * cost`` from the reward of every
  step whose ``trigger`` fired (``cost`` in MFLOPs per row, so ``cost_coef`` is reward per MFLOP); the env
  itself is untouched, and ``RewardSum``'s episode return placed before it stays the env's own;
- :class:`ComputeMeter`: per-env running FLOP sums across rollouts -> ``compute/*`` numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tensordict import TensorDictBase
from torch.utils.flop_counter import FlopCounterMode
from torchrl.envs import Transform


@dataclass(frozen=True)
class PathCost:
    """FLOPs per acting step of one env row: ``base`` without the gated path, ``path`` added when it fires."""

    base: float
    path: float

    def step_flops(self, fired: torch.Tensor) -> torch.Tensor:
        """``fired: [...]`` bool -> FLOPs of those steps ``[...]`` (float64)."""
        return self.base + self.path * fired.to(torch.float64)


def _count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def measure_path_flops(memory, steps: int = 8, seed: int = 0) -> PathCost:
    """FLOPs of ``steps`` acting steps (``T = 1`` calls, one row, from the initial state) of ``memory`` with
    its trigger all on and all off, per step. ``steps`` covers periodic paths (a coprocessor that runs when a
    segment closes costs its FLOPs spread over the segment's steps). A memory without a gated path
    (``trigger_path`` None) is called without a trigger: its whole cost is ``base``, ``path`` is 0."""
    gated = getattr(memory, "trigger_path", None) is not None
    g = torch.Generator().manual_seed(seed)
    param = next(memory.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    xs = torch.randn(steps, 1, 1, memory.d_in, generator=g).to(dtype)
    was_training = memory.training
    memory.eval()
    # FlopCounterMode's module tracker hooks autograd on module inputs; without parameters that need
    # gradients no such hook is wanted (a parameter passed as a module input otherwise trips it)
    needs_grad = [p for p in memory.parameters() if p.requires_grad]
    for p in needs_grad:
        p.requires_grad_(False)

    def run(fire: bool):
        state = memory.initial_state(1)
        for t in range(steps):
            is_init = torch.tensor([[t == 0]])
            trigger = {"trigger": torch.full((1, 1), fire)} if gated else {}
            _, state = memory(xs[t], state, is_init, **trigger)

    try:
        off = _count_flops(lambda: run(False))
        on = _count_flops(lambda: run(True)) if gated else off
    finally:
        memory.train(was_training)
        for p in needs_grad:
            p.requires_grad_(True)
    return PathCost(base=off / steps, path=max(on - off, 0) / steps)


class TriggerCost(Transform):
    """``next.reward -= cost_coef * cost_mflops * trigger`` (``trigger`` written by the policy into the step's
    input). Append it after ``RewardSum`` so episode returns stay the env's."""

    def __init__(self, cost_coef: float, cost_mflops: float, trigger_key: str = "trigger"):
        super().__init__(in_keys=[], out_keys=[])
        self.full_penalty, self.trigger_key = float(cost_coef) * float(cost_mflops), trigger_key
        self.penalty = self.full_penalty

    def set_scale(self, scale: float) -> None:
        """Charge ``scale`` (0..1) of the cost from now on (the trainer's warm-up)."""
        self.penalty = self.full_penalty * min(max(float(scale), 0.0), 1.0)

    def _step(self, tensordict: TensorDictBase, next_tensordict: TensorDictBase) -> TensorDictBase:
        fired = tensordict.get(self.trigger_key, None)
        if fired is None:
            raise KeyError(f"TriggerCost: the policy wrote no {self.trigger_key!r} into the step's input")
        reward = next_tensordict.get("reward")
        next_tensordict.set("reward", reward - self.penalty * fired.to(reward.dtype).reshape(reward.shape))
        return next_tensordict

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return tensordict_reset


class ComputeMeter:
    """Running FLOPs per env across rollouts: ``update(fired [N, T], done [N, T])`` -> the rollout's
    ``trigger_rate``, ``flops_per_step`` and the FLOPs of the episodes that ended in it."""

    def __init__(self, num_envs: int, cost: PathCost):
        self.cost, self.running = cost, np.zeros(num_envs)

    def update(self, fired: torch.Tensor, done: torch.Tensor) -> dict[str, float | list[float]]:
        flops = self.cost.step_flops(fired).numpy()  # [N, T]
        done = done.numpy()
        ended = []
        for t in range(flops.shape[1]):
            self.running += flops[:, t]
            ended.extend(self.running[done[:, t]].tolist())
            self.running[done[:, t]] = 0.0
        return {"trigger_rate": float(fired.float().mean()), "flops_per_step": float(flops.mean()),
                "episode_flops": ended}

    def state_dict(self) -> dict:
        return {"running": self.running.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.running = np.asarray(state["running"], dtype=np.float64).copy()
