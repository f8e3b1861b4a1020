"""``check_memory``: the memory contract (rlmem.memory.base) as runnable checks, for any memory system.

The counterpart of Gymnasium's ``check_env``: hand it an instance of any
:class:`~rlmem.memory.MemorySystem`, registered or your own, and it either returns a
:class:`MemoryCheckReport` (the checks run, each passed, what each compared and the largest difference it
saw; one summary line per check is printed unless ``verbose=False``) or raises :class:`MemoryContractError`
naming the memory, the check that failed and what differed::

    >>> import rlmem
    >>> memory = rlmem.build_memory("gru", d_in=8, hidden_size=16)
    >>> report = rlmem.check_memory(memory)                          # every check
    check_memory GRUMemory (registered as 'gru'): step_equals_sequence passed (4 comparisons, max abs difference ...)
    ...
    >>> report["step_equals_sequence"].max_abs_diff                  # the largest difference it compared
    >>> rlmem.check_memory(memory, checks=["step_equals_sequence"])  # one of them

The checks (:data:`CHECKS`, run in this order):

- ``step_equals_sequence``: T calls with T=1 (and two calls of T/2 steps) equal one call with T steps,
  with episode starts inside the sequence, in outputs and final states;
- ``reset_equals_fresh_state``: ``is_init=True`` on a used state gives the outputs of a fresh
  ``initial_state`` (at t=0 of a T-step call and of a T=1 call, and inside a sequence), and returns a
  state that continues like a fresh start's;
- ``batch_rows_independent``: other rows' inputs, states and episode starts do not change row 0, and
  row 0 run alone (batch 1) equals row 0 in the batch;
- ``gradients_through_state``: a random linear readout of ``y[:, 2]`` has gradients on the parameters
  and on ``x[:, 0]``, which reaches ``y[:, 2]`` only through two steps of state (in sequence mode and
  through the states returned by T=1 calls); a system with an empty state must show *no* gradient on
  ``x[:, 0]`` or ``x[:, 1]``;
- ``state_in_tensordict``: forward leaves parameters, buffers and its inputs untouched, gives the same
  outputs when called twice, returns a state with the keys/shapes/dtypes of ``initial_state``, and a
  copy of the module made before any call continues a mid-episode state exactly like the original;
- ``state_dict_round_trip``: the module ``state_dict`` and a mid-episode state saved with ``torch.save``
  and loaded with ``weights_only=True`` into a differently initialised copy continue identically;
- ``deterministic``: the same inputs give bitwise the same numbers twice (seeded *construction* is not
  checked here: the checker gets an instance);
- ``triggers``: for a system with a ``trigger_path``, step mode equals sequence mode given the same random
  ``trigger: [B, T]``, and ``trigger=None`` equals all True.

Inputs come from a seeded ``torch.Generator`` (``x: [B, T, memory.d_in]``, on the device and in the
dtype of the memory's parameters); the global RNG is left as it was. Numeric checks run in ``eval()``
mode without autograd, the gradient check in ``train()`` mode; every submodule's mode is restored
afterwards. Two computation paths (step vs sequence, batch vs alone, a long vs a short sequence) are
compared with ``rtol``/``atol``; one computation against itself (reset vs fresh state, a checkpoint
round trip, a copy, a repeated call) with torch.testing's default tolerances for the dtype;
``deterministic`` with none.
"""

from __future__ import annotations

import contextvars
import copy
import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from dataclasses import field as _field

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

__all__ = ["CHECKS", "CheckResult", "Comparison", "MemoryCheckReport", "MemoryContractError", "check_memory"]

#: A gradient counts as "there" when it is above this fraction of the largest input gradient of the same
#: loss: float32 rounding noise (what the gradient of a sum of LayerNorm outputs is made of) sits near
#: 1e-7 of it, a real path over two steps of state is orders of magnitude above.
GRADIENT_RATIO = 1e-5

# torch.testing.assert_close's defaults: "equal up to rounding" for one computation compared with itself
_DEFAULT_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


class MemoryContractError(AssertionError):
    """A memory system broke the contract; ``check`` names the failed check."""

    def __init__(self, message: str, check: str | None = None):
        super().__init__(message)
        self.check = check


class _Failure(Exception):
    """Raised inside a check; :func:`check_memory` turns it into a :class:`MemoryContractError`."""


@dataclass
class Comparison:
    """One comparison a check made: ``what`` was compared, the largest absolute difference seen, and the
    tolerances it had to stay within (0, 0: exact)."""

    what: str
    max_abs_diff: float
    rtol: float
    atol: float


@dataclass
class CheckResult:
    """One check of a :func:`check_memory` run: its ``name``, whether it ``passed``, the ``comparisons`` it
    made, ``notes`` (other numbers it checked, e.g. gradient sizes, or why it had nothing to do) and
    ``seconds``."""

    name: str
    passed: bool
    comparisons: list[Comparison] = _field(default_factory=list)
    notes: list[str] = _field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float | None:
        """The largest difference over all comparisons (None: the check compared no tensors)."""
        return max((c.max_abs_diff for c in self.comparisons), default=None)

    def summary(self) -> str:
        """One line: the check, passed or failed, how many comparisons and the largest difference, the notes."""
        parts = []
        if self.comparisons:
            n = len(self.comparisons)
            parts.append(f"{n} comparison{'s' if n != 1 else ''}, max abs difference {self.max_abs_diff:.3g}")
        parts.extend(self.notes)
        detail = f" ({'; '.join(parts)})" if parts else ""
        return f"{self.name} {'passed' if self.passed else 'FAILED'}{detail} in {self.seconds:.2f} s"


@dataclass
class MemoryCheckReport:
    """What :func:`check_memory` ran on ``memory`` (its label) and found: one :class:`CheckResult` per check,
    in order; ``report["triggers"]`` is the result of one check by name."""

    memory: str
    results: list[CheckResult] = _field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"check {name!r} was not run; run: {[r.name for r in self.results]}")

    def __str__(self) -> str:
        return "\n".join(f"check_memory {self.memory}: {r.summary()}" for r in self.results)


#: the comparisons and notes of the check that is running (None outside :func:`check_memory`)
_RECORD: contextvars.ContextVar[CheckResult | None] = contextvars.ContextVar("rlmem_check_record", default=None)


def _note(text: str) -> None:
    record = _RECORD.get()
    if record is not None:
        record.notes.append(text)


@dataclass
class CheckSetup:
    """What every check needs: sizes, tolerances, and where inputs live."""

    batch_size: int
    steps: int
    seed: int
    rtol: float
    atol: float
    device: torch.device
    dtype: torch.dtype

    def randn(self, *shape: int, stream: int) -> torch.Tensor:
        """Seeded normal noise; ``stream`` picks an independent draw. Drawn on the CPU so every device
        sees the same numbers."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
        return torch.randn(shape, generator=g).to(self.device, self.dtype)

    @property
    def loose(self) -> dict[str, float]:
        return {"rtol": self.rtol, "atol": self.atol}

    @property
    def tight(self) -> dict[str, float]:
        rtol, atol = _DEFAULT_TOLERANCES.get(self.dtype, (1.3e-6, 1e-5))
        return {"rtol": rtol, "atol": atol}


# -- inputs ---------------------------------------------------------------------------------------------

def _x(memory: nn.Module, s: CheckSetup, stream: int = 1) -> torch.Tensor:
    """``x: [B, T, d_in]``."""
    return s.randn(s.batch_size, s.steps, memory.d_in, stream=stream)


def _starts_only(s: CheckSetup) -> torch.Tensor:
    """``is_init: [B, T]``, True at t=0 only: every row starts an episode."""
    is_init = torch.zeros(s.batch_size, s.steps, dtype=torch.bool, device=s.device)
    is_init[:, 0] = True
    return is_init


def _episode_starts(s: CheckSetup) -> torch.Tensor:
    """``is_init: [B, T]`` with starts inside the sequence: row 0 restarts in the middle, the last row
    runs a one-step episode (two starts in a row), other rows run one episode."""
    is_init = _starts_only(s)
    T = s.steps
    is_init[0, T // 2 - 1] = True
    is_init[-1, T - 3] = is_init[-1, T - 2] = True
    return is_init


def _no_resets(s: CheckSetup) -> torch.Tensor:
    """``is_init: [B, T]``, all False: every row continues the episode of its state."""
    return torch.zeros(s.batch_size, s.steps, dtype=torch.bool, device=s.device)


# -- running and comparing ------------------------------------------------------------------------------

def _initial(memory: nn.Module, batch: int, s: CheckSetup) -> TensorDictBase:
    state = memory.initial_state(batch, s.device)
    if not isinstance(state, TensorDictBase):
        raise _Failure(f"initial_state must return a TensorDict, got {type(state).__name__}")
    if state.batch_size != torch.Size([batch]):
        raise _Failure(f"initial_state({batch}) has batch_size {list(state.batch_size)}, expected [{batch}]")
    return state


def _run(memory: nn.Module, x: torch.Tensor, state: TensorDictBase, is_init: torch.Tensor, **trigger):
    """``forward`` plus the checks every call must pass: ``y: [B, T, d_out]``, finite, a TensorDict state."""
    out = memory(x, state, is_init, **trigger)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise _Failure(f"forward must return (y, next_state), got {type(out).__name__}")
    y, next_state = out
    expected = (x.shape[0], x.shape[1], memory.d_out)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != expected:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise _Failure(f"output y has shape {got}, expected [B, T, d_out] = {list(expected)}")
    if not bool(torch.isfinite(y).all()):
        b, t = (~torch.isfinite(y)).nonzero()[0, :2].tolist()
        raise _Failure(f"output y is not finite (first at row {b}, step {t}: {y[b, t].flatten()[:4].tolist()}...)")
    if not isinstance(next_state, TensorDictBase):
        raise _Failure(f"next_state must be a TensorDict, got {type(next_state).__name__}")
    if not next_state.is_empty() and next_state.batch_size != torch.Size([x.shape[0]]):
        raise _Failure(f"next_state has batch_size {list(next_state.batch_size)}, expected [{x.shape[0]}]")
    return y, next_state


def _compare(actual: torch.Tensor, expected: torch.Tensor, what: str, *, rtol: float, atol: float,
             steps: bool = False) -> None:
    """Raise naming ``what``, the largest difference and the first mismatching row (and step, when the
    second dim is time)."""
    if actual.shape != expected.shape:
        raise _Failure(f"{what}: shapes differ, {list(actual.shape)} vs {list(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise _Failure(f"{what}: dtypes differ, {actual.dtype} vs {expected.dtype}")
    if actual.is_floating_point() or actual.is_complex():
        close = torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    else:
        close = actual == expected
    diff = (actual.double() - expected.double()).abs().nan_to_num(float("inf"))
    # equal NaNs count as equal (equal_nan above), not as an infinite difference
    both_nan = torch.isnan(actual) & torch.isnan(expected) if actual.is_floating_point() else None
    if both_nan is not None:
        diff = diff.masked_fill(both_nan, 0.0)
    if bool(close.all()):
        record = _RECORD.get()
        if record is not None:
            record.comparisons.append(Comparison(what, float(diff.max()) if diff.numel() else 0.0, rtol, atol))
        return
    index = (~close).nonzero()[0].tolist()
    where = f"row {index[0]}" if index else "the value"
    if steps and len(index) > 1:
        where += f", step {index[1]}"
    rest = index[2:] if steps else index[1:]
    if rest:
        where += f", element {rest}"
    raise _Failure(
        f"{what}: max abs difference {diff[~close].max().item():.3g} (rtol={rtol}, atol={atol}), "
        f"{int((~close).sum())} of {close.numel()} values differ; first at {where}: "
        f"{actual[tuple(index)].item():.6g} vs {expected[tuple(index)].item():.6g}"
    )


def _keys(state: TensorDictBase) -> list:
    return sorted(state.keys(include_nested=True, leaves_only=True), key=str)


def _compare_states(actual: TensorDictBase, expected: TensorDictBase, what: str, *, rtol: float,
                    atol: float) -> None:
    if _keys(actual) != _keys(expected):
        raise _Failure(f"{what}: state keys differ, {_keys(actual)} vs {_keys(expected)}")
    for key in _keys(expected):
        _compare(actual[key], expected[key], f"{what}, state key {key!r}", rtol=rtol, atol=atol)


def _compare_layout(state: TensorDictBase, reference: TensorDictBase, what: str) -> None:
    """Same keys, and per key the same shape, dtype and device."""
    if _keys(state) != _keys(reference):
        raise _Failure(f"{what}: state keys {_keys(state)} differ from initial_state's {_keys(reference)}")
    for key in _keys(reference):
        a, r = state[key], reference[key]
        for field in ("shape", "dtype", "device"):
            if getattr(a, field) != getattr(r, field):
                raise _Failure(f"{what}: state key {key!r} has {field} {getattr(a, field)}, initial_state's "
                               f"has {getattr(r, field)}")


# -- the checks -----------------------------------------------------------------------------------------

def check_step_equals_sequence(memory: nn.Module, s: CheckSetup) -> None:
    """T calls with T=1 == two calls of T/2 steps == one call with T steps (outputs and final states)."""
    x, is_init, T = _x(memory, s), _episode_starts(s), s.steps
    init = _initial(memory, s.batch_size, s)
    y_seq, s_seq = _run(memory, x, init, is_init)
    state, ys = init, []
    for t in range(T):
        y, state = _run(memory, x[:, t : t + 1], state, is_init[:, t : t + 1])
        ys.append(y)
    what = "T calls with T=1 (step mode) vs one call with T steps (sequence mode)"
    _compare(torch.cat(ys, 1), y_seq, f"{what}, outputs", steps=True, **s.loose)
    _compare_states(state, s_seq, f"{what}, final state", **s.loose)
    # a replayed slice starts from a state stored in the middle of a sequence
    h = T // 2
    y1, s1 = _run(memory, x[:, :h], init, is_init[:, :h])
    y2, s2 = _run(memory, x[:, h:], s1, is_init[:, h:])
    what = f"two calls (steps 0..{h - 1}, then {h}..{T - 1} from the returned state) vs one call with T steps"
    _compare(torch.cat([y1, y2], 1), y_seq, f"{what}, outputs", steps=True, **s.loose)
    _compare_states(s2, s_seq, f"{what}, final state", **s.loose)


def _compare_continuations(memory: nn.Module, s: CheckSetup, state: TensorDictBase, reference: TensorDictBase,
                           what: str) -> None:
    """Two states are equivalent when they continue alike: the same further inputs (no resets) give the
    same outputs. Unlike comparing the tensors, this lets a system keep masked-out leftovers in its state
    (e.g. cache slots marked invalid) as long as they are never seen."""
    x_next, no_reset = _x(memory, s, stream=5), _no_resets(s)
    y, _ = _run(memory, x_next, state, no_reset)
    y_ref, _ = _run(memory, x_next, reference, no_reset)
    _compare(y, y_ref, f"{what}, outputs of the next {s.steps} steps", steps=True, **s.tight)


def check_reset_equals_fresh_state(memory: nn.Module, s: CheckSetup) -> None:
    """``is_init=True`` replaces a used state by ``initial_state``, at t=0 (in sequence and step mode) and
    inside a sequence: the outputs, and the outputs that follow from the returned state, are a fresh start's."""
    x, starts, no_reset = _x(memory, s), _starts_only(s), _no_resets(s)
    _, used = _run(memory, _x(memory, s, stream=2), _initial(memory, s.batch_size, s), starts)  # has history
    # step mode (acting) has its own code path in many systems: check it with T=1 as well
    for T, how in ((s.steps, "a call with T steps"), (1, "a call with T=1")):
        y_reset, s_reset = _run(memory, x[:, :T], used, starts[:, :T])
        y_fresh, s_fresh = _run(memory, x[:, :T], _initial(memory, s.batch_size, s), no_reset[:, :T])
        what = f"is_init=True at t=0 of {how} on a used state vs a fresh initial_state"
        _compare(y_reset, y_fresh, f"{what}, outputs", steps=True, **s.tight)
        _compare_continuations(memory, s, s_reset, s_fresh, f"{what}, continued")
    k = s.steps // 2
    mid = no_reset.clone()
    mid[:, k] = True
    y_mid, _ = _run(memory, x, used, mid)
    y_new, _ = _run(memory, x[:, k:], _initial(memory, s.batch_size, s), no_reset[:, k:])
    _compare(y_mid[:, k:], y_new, f"is_init=True at step {k} inside a sequence vs a fresh initial_state there, "
             f"outputs (steps counted from {k})", steps=True, **s.loose)


def check_batch_rows_independent(memory: nn.Module, s: CheckSetup) -> None:
    """Row 0 does not see other rows' inputs, states or episode starts, and equals itself run alone."""
    B = s.batch_size
    x, is_init = _x(memory, s), _episode_starts(s)
    init = _initial(memory, B, s)
    y_all, s_all = _run(memory, x, init, is_init)
    # other rows: other inputs (larger), other episode starts, and a used state they continue from
    x2 = x.clone()
    x2[1:] = 3 * s.randn(B - 1, s.steps, memory.d_in, stream=3)
    is_init2 = is_init.clone()
    is_init2[1:] = False
    is_init2[1:, 2::3] = True
    start = init.clone()
    if not start.is_empty():
        _, other = _run(memory, _x(memory, s, stream=2), init, _starts_only(s))
        start[1:] = other[1:]
    y_pert, s_pert = _run(memory, x2, start, is_init2)
    what = "row 0 when the other rows' inputs, states and episode starts change"
    _compare(y_pert[:1], y_all[:1], f"{what}, outputs", steps=True, **s.loose)
    _compare_states(s_pert[:1], s_all[:1], f"{what}, final state", **s.loose)
    y_alone, s_alone = _run(memory, x[:1], _initial(memory, 1, s), is_init[:1])
    what = f"row 0 run alone (batch 1) vs row 0 in a batch of {B}"
    _compare(y_alone, y_all[:1], f"{what}, outputs", steps=True, **s.loose)
    _compare_states(s_alone, s_all[:1], f"{what}, final state", **s.loose)


def _input_gradients(memory: nn.Module, s: CheckSetup, calls: str) -> tuple[torch.Tensor, list]:
    """Gradients of ``(y[:, 2] * w).sum()`` (``w: [B, d_out]`` fixed random) on ``x[:, :3]`` and on the
    trainable parameters. A random readout, not ``y.sum()``: the sum of a LayerNorm/RMSNorm output is
    (nearly) constant, its gradient is rounding noise."""
    params = [p for p in memory.parameters() if p.requires_grad]
    w = s.randn(s.batch_size, memory.d_out, stream=4)
    starts = _starts_only(s)
    x = _x(memory, s)[:, :3].clone().requires_grad_(True)
    state = _initial(memory, s.batch_size, s)
    if calls == "sequence":
        y, _ = _run(memory, x, state, starts[:, :3])
        y2 = y[:, 2]
    else:  # three T=1 calls: the gradient has to pass through the returned state
        for t in range(3):
            y, state = _run(memory, x[:, t : t + 1], state, starts[:, t : t + 1])
        y2 = y[:, 0]
    grads = torch.autograd.grad((y2 * w).sum(), [x, *params], allow_unused=True)
    gx = torch.zeros_like(x) if grads[0] is None else grads[0]
    return gx, [g for g in grads[1:] if g is not None]


def check_gradients_through_state(memory: nn.Module, s: CheckSetup) -> None:
    """Gradients reach the parameters, and x[t=0] through two steps of state (no past input at all for an
    empty state)."""
    has_state = not _initial(memory, 1, s).is_empty()
    with torch.enable_grad():
        for calls in ("sequence", "step") if has_state else ("sequence",):
            gx, param_grads = _input_gradients(memory, s, calls)
            how = "one call with 3 steps" if calls == "sequence" else "three calls with T=1"
            ref = gx.abs().max().item()
            if ref == 0:
                raise _Failure(f"{how}: y[:, 2] has no gradient on any of x[:, :3]: the output ignores its inputs")
            g0 = gx[:, 0].abs().max().item()
            if has_state and not g0 > GRADIENT_RATIO * ref:
                raise _Failure(
                    f"{how}: the gradient of a random readout of y[:, 2] on x[:, 0] is {g0:.3g} (largest on "
                    f"x[:, :3]: {ref:.3g}); x[:, 0] reaches y[:, 2] only through the state, so the state "
                    "does not carry gradients (is it detached?)"
                )
            if has_state:
                _note(f"{how}: |grad x[:, 0]| / largest |grad x[:, :3]| = {g0 / ref:.3g} (must be > {GRADIENT_RATIO:g})")
            past = gx[:, :2].abs().max().item()
            if not has_state and past != 0:
                raise _Failure(f"{how}: the state is empty, yet y[:, 2] has a gradient of {past:.3g} on x[:, :2]: "
                               "the system sees the past through something other than its state")
            if calls == "sequence" and any(p.requires_grad for p in memory.parameters()):
                largest = max((g.abs().max().item() for g in param_grads), default=0.0)
                if not largest > GRADIENT_RATIO * ref:
                    raise _Failure(f"{how}: the gradient of a random readout of y[:, 2] on the parameters is at "
                                   f"most {largest:.3g} (on the inputs: {ref:.3g}): it does not reach them")
                _note(f"largest parameter gradient / largest input gradient = {largest / ref:.3g}")
    if not has_state:
        _note("empty state: no gradient on x[:, :2], as required")


def _snapshot(memory: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {f"parameter {n!r}": p for n, p in memory.named_parameters()}
    tensors.update({f"buffer {n!r}": b for n, b in memory.named_buffers()})
    return {name: t.detach().clone() for name, t in tensors.items()}


def check_state_in_tensordict(memory: nn.Module, s: CheckSetup) -> None:
    """All state is in the TensorDict: nothing in the module or the inputs changes, repeated calls and a
    copy of the module agree, and the returned state has ``initial_state``'s layout."""
    copied = copy.deepcopy(memory)  # before any call of this check: any state hidden in the module is "fresh"
    before = _snapshot(memory)
    B = s.batch_size
    x, is_init = _x(memory, s), _episode_starts(s)
    init = _initial(memory, B, s)
    _, used = _run(memory, _x(memory, s, stream=2), init, _starts_only(s))  # a mid-episode state
    _compare_layout(used, init, "state returned by a call with T steps")
    x_before, used_before, is_init_before = x.clone(), used.clone(), is_init.clone()
    y1, s1 = _run(memory, x, used, is_init)
    _compare(x, x_before, "forward modified its input x in place", rtol=0, atol=0, steps=True)
    _compare(is_init, is_init_before, "forward modified its input is_init in place", rtol=0, atol=0, steps=True)
    _compare_states(used, used_before, "forward modified its input state in place", rtol=0, atol=0)
    # without any reset the state tensors are used as given (no torch.where copy): in-place updates show
    _, s_cont = _run(memory, x, used, _no_resets(s))
    _compare_layout(s_cont, init, "state returned by a call without resets")
    _compare_states(used, used_before, "forward (without resets) modified its input state in place", rtol=0, atol=0)
    _, s_step = _run(memory, x[:, :1], used, _no_resets(s)[:, :1])
    _compare_layout(s_step, init, "state returned by a call with T=1")
    _compare_states(used, used_before, "forward (T=1) modified its input state in place", rtol=0, atol=0)
    y2, s2 = _run(memory, x, used, is_init)
    what = "a second call with the same (x, state, is_init) vs the first"
    _compare(y2, y1, f"{what}, outputs", steps=True, **s.tight)
    _compare_states(s2, s1, f"{what}, final state", **s.tight)
    after = _snapshot(memory)
    for name, value in before.items():
        if name not in after or not torch.equal(after[name], value):
            raise _Failure(f"forward changed the module's {name}: state must live in the TensorDict, "
                           "not in module parameters or buffers")
    y3, s3 = _run(copied, x, used, is_init)
    what = "a copy of the module made before any call, continuing the same mid-episode state, vs the original"
    _compare(y3, y1, f"{what}, outputs", steps=True, **s.tight)
    _compare_states(s3, s1, f"{what}, final state", **s.tight)


def check_state_dict_round_trip(memory: nn.Module, s: CheckSetup) -> None:
    """Weights and a mid-episode state saved through bytes and loaded into another copy continue alike."""
    B = s.batch_size
    x, no_reset = _x(memory, s), _no_resets(s)
    _, state = _run(memory, _x(memory, s, stream=2), _initial(memory, B, s), _starts_only(s))
    buffer = io.BytesIO()
    torch.save({"model": memory.state_dict(), "state": state.to_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    other = copy.deepcopy(memory)
    with torch.no_grad():  # a differently initialised copy: only the loaded weights can make it agree
        for i, p in enumerate(other.parameters()):
            if p.is_floating_point():
                p.add_(s.randn(*p.shape, stream=100 + i).to(p.dtype))
    other.load_state_dict(loaded["model"])
    restored = TensorDict(loaded["state"], batch_size=[B])
    y1, s1 = _run(memory, x, state, no_reset)
    y2, s2 = _run(other, x, restored, no_reset)
    what = ("continuing after torch.save / torch.load(weights_only=True) of state_dict and a mid-episode "
            "state into a differently initialised copy, vs the original")
    _compare(y2, y1, f"{what}, outputs", steps=True, **s.tight)
    _compare_states(s2, s1, f"{what}, final state", **s.tight)


def check_deterministic(memory: nn.Module, s: CheckSetup) -> None:
    """The same inputs give bitwise the same initial state, outputs and states."""
    x, is_init = _x(memory, s), _episode_starts(s)
    init1, init2 = _initial(memory, s.batch_size, s), _initial(memory, s.batch_size, s)
    _compare_states(init2, init1, "initial_state called twice", rtol=0, atol=0)
    for T, how in ((s.steps, "one call with T steps"), (1, "one call with T=1")):
        y1, s1 = _run(memory, x[:, :T], init1, is_init[:, :T])
        y2, s2 = _run(memory, x[:, :T], init2, is_init[:, :T])
        _compare(y2, y1, f"{how}, twice: outputs", rtol=0, atol=0, steps=True)
        _compare_states(s2, s1, f"{how}, twice: final state", rtol=0, atol=0)


#: Every check by name, in the order :func:`check_memory` runs them. Each takes ``(memory, CheckSetup)``.
def check_triggers(memory: nn.Module, s: CheckSetup) -> None:
    """For a system with a ``trigger_path``: given the same random ``trigger: [B, T]``, step mode equals
    sequence mode, and ``trigger=None`` equals all True. Systems without a path pass. (Whether the path
    changes anything is left to the system's own tests: a zero-initialized path does nothing before training.)"""
    if getattr(memory, "trigger_path", None) is None:
        _note("nothing to check: no trigger_path")
        return
    x, is_init, T = _x(memory, s), _episode_starts(s), s.steps
    trigger = s.randn(s.batch_size, T, stream=7) > 0
    init = _initial(memory, s.batch_size, s)
    y_seq, s_seq = _run(memory, x, init, is_init, trigger=trigger)
    state, ys = init, []
    for t in range(T):
        y, state = _run(memory, x[:, t : t + 1], state, is_init[:, t : t + 1], trigger=trigger[:, t : t + 1])
        ys.append(y)
    what = "T calls with T=1 vs one call with T steps, given the same random triggers"
    _compare(torch.cat(ys, 1), y_seq, f"{what}, outputs", steps=True, **s.loose)
    _compare_states(state, s_seq, f"{what}, final state", **s.loose)
    y_none, _ = _run(memory, x, init, is_init)
    y_all, _ = _run(memory, x, init, is_init, trigger=torch.ones_like(trigger))
    _compare(y_all, y_none, "trigger all True vs trigger=None, outputs", steps=True, **s.tight)


CHECKS: dict[str, Callable[[nn.Module, CheckSetup], None]] = {
    "step_equals_sequence": check_step_equals_sequence,
    "reset_equals_fresh_state": check_reset_equals_fresh_state,
    "batch_rows_independent": check_batch_rows_independent,
    "gradients_through_state": check_gradients_through_state,
    "state_in_tensordict": check_state_in_tensordict,
    "state_dict_round_trip": check_state_dict_round_trip,
    "deterministic": check_deterministic,
    "triggers": check_triggers,
}

_TRAIN_MODE_CHECKS = {"gradients_through_state"}


def _label(memory: nn.Module) -> str:
    name = vars(type(memory)).get("registry_name")  # not inherited: a user's subclass of GRUMemory is not "gru"
    return type(memory).__name__ + (f" (registered as {name!r})" if name else "")


def _setup(memory: nn.Module, batch_size: int, steps: int, seed: int, rtol: float, atol: float) -> CheckSetup:
    if not isinstance(memory, nn.Module):
        raise TypeError(f"check_memory needs an nn.Module memory system, got {type(memory).__name__}")
    for attr in ("d_in", "d_out"):
        if not isinstance(getattr(memory, attr, None), int):
            raise MemoryContractError(f"{_label(memory)} needs an integer attribute {attr!r} (the contract: "
                                      "x: [B, T, d_in] -> y: [B, T, d_out])")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (rows are compared with each other), got {batch_size}")
    if steps < 4:
        raise ValueError(f"steps must be >= 4 (resets inside the sequence, gradients over two steps), got {steps}")
    first = next((t for t in (*memory.parameters(), *memory.buffers()) if t.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.get_default_dtype()
    return CheckSetup(batch_size, steps, seed, rtol, atol, device, dtype)


def check_memory(
    memory: nn.Module,
    *,
    batch_size: int = 3,
    steps: int = 12,
    seed: int = 0,
    checks: Iterable[str] | str | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    verbose: bool = True,
) -> MemoryCheckReport:
    """Run the memory contract checks on ``memory``; return a :class:`MemoryCheckReport` or raise
    :class:`MemoryContractError`.

    Args:
        memory: any memory system: ``initial_state(B, device) -> TensorDict`` and
            ``forward(x: [B, T, d_in], state, is_init: [B, T]) -> (y: [B, T, d_out], next_state)``.
        batch_size: ``B`` of the test inputs (>= 2).
        steps: ``T`` of the test inputs (>= 4).
        seed: seed of the inputs (``x``, readout weights, perturbations).
        checks: names from :data:`CHECKS` to run (default: all, in that order); an unknown name raises
            ``ValueError`` listing the valid ones.
        rtol, atol: tolerances between two computation paths (step vs sequence mode, a row alone vs in
            a batch, a reset inside a long sequence vs a short fresh one).
        verbose: print one summary line per check as it passes (the check, how many comparisons, the
            largest difference, the gradient numbers).

    Returns:
        :class:`MemoryCheckReport`: per check its name, ``passed``, the comparisons made (``what``,
        ``max_abs_diff``, tolerances) and notes.

    Raises:
        MemoryContractError: at the first failed check; the message names the memory, the check and
            what differed (largest difference, row, step, state key). Its ``check`` attribute is the name.

    Example::

        >>> import rlmem
        >>> rlmem.check_memory(rlmem.build_memory("lstm", d_in=4, hidden_size=8))
    """
    names = list(CHECKS) if checks is None else [checks] if isinstance(checks, str) else list(checks)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check(s) {unknown}; valid checks: {', '.join(CHECKS)}")
    s = _setup(memory, batch_size, steps, seed, rtol, atol)
    label = _label(memory)
    report = MemoryCheckReport(label)
    for name in names:
        modes = {module: module.training for module in memory.modules()}
        result = CheckResult(name, passed=False)
        token = _RECORD.set(result)
        start = time.perf_counter()
        try:
            # leave the caller's RNG as it was (dropout in train mode draws from it)
            cuda = [s.device.index if s.device.index is not None else torch.cuda.current_device()] \
                if s.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                memory.train(name in _TRAIN_MODE_CHECKS)
                with torch.no_grad():  # the gradient check turns autograd back on for itself
                    CHECKS[name](memory, s)
        except _Failure as failure:
            raise MemoryContractError(f"{label} fails check {name!r}: {failure}", check=name) from None
        except MemoryContractError:
            raise
        except Exception as exc:  # the memory itself raised: still a failed check, with the cause attached
            raise MemoryContractError(f"{label} fails check {name!r}: {type(exc).__name__}: {exc}",
                                      check=name) from exc
        finally:
            _RECORD.reset(token)
            for module, training in modes.items():
                module.training = training
        result.passed, result.seconds = True, time.perf_counter() - start
        report.results.append(result)
        if verbose:
            print(f"check_memory {label}: {result.summary()}", flush=True)
    return report
