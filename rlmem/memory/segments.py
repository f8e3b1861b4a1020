"""Run a library RNN (``nn.GRU``/``nn.LSTM``) over sequences with resets inside them.

``nn.GRU`` cannot reset its state mid-sequence, so ``[B, T]`` rows are cut at every ``is_init`` into
episode segments, packed into a padded ``[S, L_max]`` batch that one library call runs (its time loop
is in C++), and scattered back. The batch is packed with each segment's true length, so the final
states the RNN returns are those after each segment's last real step. This is what TorchRL's ``GRUModule`` does with
``_split_and_pad_for_reset``; ours works on plain tensors so the memory contract stays tensor-in /
tensor-out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segments:
    """Where each ``(b, t)`` of a ``[B, T]`` batch lands in the padded ``[S, L_max]`` segment batch."""

    seg: torch.Tensor  # [B, T] segment index of each step
    pos: torch.Tensor  # [B, T] position of each step inside its segment
    first: torch.Tensor  # [B] segment index of each row's first step
    last: torch.Tensor  # [B] segment index of each row's last step
    carries: torch.Tensor  # [B] True where the row's first segment continues the given state
    lengths: torch.Tensor  # [S] number of real steps in each segment (on CPU, as packing wants)
    num: int  # S
    length: int  # L_max

    @classmethod
    def from_is_init(cls, is_init: torch.Tensor) -> Segments:
        B, T = is_init.shape
        start = is_init.clone()
        start[:, 0] = True
        seg = start.reshape(-1).cumsum(0).reshape(B, T) - 1
        steps = torch.arange(T, device=is_init.device).expand(B, T)
        start_t = torch.where(start, steps, torch.zeros_like(steps)).cummax(1).values
        pos = steps - start_t
        num = int(seg[-1, -1]) + 1
        lengths = torch.bincount(seg.reshape(-1), minlength=num).cpu()
        return cls(seg, pos, seg[:, 0], seg[:, -1], ~is_init[:, 0], lengths, num, int(lengths.max()))

    def run(self, rnn: torch.nn.RNNBase, x: torch.Tensor, hx):
        """Run a batch-first ``rnn`` over the segments of ``x: [B, T, D]`` from per-segment start states
        ``hx`` (``[S, H]``, or a tuple for LSTM); returns ``(y_seg [S, L_max, H], final per-segment states)``."""
        packed = torch.nn.utils.rnn.pack_padded_sequence(self.pad(x), self.lengths, batch_first=True,
                                                         enforce_sorted=False)
        hx = tuple(h.unsqueeze(0) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(0)
        y, h_n = rnn(packed, hx)
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=self.length)
        h_n = tuple(h.squeeze(0) for h in h_n) if isinstance(h_n, tuple) else h_n.squeeze(0)
        return y, h_n

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [B, T, D] -> [S, L_max, D]`` (zeros in the padding)."""
        out = x.new_zeros(self.num, self.length, x.shape[-1])
        out[self.seg, self.pos] = x
        return out

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """``y: [S, L_max, D] -> [B, T, D]``."""
        return y[self.seg, self.pos]

    def initial(self, h: torch.Tensor) -> torch.Tensor:
        """Start states ``[S, H]`` of all segments: the row's state ``h: [B, H]`` for a row's first segment
        when it continues an episode, zeros for every segment that starts an episode."""
        h0 = h.new_zeros(self.num, h.shape[-1])
        return h0.index_put((self.first,), h * self.carries.unsqueeze(-1).to(h.dtype))

    def final(self, h_seg: torch.Tensor) -> torch.Tensor:
        """Final states ``[B, H]`` of the rows from the segments' final states ``h_seg: [S, H]``."""
        return h_seg[self.last]
