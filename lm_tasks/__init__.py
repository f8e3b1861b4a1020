"""Synthetic LM tasks (copy, multi-query associative recall, selective copy, induction head, bAbI-style reasoning).

- :mod:`rlmem.lm_tasks.tasks`: batched seeded generators and the task registry (``build_task("assoc_recall", ...)``);
- :mod:`rlmem.lm_tasks.solvers`: plain rule-based solvers that prove every target is determined by the input;
The same tasks are Gymnasium sequence envs in :mod:`rlmem.envs.lm_sequence` (``rlmem/CopyMemory-v0``, ...) and
the data of supervised training (:mod:`rlmem.lm_training`). This package holds data only: nothing of training.
"""

from rlmem.lm_tasks.solvers import solve
from rlmem.lm_tasks.tasks import IGNORE_INDEX, TASKS, LMBatch, LMTask, available_tasks, build_task

__all__ = ["IGNORE_INDEX", "TASKS", "LMBatch", "LMTask", "available_tasks", "build_task", "solve"]
