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

from rlmem.lm_tasks.tasks import (BABI_ACTORS, BABI_DROP_VERBS, BABI_GRAB_VERBS, BABI_ID, BABI_LOCATIONS,
                                  BABI_MOVE_VERBS, BABI_OBJECTS, BLANK, DELIM, AssocRecall, BabiQA, CopyMemory,
                                  InductionHead, LMTask, SelectiveCopy)


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


# --- babi -------------------------------------------------------------------------------------------
_ACTOR = {BABI_ID[w]: w for w in BABI_ACTORS}
_LOCATION = {BABI_ID[w]: w for w in BABI_LOCATIONS}
_OBJECT = {BABI_ID[w]: w for w in BABI_OBJECTS}
_VERB = {**{BABI_ID[w]: "move" for w in BABI_MOVE_VERBS}, **{BABI_ID[w]: "grab" for w in BABI_GRAB_VERBS},
         **{BABI_ID[w]: "drop" for w in BABI_DROP_VERBS}}
_W = BABI_ID  # word -> id


def read_babi(tokens) -> list[tuple]:
    """The facts and questions of a babi token sequence, in order; everything else (filler) is skipped.

    Facts: ``("move", actor, location, pos)``, ``("grab", actor, object, pos)``, ``("drop", actor, object,
    pos)``; questions: ``("where_actor", actor, None, pos)``, ``("where_object", object, None, pos)``,
    ``("where_before", object, location, pos)`` with ``pos`` the index of the ``"?"``. Entities are words
    (``"mary"``, ``"kitchen"``); ``pos`` of a fact is the index of its first token.
    """
    toks = [int(t) for t in tokens]
    out: list[tuple] = []
    for i, tok in enumerate(toks):
        nxt = toks[i + 1 : i + 8]
        if tok in _ACTOR and len(nxt) >= 4 and nxt[3] == _W["."]:
            kind = _VERB.get(nxt[0])
            if kind == "move" and nxt[1] == _W["to"] and nxt[2] in _LOCATION:
                out.append(("move", _ACTOR[tok], _LOCATION[nxt[2]], i))
            elif kind in ("grab", "drop") and nxt[1] == _W["the"] and nxt[2] in _OBJECT:
                out.append((kind, _ACTOR[tok], _OBJECT[nxt[2]], i))
        elif tok == _W["where"]:
            if len(nxt) >= 3 and nxt[0] == _W["is"] and nxt[1] in _ACTOR and nxt[2] == _W["?"]:
                out.append(("where_actor", _ACTOR[nxt[1]], None, i + 3))
            elif len(nxt) >= 4 and nxt[:2] == [_W["is"], _W["the"]] and nxt[2] in _OBJECT and nxt[3] == _W["?"]:
                out.append(("where_object", _OBJECT[nxt[2]], None, i + 4))
            elif (len(nxt) >= 7 and nxt[:2] == [_W["was"], _W["the"]] and nxt[2] in _OBJECT
                  and nxt[3:5] == [_W["before"], _W["the"]] and nxt[5] in _LOCATION and nxt[6] == _W["?"]):
                out.append(("where_before", _OBJECT[nxt[2]], _LOCATION[nxt[5]], i + 7))
    return out


class BabiWorld:
    """The world as told so far, replayed fact by fact with the rules of :class:`BabiQA`.

    ``where_*`` return a location word, or None if the facts do not determine it (or contradict each other:
    a grab of an object held by someone else or lying elsewhere, a grab by an actor whose location is
    unknown, a drop by an actor not holding the object).
    """

    def __init__(self):
        self.actor_at: dict[str, str] = {}
        self.holder: dict[str, str] = {}  # object -> the actor holding it
        self.history: dict[str, list[str]] = {}  # object -> its locations since its first grab
        self.consistent = True

    def tell(self, kind: str, actor: str, what: str) -> None:
        if kind == "move":
            self.actor_at[actor] = what
            for o, h in self.holder.items():
                if h == actor and self.history[o][-1] != what:
                    self.history[o].append(what)
            return
        here = self.actor_at.get(actor)
        if kind == "grab":
            history = self.history.get(what)
            if here is None or what in self.holder or (history and history[-1] != here):
                self.consistent = False
                return
            self.holder[what] = actor
            self.history.setdefault(what, [here])
        elif self.holder.get(what) == actor:  # drop: it lies where the actor is (its history's last entry)
            del self.holder[what]
        else:
            self.consistent = False

    def where_actor(self, actor: str) -> str | None:
        return self.actor_at.get(actor) if self.consistent else None

    def where_object(self, obj: str) -> str | None:
        history = self.history.get(obj)
        return history[-1] if self.consistent and history else None

    def where_before(self, obj: str, location: str) -> str | None:
        """The entry before the last ``location`` in the object's history (None if it has none before)."""
        history = self.history.get(obj, [])
        if not self.consistent or location not in history[1:]:
            return None
        last = len(history) - 1 - history[::-1].index(location)
        return history[last - 1]


def solve_babi(task: BabiQA, inputs: np.ndarray) -> np.ndarray:
    """Replay the facts in order (:class:`BabiWorld`); at each question's ``"?"`` answer from the facts told
    before it, -1 if they do not determine the answer. Filler is skipped: it contains no fact pattern."""
    pred = np.full(inputs.shape, -1, dtype=np.int64)
    for row, p in zip(inputs, pred):
        world = BabiWorld()
        for kind, a, b, pos in read_babi(row):
            if kind in ("move", "grab", "drop"):
                world.tell(kind, a, b)
                continue
            answer = (world.where_actor(a) if kind == "where_actor" else world.where_object(a)
                      if kind == "where_object" else world.where_before(a, b))
            if answer is not None:
                p[pos] = BABI_ID[answer]
    return pred


SOLVERS: dict[str, Callable[[LMTask, np.ndarray], np.ndarray]] = {
    "copy_memory": solve_copy_memory,
    "assoc_recall": solve_assoc_recall,
    "selective_copy": solve_selective_copy,
    "induction_head": solve_induction_head,
    "babi": solve_babi,
}


def solve(task: LMTask, inputs: np.ndarray | torch.Tensor) -> np.ndarray:
    """Predictions ``[B, T]`` of ``task``'s rule-based solver from ``inputs [B, T]`` alone."""
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.cpu().numpy()
    if task.name not in SOLVERS:
        raise ValueError(f"no solver for LM task {task.name!r}; valid choices: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[task.name](task, np.asarray(inputs))
