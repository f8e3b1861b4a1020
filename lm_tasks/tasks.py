"""Synthetic LM tasks: batched, seeded generators in which every target is determined by the input.

A task is a small class holding its knobs (validated when it is built). :meth:`LMTask.sample` draws a
batch with numpy; it is the one place the task's rules live, used by the torch batches of
``scripts/train_lm.py`` (:meth:`LMTask.batch`, :meth:`LMTask.batches`) and by the Gymnasium sequence
envs of ``envs/lm_sequence.py`` (one sample per episode, drawn from the env's own generator).

A batch is three ``[B, T]`` arrays:

- ``inputs``: int64 tokens in ``[0, vocab_size)``;
- ``targets``: int64, the token to output at answer positions and ``IGNORE_INDEX`` (-100) elsewhere, so
  ``torch.nn.functional.cross_entropy`` skips non-answer positions even without the mask;
- ``mask``: bool, True at answer positions.

The model at position ``t`` has seen ``inputs[:, :t + 1]`` and must output ``targets[:, t]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch

from rlmem.envs.core import check_int

IGNORE_INDEX = -100
#: reserved tokens of the tasks that need them (copy_memory, selective_copy, assoc_recall's filler)
BLANK, DELIM = 0, 1


class LMBatch(NamedTuple):
    """``inputs``, ``targets``: int64 ``[B, T]``; ``mask``: bool ``[B, T]`` (True at answer positions)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(*(x.to(device) for x in self))


def sample_without_replacement(rng: np.random.Generator, batch_size: int, population: int, k: int) -> np.ndarray:
    """``[B, k]`` draws from ``range(population)``, distinct within each row, in uniformly random order.

    Same result as ``argsort(u)[:, :k]`` for iid uniforms ``u``; argpartition first keeps it O(population).
    """
    u = rng.random((batch_size, population))
    if k < population:
        idx = np.argpartition(u, k - 1, axis=1)[:, :k]
    else:
        idx = np.tile(np.arange(population), (batch_size, 1))
    order = np.argsort(np.take_along_axis(u, idx, 1), axis=1)
    return np.take_along_axis(idx, order, 1)


class LMTask:
    """Base class. Subclasses set ``name``, define their knobs as ``__init__`` keyword arguments with
    defaults, set ``seq_len``, ``vocab_size`` and ``n_answers`` (answer positions per sample), and
    implement :meth:`sample` and :meth:`chance_accuracy`."""

    name: ClassVar[str]
    seq_len: int
    vocab_size: int
    n_answers: int

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(inputs, targets, mask)``, each ``[batch_size, seq_len]`` (see the module docstring)."""
        raise NotImplementedError

    def chance_accuracy(self) -> float:
        """Answer accuracy of the best guess that ignores every earlier token (a memoryless model)."""
        raise NotImplementedError

    # --- torch side -------------------------------------------------------------------------------
    def batch(self, batch_size: int, rng: np.random.Generator) -> LMBatch:
        """One batch as torch tensors, drawn from ``rng``."""
        check_int("batch_size", batch_size, low=1)
        return LMBatch(*(torch.from_numpy(a) for a in self.sample(rng, batch_size)))

    def batches(self, batch_size: int, seed: int) -> Iterator[LMBatch]:
        """An endless stream of batches, fully determined by ``seed``."""
        rng = np.random.default_rng(seed)
        while True:
            yield self.batch(batch_size, rng)

    def knobs(self) -> dict[str, Any]:
        """The knob values this task was built with (``build_task(task.name, **task.knobs())`` rebuilds it)."""
        return {k: getattr(self, k) for k in knob_names(type(self))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.knobs().items())})"

    def _int(self, name: str, value: Any, low: int | None = None, high: int | None = None, why: str = "") -> int:
        try:
            return check_int(name, value, low, high, why)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None

    def _empty(self, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shape = (batch_size, self.seq_len)
        return np.zeros(shape, np.int64), np.full(shape, IGNORE_INDEX, np.int64), np.zeros(shape, bool)


class CopyMemory(LMTask):
    """Copy a string after a delay.

    ``[s_1 .. s_n] [BLANK x delay] [DELIM] [BLANK x (n - 1)]``, ``T = 2 n + delay``. The answers sit at
    DELIM and the ``n - 1`` blanks after it: ``s_1 .. s_n`` in order. Data tokens are drawn uniformly
    (with replacement) from ``[2, vocab_size)``; 0 is BLANK, 1 is DELIM.
    """

    name = "copy_memory"

    def __init__(self, n_items: int = 5, delay: int = 10, vocab_size: int = 10):
        self.n_items = self._int("n_items", n_items, low=1)
        self.delay = self._int("delay", delay, low=0)
        self.vocab_size = self._int("vocab_size", vocab_size, low=4)  # >= 2 data symbols
        self.seq_len = 2 * self.n_items + self.delay
        self.n_answers = self.n_items

    def sample(self, rng, batch_size):
        n, start = self.n_items, self.n_items + self.delay
        inputs, targets, mask = self._empty(batch_size)
        data = rng.integers(2, self.vocab_size, size=(batch_size, n))
        inputs[:, :n] = data
        inputs[:, start] = DELIM
        targets[:, start:] = data
        mask[:, start:] = True
        return inputs, targets, mask

    def chance_accuracy(self):
        return 1.0 / (self.vocab_size - 2)


class AssocRecall(LMTask):
    """Multi-query associative recall (Zoology's MQAR).

    ``[k_1 v_1 .. k_n v_n] [query region of seq_len - 2 n tokens]``. Keys are drawn WITHOUT replacement
    from ``[1, vocab_size // 2)``, values without replacement from the disjoint ``[vocab_size // 2,
    vocab_size)``. ``n_queries`` distinct keys (default: all ``n``, in random order) are placed at
    distinct uniformly random positions of the query region, every other position there is BLANK (0);
    the answer at a query position is the value paired with that key. (Zoology places queries with a
    power law favouring short gaps and fills the rest with random tokens; the pairing rule is the same.)
    """

    name = "assoc_recall"

    def __init__(self, seq_len: int = 64, n_pairs: int = 8, n_queries: int | None = None, vocab_size: int = 64):
        self.vocab_size = self._int("vocab_size", vocab_size, low=4)
        self.n_keys = self.vocab_size // 2 - 1  # keys [1, V // 2)
        self.n_values = self.vocab_size - self.vocab_size // 2
        self.n_pairs = self._int("n_pairs", n_pairs, low=1, high=min(self.n_keys, self.n_values),
                                 why=f"distinct keys: at most vocab_size // 2 - 1 with vocab_size={self.vocab_size}")
        if n_queries is None:  # every pair is queried: the query region needs n_pairs positions
            self.seq_len = self._int("seq_len", seq_len, low=3 * self.n_pairs,
                                     why=f"at least 3 * n_pairs with n_pairs={self.n_pairs} and n_queries unset "
                                         "(= n_pairs)")
            n_queries = self.n_pairs
        else:
            self.seq_len = self._int("seq_len", seq_len, low=2 * self.n_pairs + 1,
                                     why=f"at least 2 * n_pairs + 1 with n_pairs={self.n_pairs}")
        free = self.seq_len - 2 * self.n_pairs  # positions of the query region
        self.n_queries = self._int("n_queries", n_queries, low=1, high=min(self.n_pairs, free),
                                   why=f"at most n_pairs={self.n_pairs} and seq_len - 2 * n_pairs = {free}")
        self.n_answers = self.n_queries

    def sample(self, rng, batch_size):
        n, q, ctx = self.n_pairs, self.n_queries, 2 * self.n_pairs
        inputs, targets, mask = self._empty(batch_size)
        keys = 1 + sample_without_replacement(rng, batch_size, self.n_keys, n)
        values = self.vocab_size // 2 + sample_without_replacement(rng, batch_size, self.n_values, n)
        inputs[:, 0:ctx:2] = keys
        inputs[:, 1:ctx:2] = values
        which = sample_without_replacement(rng, batch_size, n, q)  # which pairs are queried
        pos = ctx + sample_without_replacement(rng, batch_size, self.seq_len - ctx, q)
        np.put_along_axis(inputs, pos, np.take_along_axis(keys, which, 1), 1)
        np.put_along_axis(targets, pos, np.take_along_axis(values, which, 1), 1)
        np.put_along_axis(mask, pos, True, 1)
        return inputs, targets, mask

    def chance_accuracy(self):
        return 1.0 / self.n_values


class SelectiveCopy(LMTask):
    """Selective copying (Mamba paper): ``n_items`` data tokens scattered among noise, copied in order.

    ``[context of seq_len - n_items tokens] [DELIM] [BLANK x (n_items - 1)]``. The context is BLANK (0,
    the noise token) except at ``n_items`` distinct uniformly random positions holding data tokens drawn
    (with replacement) from ``[2, vocab_size)``; the answers at DELIM and the blanks after it are the
    data tokens in order of position.
    """

    name = "selective_copy"

    def __init__(self, seq_len: int = 64, n_items: int = 8, vocab_size: int = 10):
        self.n_items = self._int("n_items", n_items, low=1)
        self.seq_len = self._int("seq_len", seq_len, low=2 * self.n_items,
                                 why=f"at least 2 * n_items with n_items={self.n_items}")
        self.vocab_size = self._int("vocab_size", vocab_size, low=4)
        self.n_answers = self.n_items

    def sample(self, rng, batch_size):
        n, ctx = self.n_items, self.seq_len - self.n_items
        inputs, targets, mask = self._empty(batch_size)
        pos = np.sort(sample_without_replacement(rng, batch_size, ctx, n), axis=1)
        data = rng.integers(2, self.vocab_size, size=(batch_size, n))
        np.put_along_axis(inputs, pos, data, 1)
        inputs[:, ctx] = DELIM
        targets[:, ctx:] = data
        mask[:, ctx:] = True
        return inputs, targets, mask

    def chance_accuracy(self):
        return 1.0 / (self.vocab_size - 2)


class InductionHead(LMTask):
    """Induction head: ``... trigger successor ... trigger`` -> successor.

    A trigger ``a`` and a successor ``b != a`` are drawn uniformly from the vocabulary; ``a b`` is placed
    at a uniformly random position ``p in [0, seq_len - 3]``, ``a`` again at the last position, and every
    other token is drawn uniformly from the vocabulary without ``a``. So ``a`` occurs exactly once before
    the end, and the one answer (at the last position) is ``b``.
    """

    name = "induction_head"

    def __init__(self, seq_len: int = 64, vocab_size: int = 16):
        self.seq_len = self._int("seq_len", seq_len, low=3)
        self.vocab_size = self._int("vocab_size", vocab_size, low=3)
        self.n_answers = 1

    def sample(self, rng, batch_size):
        V, T = self.vocab_size, self.seq_len
        _, targets, mask = self._empty(batch_size)
        rows = np.arange(batch_size)
        trigger = rng.integers(V, size=batch_size)
        successor = (trigger + rng.integers(1, V, size=batch_size)) % V  # uniform over tokens != trigger
        inputs = rng.integers(V - 1, size=(batch_size, T))
        inputs += inputs >= trigger[:, None]  # uniform over tokens != trigger
        p = rng.integers(T - 2, size=batch_size)
        inputs[rows, p], inputs[rows, p + 1], inputs[:, -1] = trigger, successor, trigger
        targets[:, -1] = successor
        mask[:, -1] = True
        return inputs, targets, mask

    def chance_accuracy(self):
        return 1.0 / (self.vocab_size - 1)


TASKS: dict[str, type[LMTask]] = {c.name: c for c in (CopyMemory, AssocRecall, SelectiveCopy, InductionHead)}


def available_tasks() -> list[str]:
    return sorted(TASKS)


def task_class(name: str) -> type[LMTask]:
    if name not in TASKS:
        raise ValueError(f"unknown LM task {name!r}; valid choices: {', '.join(available_tasks())}")
    return TASKS[name]


def knob_names(cls: type[LMTask]) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def build_task(name: str, **knobs: Any) -> LMTask:
    """Build a task by name; unknown names or knobs raise naming the valid ones."""
    cls = task_class(name)
    unknown = sorted(set(knobs) - set(knob_names(cls)))
    if unknown:
        raise ValueError(f"LM task {name!r} got unknown knobs {unknown}; valid: {knob_names(cls)}")
    return cls(**knobs)
