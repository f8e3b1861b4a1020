"""A user's own memory system, registered on import as "ema"."""

import torch
from tensordict import TensorDict

import rlmem


@rlmem.register_memory("ema")
class EMAMemory(rlmem.MemorySystem):
    """avg <- decay * avg + (1 - decay) * x, reset at episode starts."""

    def __init__(self, d_in, hidden_size=64, decay=0.9):
        super().__init__()
        self.d_in = self.d_out = d_in
        self.decay = decay

    def initial_state(self, batch_size, device=None):
        return TensorDict({"avg": torch.zeros(batch_size, self.d_in, device=device)}, [batch_size])

    def step(self, x, state):
        avg = self.decay * state["avg"] + (1 - self.decay) * x
        return avg, TensorDict({"avg": avg}, state.batch_size)
