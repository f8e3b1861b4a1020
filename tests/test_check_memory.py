"""``rlmem.check_memory`` catches broken memory systems, each by the check that names its bug, and
passes a correct one written by a user."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tensordict import TensorDict
from torch import nn

import rlmem
from rlmem.memory import CHECKS, MemoryContractError, check_memory

D = 4


class EMA(rlmem.MemorySystem):
    """A user's memory: an exponential moving average with a learned rate per feature.

    State ``{"avg": [B, D]}``, zero at episode start; ``avg_t = a * avg_{t-1} + (1 - a) * x_t``,
    ``y_t = avg_t``. Only :meth:`step` is written; the base class loops over time and resets.
    """

    def __init__(self, d: int = D):
        super().__init__()
        self.d_in = self.d_out = d
        self.decay_logit = nn.Parameter(torch.linspace(-1.0, 2.0, d))

    def initial_state(self, batch_size, device=None):
        return TensorDict({"avg": torch.zeros(batch_size, self.d_out, device=device)}, batch_size=[batch_size])

    def step(self, x, state):
        a = torch.sigmoid(self.decay_logit)
        avg = a * state["avg"] + (1 - a) * x
        return avg, TensorDict({"avg": avg}, batch_size=state.batch_size)


# -- broken variants: each has one bug ------------------------------------------------------------------

class IgnoresIsInit(EMA):
    """Never resets: the next episode starts from the previous one's average."""

    def forward(self, x, state, is_init):
        ys = []
        for t in range(x.shape[1]):
            y, state = self.step(x[:, t], state)
            ys.append(y)
        return torch.stack(ys, 1), state


class StepModeIgnoresIsInit(EMA):
    """The one-step (acting) path forgets the reset; sequence mode resets correctly."""

    def forward(self, x, state, is_init):
        return super().forward(x, state, is_init if x.shape[1] > 1 else torch.zeros_like(is_init))


class CountsStepsInABuffer(EMA):
    """Keeps a step counter in a module buffer (hidden state, though it does not change the outputs)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("steps_seen", torch.zeros(()))

    def forward(self, x, state, is_init):
        self.steps_seen += x.shape[1]
        return super().forward(x, state, is_init)


class CountsCallsInAnAttribute(EMA):
    """A Python-attribute counter that leaks into the outputs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, state, is_init):
        self.calls += 1
        y, state = super().forward(x, state, is_init)
        return y + 0.01 * self.calls, state


class MixesBatchRows(EMA):
    """Adds the batch mean: rows see each other."""

    def forward(self, x, state, is_init):
        y, state = super().forward(x, state, is_init)
        return y + x.mean(0, keepdim=True), state


class DetachesItsState(EMA):
    """Truncates backpropagation at every step: no gradient flows through the state."""

    def step(self, x, state):
        y, state = super().step(x, state)
        return y, state.detach()


class SequenceModeMissesInnerResets(EMA):
    """A sequence-mode 'fast path' that resets only at t=0 (step mode resets correctly)."""

    def forward(self, x, state, is_init):
        if x.shape[1] == 1:
            return super().forward(x, state, is_init)
        first = torch.zeros_like(is_init)
        first[:, 0] = is_init[:, 0]
        return super().forward(x, state, first)


class NonFiniteOutput(EMA):
    def step(self, x, state):
        y, state = super().step(x, state)
        return torch.log(y), state  # NaN wherever the average is negative


class ModifiesItsInputState(EMA):
    """Updates the state tensors it was given in place (a stored rollout state would change)."""

    def step(self, x, state):
        a = torch.sigmoid(self.decay_logit)
        state["avg"].mul_(a).add_((1 - a) * x)
        return state["avg"].clone(), state


class NoisyInEvalMode(EMA):
    def step(self, x, state):
        y, state = super().step(x, state)
        return y + 1e-3 * torch.randn_like(y), state


class EmptyStateSeesThePast(rlmem.MemorySystem):
    """Declares no state but mixes neighbouring steps of a sequence (a causal conv with no buffer)."""

    def __init__(self):
        super().__init__()
        self.d_in = self.d_out = D
        self.mix = nn.Parameter(torch.tensor(0.5))

    def initial_state(self, batch_size, device=None):
        return TensorDict({}, batch_size=[batch_size], device=device)

    def forward(self, x, state, is_init):
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        return x + self.mix * previous, state


@dataclasses.dataclass
class Config:
    rate: float = 0.5


class PicklesItsConfig(EMA):
    """Puts a Python object into its state_dict: ``torch.load(weights_only=True)`` refuses it."""

    def get_extra_state(self):
        return Config()

    def set_extra_state(self, state):
        self.config = state


# -- the tests --------------------------------------------------------------------------------------------

def test_a_correct_user_memory_passes_every_check():
    check_memory(EMA())
    check_memory(EMA(), batch_size=2, steps=5, seed=3)


@pytest.mark.parametrize(
    "memory, check, detail",
    [
        (IgnoresIsInit(), "reset_equals_fresh_state", "is_init=True at t=0 of a call with T steps on a used state"),
        (CountsStepsInABuffer(), "state_in_tensordict", "buffer 'steps_seen'"),
        (MixesBatchRows(), "batch_rows_independent", "other rows"),
        (DetachesItsState(), "gradients_through_state", "x\\[:, 0\\]"),
        (SequenceModeMissesInnerResets(), "step_equals_sequence", "first at row 0, step 5"),
        (NonFiniteOutput(), "step_equals_sequence", "not finite"),
        (ModifiesItsInputState(), "state_in_tensordict", "modified its input state in place"),
        (PicklesItsConfig(), "state_dict_round_trip", "UnpicklingError|weights_only"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_a_broken_memory_fails_the_check_that_names_its_bug(memory, check, detail):
    """All checks run in order; the first to fail is the one about the bug."""
    with pytest.raises(MemoryContractError, match=detail) as info:
        check_memory(memory)
    message = str(info.value)
    assert info.value.check == check
    assert type(memory).__name__ in message and repr(check) in message


@pytest.mark.parametrize(
    "memory, check, detail",
    [
        (CountsCallsInAnAttribute(), "state_in_tensordict", "a second call"),
        (NoisyInEvalMode(), "deterministic", "twice"),
        (EmptyStateSeesThePast(), "gradients_through_state", "the state is empty"),
        (StepModeIgnoresIsInit(), "reset_equals_fresh_state", "is_init=True at t=0 of a call with T=1"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else None,
)
def test_each_check_catches_its_bug_on_its_own(memory, check, detail):
    """Bugs that an earlier check also trips over are caught by their own check when it runs alone."""
    with pytest.raises(MemoryContractError, match=detail) as info:
        check_memory(memory, checks=[check])
    assert info.value.check == check and check in str(info.value)
    with pytest.raises(MemoryContractError):  # and by the full run, whichever check comes first
        check_memory(memory)


def test_errors_say_what_differed():
    with pytest.raises(MemoryContractError) as info:
        check_memory(SequenceModeMissesInnerResets(), checks=["step_equals_sequence"])
    message = str(info.value)
    assert "SequenceModeMissesInnerResets fails check 'step_equals_sequence'" in message
    assert "max abs difference" in message and "step 5" in message and "rtol=0.0001" in message
    assert isinstance(info.value, AssertionError)


def test_registered_memories_are_named_by_their_registry_name():
    memory = rlmem.build_memory("gru", d_in=D, hidden_size=8)
    with torch.no_grad():
        memory.rnn.weight_hh_l0.fill_(float("nan"))
    with pytest.raises(MemoryContractError, match="GRUMemory \\(registered as 'gru'\\).*not finite"):
        check_memory(memory, checks=["step_equals_sequence"])


def test_unknown_check_names_raise_naming_the_valid_ones():
    with pytest.raises(ValueError, match="no_such_check") as info:
        check_memory(EMA(), checks=["step_equals_sequence", "no_such_check"])
    for name in CHECKS:
        assert name in str(info.value)


def test_the_checker_leaves_mode_rng_and_grads_as_they_were():
    memory = EMA()
    memory.train()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    check_memory(memory)
    assert torch.equal(torch.rand(3), expected)
    assert memory.training and all(p.grad is None for p in memory.parameters())
    memory.eval()
    check_memory(memory, checks=["gradients_through_state"])
    assert not memory.training


def test_every_check_is_callable_by_name_and_too_small_inputs_are_refused():
    for name in CHECKS:
        check_memory(EMA(), checks=[name])
    check_memory(EMA(), checks="deterministic")
    with pytest.raises(ValueError, match="batch_size"):
        check_memory(EMA(), batch_size=1)
    with pytest.raises(ValueError, match="steps"):
        check_memory(EMA(), steps=3)


def test_a_passing_check_returns_a_report_and_prints_one_line_per_check(capsys):
    """A passing run is not silent: it returns what ran and what was compared, and says so."""
    report = check_memory(EMA())
    assert report is not None and report.passed
    assert [r.name for r in report.results] == list(CHECKS)
    by_name = {r.name: r for r in report.results}
    for name in CHECKS:
        assert by_name[name].passed and report[name] is by_name[name]
    step = report["step_equals_sequence"]
    assert step.comparisons and all(c.max_abs_diff <= 1e-5 for c in step.comparisons)
    assert any("step mode" in c.what for c in step.comparisons)
    assert step.max_abs_diff == max(c.max_abs_diff for c in step.comparisons)
    assert report["deterministic"].max_abs_diff == 0.0
    assert report["gradients_through_state"].notes  # the gradient numbers it compared
    assert "no trigger_path" in report["triggers"].notes[0]
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(CHECKS)
    for line, name in zip(lines, CHECKS, strict=True):
        assert name in line and "passed" in line and "EMA" in line
    assert "max abs difference" in lines[0]
    assert "EMA" in str(report) and "step_equals_sequence" in str(report)
    one = check_memory(EMA(), checks="deterministic", verbose=False)
    assert [r.name for r in one.results] == ["deterministic"] and capsys.readouterr().out == ""
