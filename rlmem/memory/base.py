"""The one contract every memory system implements.

A memory system is an ``nn.Module`` that carries all of its recurrent state in a
``TensorDict``:

- ``initial_state(batch_size, device) -> TensorDict`` with ``batch_size=[B]``;
- ``forward(x, state, is_init) -> (y, next_state)`` with ``x: [B, T, d_in]``,
  ``is_init: [B, T]`` (True where an episode starts: the state is reset to the
  initial state *before* step t) and ``y: [B, T, d_out]``.

T=1 is the step mode used while acting, T>1 the sequence mode used by the loss;
both must give the same numbers. Systems that only know how to take one step
implement :meth:`MemorySystem.step` and inherit a ``forward`` that loops over
time; systems with a parallel scan override ``forward``.

The initial state may depend on parameters (a learned initial state): wherever
``is_init`` is True the state is replaced by ``initial_state(...)``, in step and in
sequence mode, so it receives gradients through the trainers' replay.

Optional auxiliary losses (load balance, reconstruction, ...) are returned by
:meth:`MemorySystem.aux_loss` for the most recent ``forward`` call; the trainer
adds them to its loss. Optional diagnostics (expert usage, write rates, ...) are
returned by :meth:`MemorySystem.diagnostics`, also for the most recent ``forward``;
both trainers log them to TensorBoard as ``memory/<key>``.

A system with an expensive path that can be switched off per row and step (a deep-tier write, a
coprocessor, a refinement, extra experts) names it in ``trigger_path`` and accepts
``forward(x, state, is_init, trigger=None)`` with ``trigger: [B, T]`` bool: the path runs at step t of
row b only where ``trigger[b, t]``; ``None`` runs it everywhere (the system's behaviour without
triggers). Step mode and sequence mode agree given the same triggers. A system whose path changes the
output ``y_t`` of the step it runs on (not only later steps) sets ``trigger_affects_output = True``. The agents turn such a trigger
into an action (``rlmem.agents.triggers``).
``rlmem.check_memory(memory)`` checks a system against this contract.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torch import nn


class MemorySystem(nn.Module):
    """Base class: state in a TensorDict, step mode == sequence mode.

    Subclasses set ``self.d_in`` and ``self.d_out`` and implement
    :meth:`initial_state` and either :meth:`step` or :meth:`forward`.
    """

    d_in: int
    d_out: int
    #: the expensive path ``forward(..., trigger=[B, T])`` switches per row and step (None: no such path)
    trigger_path: str | None = None
    #: True when the gated path changes the output of the step it runs on (not only later steps): the agent's
    #: critic then reads trigger-independent features, so the value never depends on the step's own trigger
    trigger_affects_output: bool = False

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> TensorDict:
        """The state at an episode start: a TensorDict with ``batch_size=[batch_size]``."""
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: TensorDict) -> tuple[torch.Tensor, TensorDict]:
        """One step without resets. ``x: [B, d_in] -> y: [B, d_out]``."""
        raise NotImplementedError(f"{type(self).__name__} implements neither step() nor forward()")

    def forward(
        self, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor
    ) -> tuple[torch.Tensor, TensorDict]:
        """Run ``T`` steps. ``x: [B, T, d_in]``, ``is_init: [B, T]`` -> ``y: [B, T, d_out]``."""
        check_inputs(self, x, state, is_init)
        init = self.initial_state(x.shape[0], x.device) if is_init.any() else None
        ys = []
        for t in range(x.shape[1]):
            if init is not None:
                state = reset_state(state, init, is_init[:, t])
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, 1), state

    def aux_loss(self) -> torch.Tensor | None:
        """Auxiliary loss of the last ``forward`` call (a scalar), or None if the system has none."""
        return None

    def diagnostics(self) -> dict[str, float]:
        """Numbers about the last ``forward`` call worth logging (``{name: value}``; names may contain
        ``/``): the trainers write each as the TensorBoard scalar ``memory/<name>`` (PPO: the mean over an
        update's minibatch replays; train_lm: every training step). Default: none."""
        return {}

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}"


def reset_state(state: TensorDict, init: TensorDict, reset: torch.Tensor) -> TensorDict:
    """Rows of ``state`` where ``reset: [B]`` is True are replaced by ``init``'s rows."""
    if state.is_empty():
        return state
    return state.apply(
        lambda s, i: torch.where(reset.view(-1, *([1] * (s.dim() - 1))), i, s), init
    )


def check_trigger(memory: MemorySystem, trigger: torch.Tensor | None, is_init: torch.Tensor) -> None:
    """A ``trigger`` must be None or a bool tensor shaped like ``is_init: [B, T]``."""
    if trigger is None:
        return
    if not isinstance(trigger, torch.Tensor) or trigger.dtype != torch.bool or trigger.shape != is_init.shape:
        got = f"{trigger.dtype} {list(trigger.shape)}" if isinstance(trigger, torch.Tensor) else repr(trigger)
        raise ValueError(f"{type(memory).__name__}: trigger must be None or a bool tensor of shape [B, T]="
                         f"{list(is_init.shape)}, got {got}")


def check_inputs(memory: MemorySystem, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor) -> None:
    """Clear errors for the shape mistakes everyone makes once."""
    if x.dim() != 3 or x.shape[-1] != memory.d_in:
        raise ValueError(f"{type(memory).__name__}: expected x of shape [B, T, {memory.d_in}], got {tuple(x.shape)}")
    if tuple(is_init.shape) != tuple(x.shape[:2]):
        raise ValueError(f"is_init must have shape [B, T]={tuple(x.shape[:2])}, got {tuple(is_init.shape)}")
    if not state.is_empty() and state.batch_size[0] != x.shape[0]:
        raise ValueError(f"state batch size {state.batch_size[0]} != input batch size {x.shape[0]}")
