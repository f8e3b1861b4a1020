"""The synthetic LM tasks of :mod:`lm_tasks` as Gymnasium sequence envs.

An episode is one sample of the task (``seq_len`` steps), drawn at reset by the task's own numpy
generator (:meth:`rlmem.lm_tasks.tasks.LMTask.sample`) from the env's generator, so the rules live in one
place for supervised training and RL.

- Observation at step t: ``Box(vocab_size + 1)`` float32, the one-hot of token ``inputs[t]`` plus a last
  channel that is 1 at answer positions.
- Action: ``Discrete(vocab_size)``, the predicted token. At answer positions the reward is 1 if it equals
  the target, else 0; elsewhere the action is ignored (but must still be valid) and the reward is 0.
- The episode terminates after its last token.

Optimal return: the number of answer positions per sample (``n_answers``); a uniformly random policy
gets ``n_answers / vocab_size`` in expectation. Knobs are those of the LM task (``vocab_size``,
``seq_len``, ``n_items``, ``n_pairs``, ``n_queries``, ``delay``; for ``BabiQA`` ``hops``, ``seq_len``,
``n_facts``, ``n_actors``, ``n_locations``, ``n_objects``) plus ``difficulty``.

``rlmem/BabiQA-v0`` (bAbI / BABILong-style question answering, :class:`rlmem.lm_tasks.tasks.BabiQA`): a
story of actors moving and picking up / dropping objects, hidden among filler sentences, then a question
closed by ``"?"``, where the action must name a location. Its vocabulary is fixed (87 words), so
``Discrete(87)``: optimal return 1, random policy ``1 / 87``; a policy that names a uniformly random
location at the ``"?"`` gets ``1 / n_locations``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from rlmem.envs.core import MemoryTask, TaskEnv, TaskVectorEnv, resolve_kwargs
from rlmem.lm_tasks.tasks import AssocRecall, BabiQA, CopyMemory, InductionHead, LMTask, SelectiveCopy


class LMSequenceTask(MemoryTask):
    """Batched core shared by the LM sequence envs. Subclasses set ``lm_cls`` and the knob tables."""

    lm_cls: ClassVar[type[LMTask]]

    def __init__(self, num_envs: int = 1, difficulty: str | None = None, **knobs: Any):
        """``knobs``: the keyword arguments of ``lm_cls`` (None = preset or default)."""
        unknown = sorted(set(knobs) - set(self.defaults))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown knobs {unknown}; "
                            f"valid: {sorted(self.defaults)}, difficulty")
        super().__init__(num_envs)
        self.lm = self.lm_cls(**resolve_kwargs(type(self), difficulty, **knobs))
        self.vocab_size, self.episode_length = self.lm.vocab_size, self.lm.seq_len
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(self.vocab_size + 1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(self.vocab_size)
        self._rows = np.arange(num_envs)

    def knob_value(self, name):
        return getattr(self.lm, name)  # the LM task holds the knobs (and derives n_queries's default)

    def sample_episode(self, rng):
        inputs, targets, mask = self.lm.sample(rng, 1)
        return {"inputs": inputs[0], "targets": targets[0], "mask": mask[0]}

    def _current(self, key: str) -> np.ndarray:
        # finished rows stay on their last token (the vector env discards what they return)
        return self.episode[key][self._rows, np.minimum(self.t, self.episode_length - 1)]

    def observe(self):
        obs = np.zeros((self.num_envs, self.vocab_size + 1), dtype=np.float32)
        obs[self._rows, self._current("inputs")] = 1.0
        obs[:, -1] = self._current("mask")
        return obs

    def step(self, action):
        live = self.t < self.episode_length
        reward = (live & self._current("mask") & (action == self._current("targets"))).astype(np.float64)
        terminated = self.t == self.episode_length - 1
        self.t += 1
        return reward, terminated, np.zeros(self.num_envs, dtype=bool)

    def optimal_return(self):
        return float(self.lm.n_answers)

    def chance_return(self):
        return self.lm.n_answers / self.vocab_size

    def oracle_action(self):
        return np.where(self._current("mask"), self._current("targets"), 0).astype(np.int64)


class CopyMemoryTask(LMSequenceTask):
    lm_cls = CopyMemory
    defaults = {"n_items": 3, "delay": 5, "vocab_size": 6}
    presets = {
        "easy": {"n_items": 2, "delay": 2, "vocab_size": 4},
        "medium": {"n_items": 4, "delay": 20, "vocab_size": 6},
        "hard": {"n_items": 8, "delay": 100, "vocab_size": 10},
    }
    test_kwargs = {"n_items": 3, "delay": 4, "vocab_size": 6}
    invalid_kwargs = [{"n_items": 0}, {"delay": -1}, {"vocab_size": 3}]


class AssocRecallTask(LMSequenceTask):
    lm_cls = AssocRecall
    defaults = {"seq_len": 24, "n_pairs": 4, "n_queries": None, "vocab_size": 16}
    presets = {
        "easy": {"seq_len": 12, "n_pairs": 2, "vocab_size": 8},
        "medium": {"seq_len": 32, "n_pairs": 6, "vocab_size": 16},
        "hard": {"seq_len": 128, "n_pairs": 16, "vocab_size": 64},
    }
    test_kwargs = {"seq_len": 16, "n_pairs": 3, "vocab_size": 10}
    invalid_kwargs = [{"n_pairs": 0}, {"seq_len": 4}, {"n_queries": 9}, {"vocab_size": 2}]


class SelectiveCopyTask(LMSequenceTask):
    lm_cls = SelectiveCopy
    defaults = {"seq_len": 16, "n_items": 3, "vocab_size": 6}
    presets = {
        "easy": {"seq_len": 8, "n_items": 2, "vocab_size": 4},
        "medium": {"seq_len": 32, "n_items": 4, "vocab_size": 6},
        "hard": {"seq_len": 128, "n_items": 8, "vocab_size": 10},
    }
    test_kwargs = {"seq_len": 14, "n_items": 3, "vocab_size": 6}
    invalid_kwargs = [{"n_items": 0}, {"seq_len": 5}, {"vocab_size": 3}]


class InductionHeadTask(LMSequenceTask):
    lm_cls = InductionHead
    defaults = {"seq_len": 16, "vocab_size": 8}
    presets = {
        "easy": {"seq_len": 8, "vocab_size": 4},
        "medium": {"seq_len": 32, "vocab_size": 8},
        "hard": {"seq_len": 128, "vocab_size": 16},
    }
    test_kwargs = {"seq_len": 12, "vocab_size": 6}
    invalid_kwargs = [{"seq_len": 2}, {"vocab_size": 2}]


class BabiQATask(LMSequenceTask):
    lm_cls = BabiQA
    defaults = {"hops": 1, "seq_len": 32, "n_facts": 4, "n_actors": 2, "n_locations": 3, "n_objects": 2}
    presets = {
        "easy": {"hops": 1, "seq_len": 24, "n_facts": 3, "n_actors": 2, "n_locations": 3, "n_objects": 2},
        "medium": {"hops": 2, "seq_len": 64, "n_facts": 8, "n_actors": 3, "n_locations": 4, "n_objects": 3},
        "hard": {"hops": 3, "seq_len": 192, "n_facts": 16, "n_actors": 4, "n_locations": 6, "n_objects": 4},
    }
    test_kwargs = {"hops": 3, "seq_len": 32, "n_facts": 4}
    invalid_kwargs = [{"hops": 0}, {"hops": 4}, {"seq_len": 10}, {"n_facts": 0}, {"n_actors": 9},
                      {"n_locations": 1}, {"n_objects": 0}]


class CopyMemoryEnv(TaskEnv):
    task_cls = CopyMemoryTask


class CopyMemoryVectorEnv(TaskVectorEnv):
    task_cls = CopyMemoryTask


class AssocRecallEnv(TaskEnv):
    task_cls = AssocRecallTask


class AssocRecallVectorEnv(TaskVectorEnv):
    task_cls = AssocRecallTask


class SelectiveCopyEnv(TaskEnv):
    task_cls = SelectiveCopyTask


class SelectiveCopyVectorEnv(TaskVectorEnv):
    task_cls = SelectiveCopyTask


class InductionHeadEnv(TaskEnv):
    task_cls = InductionHeadTask


class InductionHeadVectorEnv(TaskVectorEnv):
    task_cls = InductionHeadTask


class BabiQAEnv(TaskEnv):
    task_cls = BabiQATask


class BabiQAVectorEnv(TaskVectorEnv):
    task_cls = BabiQATask
