"""Turn any :class:`~rlmem.memory.MemorySystem` into a recurrent TorchRL module.

TorchRL's recurrent conventions (as in ``torchrl.modules.GRUModule``):

- ``is_init`` comes from the env's ``InitTracker`` transform;
- the state is read from ``td[STATE_KEY]`` and written to ``td["next", STATE_KEY]``, so the
  collector's ``step_mdp`` carries it to the next step;
- a ``TensorDictPrimer`` (:meth:`MemoryModule.make_tensordict_primer`) declares the state in the env
  specs, so resets put a state of the right shape in the data. That state is a zero placeholder: the
  memory replaces it by ``initial_state`` wherever ``is_init`` is True, so learned (parameter-dependent)
  initial states work, in acting and in replay, with gradients;
- step mode by default (``td.batch_size == [*B]``, one step per call) and sequence mode under
  ``torchrl.modules.set_recurrent_mode(True)`` (``td.batch_size == [B, T]``): the whole slice is
  replayed from its stored start state ``td[STATE_KEY][:, 0]``, resetting where ``is_init``.

In sequence mode nothing is written to ``("next", STATE_KEY)``: the loss needs outputs, not states.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.data import Composite, Unbounded
from torchrl.envs import TensorDictPrimer
from torchrl.modules import recurrent_mode

from rlmem.memory.base import MemorySystem

STATE_KEY = "memory_state"


class MemoryModule(TensorDictModuleBase):
    """``td[in_key]: [*B, d_in]`` (step) or ``[B, T, d_in]`` (sequence) -> ``td[out_key]`` of ``d_out``."""

    def __init__(self, memory: MemorySystem, in_key: str = "embed", out_key: str = "features"):
        super().__init__()
        self.memory = memory
        self._state_names = list(memory.initial_state(1, "cpu").keys())
        state_keys = [(STATE_KEY, k) for k in self._state_names]
        self.in_keys = [in_key, "is_init", *state_keys]
        self.out_keys = [out_key, *[("next", *k) for k in state_keys]]
        self.in_key, self.out_key = in_key, out_key

    def state_spec(self) -> Composite:
        """Spec of one environment's state (no batch dims): shapes and dtypes of ``initial_state``."""
        with torch.no_grad():  # a learned initial state requires grad; only its layout is wanted here
            example = self.memory.initial_state(1, "cpu").detach()
        return Composite({k: Unbounded(shape=v.shape[1:], dtype=v.dtype) for k, v in example.items()})

    def make_tensordict_primer(self) -> TensorDictPrimer:
        """The env transform that puts a state in every reset (append it after ``InitTracker``).

        The primer writes zeros of the state's shape and dtype, whatever ``initial_state`` is. The real
        initial state comes from the memory itself: every reset row has ``is_init=True`` (InitTracker), and
        the contract makes ``forward`` reset the state to ``initial_state(...)`` there, in step mode while
        acting and in sequence mode during replay (as TorchRL's ``GRUModule`` zeroes its hidden state on
        ``is_init``). A primer ``default_value`` holding ``initial_state`` instead would be wrong for a
        learned initial state: the transform lives with the env (in collector workers, in other
        processes), so its copy would go stale as the parameters train, and values written into the data
        carry no gradient, so the replayed loss would never reach the initial-state parameters.
        """
        return TensorDictPrimer({STATE_KEY: self.state_spec()}, expand_specs=True, default_value=0.0)

    def _state_from(self, td: TensorDictBase, batch: int, device) -> TensorDict:
        if not self._state_names:
            return self.memory.initial_state(batch, device)
        state = td.get(STATE_KEY, None)
        if state is None:
            return self.memory.initial_state(batch, device)
        return state

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        if recurrent_mode():
            return self._forward_sequence(td)
        return self._forward_step(td)

    def _forward_sequence(self, td: TensorDictBase) -> TensorDictBase:
        if td.batch_dims != 2:
            raise ValueError(f"sequence mode needs a [B, T] tensordict, got batch_size={td.batch_size}")
        x = td.get(self.in_key)
        is_init = td.get("is_init").reshape(td.batch_size)
        state = self._state_from(td, x.shape[0], x.device)
        if self._state_names and state.batch_dims == 2:
            state = state[:, 0]
        y, _ = self.memory(x, state, is_init)
        td.set(self.out_key, y)
        return td

    def _forward_step(self, td: TensorDictBase) -> TensorDictBase:
        shape = td.batch_size
        flat = td.reshape(-1) if td.batch_dims != 1 else td
        x = flat.get(self.in_key).unsqueeze(1)
        is_init = flat.get("is_init", None)
        if is_init is None:
            is_init = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        state = self._state_from(flat, x.shape[0], x.device)
        y, next_state, extra = self._step(x, state, is_init.reshape(-1, 1))
        out = TensorDict({self.out_key: y.squeeze(1), **{k: v.squeeze(1) for k, v in extra.items()}},
                         batch_size=flat.batch_size)
        if self._state_names:
            out.set(("next", STATE_KEY), next_state)
        td.update(out.reshape(shape))
        return td

    def _step(self, x: torch.Tensor, state: TensorDict, is_init: torch.Tensor):
        """One acting step: ``x: [N, 1, d_in]`` -> ``(y [N, 1, d_out], next_state, {key: [N, 1]} written beside
        the output)``."""
        y, next_state = self.memory(x, state, is_init)
        return y, next_state, {}
