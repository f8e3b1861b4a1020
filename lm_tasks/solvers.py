"""Plain rule-based solvers: they read only the inputs, never the targets or the mask.

Each solver returns predictions ``[B, T]`` (int64): the answer it deduces at every position where the
input calls for one, and -1 elsewhere and wherever the input does not determine a unique answer. A task
is well-posed iff its solver matches the targets at every answer position (tests/test_lm_tasks.py).
Written as per-row loops on purpose: they should be obviously right, not fast.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from rlmem.lm_tasks.tasks import BLANK, DELIM, AssocRecall, CopyMemory, InductionHead, LMTask, SelectiveCopy


def _recall_after_delim(row: np.ndarray, data: np.ndarray, pred: np.ndarray) -> None:
    """From the (single) DELIM on, write the remembered data tokens in order."""
    delims = np.flatnonzero(row == DELIM)
    if len(delims) == 1:
        d = delims[0]
        n = min(len(data), len(row) - d)
        pred[d : d + n] = data[:n]


def solve_copy_memory(task: CopyMemory, inputs: np.ndarray) -> np.ndarray:
    """The string is the run of data tokens (>= 2) at the start; recall it from DELIM on."""
    pred = np.full(inputs.shape, -1, dtype=np.int64)
    for row, p in zip(inputs, pred):
        end = np.flatnonzero(row < 2)[0] if (row < 2).any() else len(row)
        _recall_after_delim(row, row[:end], p)
    return pred


def solve_selective_copy(task: SelectiveCopy, inputs: np.ndarray) -> np.ndarray:
    """The data are the non-noise tokens before DELIM, in order; recall them from DELIM on."""
    pred = np.full(inputs.shape, -1, dtype=np.int64)
    for row, p in zip(inputs, pred):
        delims = np.flatnonzero(row == DELIM)
        if len(delims) == 1:
            context = row[: delims[0]]
            _recall_after_delim(row, context[context >= 2], p)
    return pred


def solve_assoc_recall(task: AssocRecall, inputs: np.ndarray) -> np.ndarray:
    """Read the ``n_pairs`` (key, value) pairs; answer each later non-blank token with its key's value.

    A key seen twice in the context has no unique value, so it is answered with -1.
    """
    pred = np.full(inputs.shape, -1, dtype=np.int64)
    ctx = 2 * task.n_pairs
    for row, p in zip(inputs, pred):
        table: dict[int, int] = {}
        for k, v in zip(row[0:ctx:2].tolist(), row[1:ctx:2].tolist()):
            table[k] = -1 if k in table else v
        for t in range(ctx, len(row)):
            if row[t] != BLANK:
                p[t] = table.get(int(row[t]), -1)
    return pred


def solve_induction_head(task: InductionHead, inputs: np.ndarray) -> np.ndarray:
    """At the last position, answer with the token that followed the one earlier occurrence of the
    last token; -1 if it occurred zero or several times (then no answer is determined)."""
    pred = np.full(inputs.shape, -1, dtype=np.int64)
    for row, p in zip(inputs, pred):
        earlier = np.flatnonzero(row[:-1] == row[-1])
        if len(earlier) == 1 and earlier[0] < len(row) - 2:  # its successor must not be the query itself
            p[-1] = row[earlier[0] + 1]
    return pred


SOLVERS: dict[str, Callable[[LMTask, np.ndarray], np.ndarray]] = {
    "copy_memory": solve_copy_memory,
    "assoc_recall": solve_assoc_recall,
    "selective_copy": solve_selective_copy,
    "induction_head": solve_induction_head,
}


def solve(task: LMTask, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
    """Predictions ``[B, T]`` of ``task``'s rule-based solver from ``inputs [B, T]`` alone."""
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.cpu().numpy()
    if task.name not in SOLVERS:
        raise ValueError(f"no solver for LM task {task.name!r}; valid choices: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[task.name](task, np.asarray(inputs))
