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

from rlmem.validate import check_int

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


# --- bAbI / BABILong-style reasoning ------------------------------------------------------------------
BABI_ACTORS = ("mary", "john", "daniel", "sandra", "bill", "fred", "julie", "jeff")
BABI_LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office", "cellar", "park")
BABI_OBJECTS = ("apple", "football", "milk", "book", "key", "box", "cup", "hat")
BABI_MOVE_VERBS = ("went", "moved", "journeyed", "travelled")
BABI_GRAB_VERBS = ("got", "grabbed", "picked up", "took")  # "picked up" is one token
BABI_DROP_VERBS = ("dropped", "discarded", "put down", "left")
#: filler ("haystack") sentences by length in tokens (period included); "then" (length 1) is used only when
#: a story has exactly one filler token to place. No filler word is used by facts or questions.
BABI_FILLER: dict[int, tuple[tuple[str, ...], ...]] = {}
for _sentence in (
    "silence .", "meanwhile .", "later .",
    "rain fell .", "birds sang .", "time passed .", "nobody spoke .",
    "a dog barked .", "an owl hooted .", "it grew dark .", "rain fell softly .",
    "a cold wind blew .", "an old clock ticked .", "it rained all night .", "birds sang at dawn .",
    "a dog barked far away .", "it grew dark very slowly .", "nobody spoke for an hour .", "rain fell all night long .",
    "an old clock ticked all night .", "a cold wind blew all night .", "rain fell softly on a roof .",
    "somewhere far away a dog barked .",
):
    BABI_FILLER.setdefault(len(_sentence.split()), ())
    BABI_FILLER[len(_sentence.split())] += (tuple(_sentence.split()),)
BABI_FILLER[1] = (("then",),)
assert sorted(BABI_FILLER) == list(range(1, 8))
_FILLER_WORDS = tuple(dict.fromkeys(w for group in BABI_FILLER.values() for s in group for w in s if w != "."))
#: the vocabulary: token id = index. Punctuation, function words, verbs, entities, filler words.
BABI_WORDS: tuple[str, ...] = (
    ".", "?", "to", "the", "where", "is", "was", "before",
    *BABI_MOVE_VERBS, *BABI_GRAB_VERBS, *BABI_DROP_VERBS,
    *BABI_ACTORS, *BABI_LOCATIONS, *BABI_OBJECTS, *_FILLER_WORDS,
)
assert len(set(BABI_WORDS)) == len(BABI_WORDS), "a filler word is also a fact or question word"
BABI_ID: dict[str, int] = {w: i for i, w in enumerate(BABI_WORDS)}


def _ids(words: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(BABI_ID[w] for w in words)


class BabiQA(LMTask):
    """bAbI QA1-QA3 world simulation hidden in filler text (BABILong's recipe), word-level tokens.

    **World.** ``n_actors`` actors, ``n_locations`` locations, ``n_objects`` objects (the first words of
    ``BABI_ACTORS`` / ``BABI_LOCATIONS`` / ``BABI_OBJECTS``). Every actor starts at an unstated location and
    every object lies at an unstated location. A story tells ``n_facts`` events in order, each a 5-token
    sentence (the verb is one of four synonyms, drawn uniformly):

    - move ``"mary went to kitchen ."``: the actor is now in that location, which differs from the one
      it was in (if known); the objects it holds move with it;
    - grab ``"mary got the apple ."``: only if the actor's location is known, nobody holds the object and
      the object lies where the actor is or has never been mentioned (a first grab tells where it was);
    - drop ``"mary dropped the apple ."``: only by the actor holding it; it now lies where the actor is.

    An object's *history* is the list of its locations from its first grab on: its location then, plus
    one entry per move of an actor carrying it (so consecutive entries differ; grabs and drops do not
    change where it is). Questions, one per story, at its end; the answer is a location token:

    - ``hops=1`` ``"where is mary ?"``: the actor's location (1 supporting fact: its last move). Asked
      about an actor that has moved at least once.
    - ``hops=2`` ``"where is the apple ?"``: the object's current location, the last entry of its history
      (2 facts: who holds it, or who dropped it, plus that actor's last move before). Asked about an
      object grabbed at least once.
    - ``hops=3`` ``"where was the apple before the kitchen ?"``: the entry just before the *last* entry
      equal to the kitchen in the object's history (3 facts: the carrier's move to the kitchen, its grab of
      the object, its location before). Asked about an object carried at least twice (a history of >= 3
      entries, so the answer is not always where the object was first picked up) and a location that
      occurs in its history at an index >= 1 (so something precedes it).

    The question's actor / object is drawn uniformly among those satisfying its condition, and for
    ``hops=3`` the location uniformly among the valid ones. These conditions make every question
    answerable from the facts alone, and the rules make the answer unique (rule-based solver:
    :func:`rlmem.lm_tasks.solvers.solve_babi`). To guarantee that a valid question exists, events by an
    actor ``a`` on an object ``o`` are planted at uniformly random fact slots (``CHAINS``): a move of ``a``;
    for hops >= 2 then a grab of ``o`` by ``a``; for hops 3 then two more moves of ``a``. Until the grab no
    other event touches ``o``, and (hops 3) ``a`` does not drop ``o`` before its last planted move; so
    ``n_facts`` is at least 1, 2, 4. Other events are drawn as: move (probability 1/2; a uniform actor to a
    uniform other location), grab (1/4) or drop (1/4), each uniform over the valid (actor, object) pairs,
    a move if there is none.

    **Filler.** The ``seq_len - 5 n_facts - len(question)`` remaining tokens are filler sentences (lengths
    2-7 tokens, from a fixed pool of short sentences, ``BABI_FILLER``, whose words occur nowhere else, so
    they never change the world or mention an actor, location or object; a single leftover token is the
    word ``"then"``), interleaved with the facts uniformly at random (facts keep their order); the question
    closes the sequence. Question lengths: 4, 5, 8 tokens.

    **Answer.** One answer position: the final ``"?"``. Locations are exchangeable in the generator, so
    the answer is uniform over the ``n_locations`` locations and a model that ignores every earlier token
    is right with probability ``1 / n_locations`` (``chance_accuracy``); at ``hops=3`` the answer is never
    the asked location, so a model that reads only the question reaches ``1 / (n_locations - 1)``.

    The vocabulary (``BABI_WORDS``, ``vocab_size`` = its length) is fixed whatever the knobs:
    :meth:`decode` turns token ids back into text.
    """

    name = "babi"
    FACT_LEN = 5
    QUESTION_LEN = {1: 4, 2: 5, 3: 8}
    #: the events planted (by actor ``a`` on object ``o``) so that a valid question exists
    CHAINS = {1: ("move",), 2: ("move", "grab"), 3: ("move", "grab", "move", "move")}

    def __init__(self, hops: int = 1, seq_len: int = 64, n_facts: int = 8, n_actors: int = 4, n_locations: int = 6,
                 n_objects: int = 4):
        self.hops = self._int("hops", hops, low=1, high=3,
                              why="supporting facts per question: 1 = where is an actor, 2 = where is an object, "
                                  "3 = where was an object before a location")
        self.n_actors = self._int("n_actors", n_actors, low=1, high=len(BABI_ACTORS), why="names in the vocabulary")
        self.n_locations = self._int("n_locations", n_locations, low=2, high=len(BABI_LOCATIONS),
                                     why="a move goes to another location; at most the locations in the vocabulary")
        self.n_objects = self._int("n_objects", n_objects, low=1, high=len(BABI_OBJECTS),
                                   why="objects in the vocabulary")
        self.n_facts = self._int("n_facts", n_facts, low=len(self.CHAINS[self.hops]),
                                 why=f"at least {len(self.CHAINS[self.hops])} with hops={self.hops}: "
                                     "the planted events that make the question answerable")
        q = self.QUESTION_LEN[self.hops]
        self.seq_len = self._int("seq_len", seq_len, low=self.FACT_LEN * self.n_facts + q,
                                 why=f"at least 5 * n_facts + {q} with n_facts={self.n_facts} and hops={self.hops}: "
                                     f"5 tokens per fact, {q} for the question")
        self.vocab_size = len(BABI_WORDS)
        self.n_answers = 1

    def chance_accuracy(self):
        return 1.0 / self.n_locations

    @staticmethod
    def decode(tokens: Any) -> str:
        """Token ids (any 1-d sequence or array) as text: ``"mary went to kitchen. where is mary?"``."""
        text = " ".join(BABI_WORDS[int(t)] for t in np.asarray(tokens).reshape(-1))
        return text.replace(" .", ".").replace(" ?", "?")

    def sample(self, rng, batch_size):
        inputs, targets, mask = self._empty(batch_size)
        u = _Uniforms(rng, batch_size * (2 * self.seq_len + 16))
        for i in range(batch_size):
            tokens, answer = self._story(u)
            inputs[i] = tokens
            targets[i, -1] = answer
        mask[:, -1] = True
        return inputs, targets, mask

    # --- one story --------------------------------------------------------------------------------
    def _story(self, u: _Uniforms) -> tuple[list[int], int]:
        A, L, O, n, hops = self.n_actors, self.n_locations, self.n_objects, self.n_facts, self.hops
        actor, location, obj = _ids(BABI_ACTORS), _ids(BABI_LOCATIONS), _ids(BABI_OBJECTS)
        verbs = {"move": _ids(BABI_MOVE_VERBS), "grab": _ids(BABI_GRAB_VERBS), "drop": _ids(BABI_DROP_VERBS)}
        to, the = BABI_ID["to"], BABI_ID["the"]

        def pick(k: int) -> int:
            return int(u() * k)

        def new_location(current: int) -> int:  # uniform over the locations other than ``current``
            if current < 0:
                return pick(L)
            other = pick(L - 1)
            return other + (other >= current)

        loc = [-1] * A  # actor -> its location (-1: not told yet)
        holder = [-1] * O  # object -> the actor holding it (-1: nobody)
        lies = [-1] * O  # object -> where it lies when nobody holds it (-1: never grabbed, unknown)
        history: list[list[int]] = [[] for _ in range(O)]
        a_star, o_star = pick(A), pick(O)
        chain = self.CHAINS[hops]
        done = 0  # chain events placed so far
        facts: list[list[int]] = []
        for t in range(n):
            if done < len(chain) and u() * (n - t) < len(chain) - done:  # chain slots: a uniform subset
                kind = chain[done]
                a, x = (a_star, new_location(loc[a_star])) if kind == "move" else (a_star, o_star)
                done += 1
            else:
                no_grab = o_star if hops >= 2 and done < 2 else -1
                no_drop = o_star if hops == 3 and 2 <= done < 4 else -1
                draw, kind = u(), "move"
                if draw >= 0.5:
                    if draw < 0.75:
                        pairs = [(b, o) for b in range(A) if loc[b] >= 0 for o in range(O)
                                 if o != no_grab and holder[o] < 0 and lies[o] in (-1, loc[b])]
                        kind = "grab"
                    else:
                        pairs = [(holder[o], o) for o in range(O) if holder[o] >= 0 and o != no_drop]
                        kind = "drop"
                    if pairs:
                        a, x = pairs[pick(len(pairs))]
                    else:
                        kind = "move"
                if kind == "move":
                    a = pick(A)
                    x = new_location(loc[a])
            verb = verbs[kind][pick(4)]
            if kind == "move":
                loc[a] = x
                for o in range(O):
                    if holder[o] == a:
                        history[o].append(x)
                facts.append([actor[a], verb, to, location[x], BABI_ID["."]])
            elif kind == "grab":
                if lies[x] < 0:
                    history[x].append(loc[a])
                holder[x], lies[x] = a, -1
                facts.append([actor[a], verb, the, obj[x], BABI_ID["."]])
            else:
                holder[x], lies[x] = -1, loc[a]
                facts.append([actor[a], verb, the, obj[x], BABI_ID["."]])

        where, qmark = BABI_ID["where"], BABI_ID["?"]
        if hops == 1:
            placed = [a for a in range(A) if loc[a] >= 0]
            a = placed[pick(len(placed))]
            question, answer = [where, BABI_ID["is"], actor[a], qmark], loc[a]
        elif hops == 2:
            known = [o for o in range(O) if history[o]]
            o = known[pick(len(known))]
            question = [where, BABI_ID["is"], the, obj[o], qmark]
            answer = loc[holder[o]] if holder[o] >= 0 else lies[o]
        else:
            carried = [o for o in range(O) if len(history[o]) >= 3]
            o = carried[pick(len(carried))]
            places = sorted(set(history[o][1:]))  # their last occurrence has an index >= 1
            x = places[pick(len(places))]
            last = len(history[o]) - 1 - history[o][::-1].index(x)
            question = [where, BABI_ID["was"], the, obj[o], BABI_ID["before"], the, location[x], qmark]
            answer = history[o][last - 1]

        # filler sentences: lengths 2..7 summing to the free tokens (never leaving 1 behind), then shuffled
        # in between the facts
        free = self.seq_len - self.FACT_LEN * n - len(question)
        filler: list[tuple[str, ...]] = []
        while free > 7:
            size = 2 + pick(6)
            size -= free - size == 1
            filler.append(_choice(BABI_FILLER[size], pick))
            free -= size
        if free:
            filler.append(_choice(BABI_FILLER[free], pick))
        tokens: list[int] = []
        f = s = 0
        for slot in range(len(facts) + len(filler)):
            if u() * (len(facts) + len(filler) - slot) < len(facts) - f:
                tokens += facts[f]
                f += 1
            else:
                tokens += _ids(filler[s])
                s += 1
        tokens += question
        return tokens, location[answer]


def _choice(options: tuple, pick) -> Any:
    return options[pick(len(options))]


class _Uniforms:
    """Uniform floats in [0, 1) drawn from ``rng`` in blocks (one numpy call per block, not per draw)."""

    def __init__(self, rng: np.random.Generator, block: int):
        self.rng, self.block = rng, max(int(block), 64)
        self.values: list[float] = []
        self.i = 0

    def __call__(self) -> float:
        if self.i == len(self.values):
            self.values, self.i = self.rng.random(self.block).tolist(), 0
        self.i += 1
        return self.values[self.i - 1]


TASKS: dict[str, type[LMTask]] = {c.name: c for c in (CopyMemory, AssocRecall, SelectiveCopy, InductionHead, BabiQA)}


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
