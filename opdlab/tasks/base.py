"""The task interface shared by every benchmark: examples, scores, and batch scoring.

A task hands out :class:`Example` objects (a prompt, the reference answer, and one correct completion split
into model-written and environment-written pieces) and scores any completion string with :class:`Score`.
Scoring a model's completion never raises: whatever a model writes, the worst it gets is ``correct=False,
malformed=True`` with the kind in its reason; a bug in a scorer keeps its traceback.

Splits. Every example is assigned to ``train`` or ``test`` by a hash of its prompt (a fixed fraction, 20% by
default, goes to ``test``), independent of the seed, so the two splits are disjoint for every pair of seeds.
``examples(split, n, seed)`` draws i.i.d. problems from a generator seeded by ``(task, split, seed)`` and
keeps those that hash into the split (a task may stratify, e.g. by tool, so both splits have the same mix);
a list may repeat a problem when the problem space is small.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import pandas as pd

from opdlab.config.checks import is_int
from opdlab.errors import UserError

SPLITS = ("train", "test")
ANSWER_MARK = "A:"
_INT_RE = re.compile(r"-?\d{1,30}")


@dataclass(frozen=True)
class Example:
    """One problem.

    ``prompt`` is what the model is given and ends exactly where the completion begins. ``target_segments``
    is a correct completion as ``(text, is_environment)`` pieces; environment pieces (tool results) are
    written by the harness, not the model, and are masked out of any loss. ``answer`` is the canonical final
    answer and ``meta`` holds task-specific ground truth (e.g. the expected call).
    """

    prompt: str
    answer: str
    target_segments: tuple[tuple[str, bool], ...]
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def target(self) -> str:
        """The full correct completion: the segment texts joined."""
        return "".join(text for text, _ in self.target_segments)


@dataclass(frozen=True)
class Score:
    """How one completion did.

    ``correct``: the final answer is right (always False when ``malformed``). ``malformed``: no answer was
    found, or a call did not parse, named an unknown tool, or had bad argument names/types.
    ``call_correct``: for tool tasks, the first call names the expected function with the expected argument
    values (a BFCL-style AST check); None for tasks without calls. ``reason``: a short explanation.
    """

    correct: bool
    malformed: bool
    call_correct: bool | None
    reason: str


class Task(ABC):
    """Base class: subclasses set the attributes and implement ``_score``; generated tasks implement
    ``_generate``, and tasks with a fixed list of items (BFCL) override ``examples`` instead.

    Attributes: ``name``; ``has_tools`` (the harness must run :meth:`tool_result` whenever generation stops
    at ``call_end``); ``alphabet`` (every character any prompt, target or tool result can contain, sorted,
    for a character-level tokenizer); ``call_end`` (the string that ends a call, or None); ``stop`` (a
    completion is finished once it has a final-answer line ending in this string, see :meth:`finished`);
    ``test_fraction`` (share of the problem space hashed into the test split); ``scores_calls`` (scores
    carry ``call_correct``). Tasks meant for a pretrained model's tokenizer leave ``alphabet`` empty.
    """

    name: str = "task"
    has_tools: bool = False
    scores_calls: bool = False
    alphabet: str = ""
    call_end: str | None = None
    stop: str = "\n"
    test_fraction: float = 0.2
    _warned_pools: frozenset = frozenset()  # splits whose pool a caller asked too much of (said once)

    # -- generation -------------------------------------------------------------------------------------
    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples of ``split`` ("train" or "test"), deterministic in ``seed``."""
        if split not in SPLITS:
            raise UserError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise UserError(f"n must be a non-negative int, got {n!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        return [self._draw(rng, split) for _ in range(n)]

    def _draw(self, rng: random.Random, split: str, generate=None) -> Example:
        """Call ``generate`` (default :meth:`_generate`) until it gives an example of ``split``."""
        generate = generate or self._generate
        for _ in range(10_000):
            example = generate(rng)
            if split_of(example.prompt, self.test_fraction) == split:
                return example
        raise UserError(f"{self.name}: no {split} example in 10000 draws; the problem space is too small "
                         "for these options")

    def _generate(self, rng: random.Random) -> Example:
        """One random example (generated tasks); a task with a fixed item list overrides ``examples``."""
        raise TypeError(f"{type(self).__name__} neither generates examples (_generate) nor overrides examples()")

    # -- scoring ------------------------------------------------------------------------------------------
    def score(self, example: Example, completion: str) -> Score:
        """Score ``completion`` (everything after the prompt, tool results included). Whatever a model writes is
        scored, never raised: each task's ``_score`` catches the parse and execution errors it expects (a call
        that does not parse, an unknown tool, bad arguments, a tool that refuses a value) and says which in
        ``reason``. Anything else is a bug in the scorer and keeps its traceback, rather than passing for a
        malformed completion."""
        if not isinstance(completion, str):
            return Score(False, True, self._no_call(), f"completion is {type(completion).__name__}, not str")
        return self._score(example, completion)

    @abstractmethod
    def _score(self, example: Example, completion: str) -> Score:
        """The task's scoring rule: catch the errors a completion can cause, and only those."""

    def _no_call(self) -> bool | None:
        return False if self.scores_calls else None

    def size(self, split: str) -> int | None:
        """How many distinct examples ``split`` holds: None for generated tasks (unbounded)."""
        return None

    def from_pool(self, pool: list[Example], split: str, n: int, key: str) -> list[Example]:
        """``n`` examples of a fixed ``pool``: a shuffle seeded by ``key``, then, while more are asked for than the
        pool holds, further passes each reshuffled (seeded by ``key`` and the pass), so a training run, an
        evaluation or a completion budget that asks for more than exists cycles instead of failing. Says so
        once per task and split (a UserWarning)."""
        if not is_int(n) or n < 0:
            raise UserError(f"n must be a non-negative int, got {n!r}")
        if not pool:
            raise UserError(f"{self.name}: the {split} split is empty")
        if n > len(pool) and split not in self._warned_pools:
            self._warned_pools = self._warned_pools | {split}
            warnings.warn(f"{self.name}: {n} {split} examples asked of a pool of {len(pool)}; cycling through it "
                          "in reshuffled passes", stacklevel=3)
        out: list[Example] = []
        for p in range(-(-n // len(pool))):
            order = list(pool)
            random.Random(key if p == 0 else f"{key}/pass{p}").shuffle(order)
            out += order
        return out[:n]

    def tool_result(self, completion_so_far: str) -> str | None:
        """Environment text to append if ``completion_so_far`` ends with a complete call; None otherwise."""
        return None

    def finished(self, completion: str) -> bool:
        """True once ``completion`` holds a final-answer line ``A:...`` ended by ``stop``."""
        at = completion.find(ANSWER_MARK)
        return at >= 0 and self.stop in completion[at:]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def split_of(key: str, test_fraction: float = 0.2) -> str:
    """The split a problem belongs to: a stable hash of ``key`` (its prompt), the same for every seed."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") / 2.0**64 < test_fraction else "train"


def final_answer(completion: str, start: int = 0, last: bool = False) -> str | None:
    """The text after the first (or ``last``) ``A:`` at or after ``start``, up to the next newline, stripped;
    None if there is none."""
    at = completion.rfind(ANSWER_MARK, start) if last else completion.find(ANSWER_MARK, start)
    if at < 0:
        return None
    return completion[at + len(ANSWER_MARK):].split("\n", 1)[0].strip()


def parse_int(text: str | None) -> int | None:
    """``text`` as an int if it is exactly an optional minus sign and digits (at most 30), else None."""
    if text is None or not _INT_RE.fullmatch(text):
        return None
    return int(text)


def check_option(name: str, value, ok: bool, expected: str) -> None:
    """Raise a UserError naming the option, its value, and what was expected, unless ``ok``."""
    if not ok:
        raise UserError(f"option {name}={value!r}: expected {expected}")


# -- batch scoring -----------------------------------------------------------------------------------------
def score_batch(task: Task, examples, completions) -> pd.DataFrame:
    """Score ``completions[i]`` against ``examples[i]``: one tidy row per completion.

    Columns: ``index``, ``prompt``, ``answer``, ``completion``, ``correct``, ``malformed``,
    ``call_correct`` (None for tasks without calls), ``reason``.
    """
    examples, completions = list(examples), list(completions)
    if len(examples) != len(completions):
        raise UserError(f"{len(examples)} examples but {len(completions)} completions")
    rows = []
    for i, (example, completion) in enumerate(zip(examples, completions)):
        s = task.score(example, completion)
        rows.append({"index": i, "prompt": example.prompt, "answer": example.answer, "completion": completion,
                     "correct": s.correct, "malformed": s.malformed, "call_correct": s.call_correct,
                     "reason": s.reason})
    columns = ["index", "prompt", "answer", "completion", "correct", "malformed", "call_correct", "reason"]
    return pd.DataFrame(rows, columns=columns)


def malformed_kind(reason: str) -> str:
    """The kind of a malformed completion, from its ``Score.reason``: the text before the first ':' (e.g.
    ``"malformed call"``, ``"no final answer 'A'"``), so that counts group like with like."""
    return reason.split(":", 1)[0].strip()


def summarize(df: pd.DataFrame) -> dict:
    """``n``, ``accuracy``, ``malformed_rate``, ``call_accuracy`` (NaN when no row has a call score) and
    ``malformed_kinds``: how many malformed completions of each kind (``malformed_kind``)."""
    n = len(df)
    if n == 0:
        return {"n": 0, "accuracy": math.nan, "malformed_rate": math.nan, "call_accuracy": math.nan,
                "malformed_kinds": {}}
    calls = df["call_correct"].dropna()
    kinds = df.loc[df["malformed"].astype(bool), "reason"].map(malformed_kind).value_counts()
    return {"n": n, "accuracy": float(df["correct"].astype(float).mean()),
            "malformed_rate": float(df["malformed"].astype(float).mean()),
            "call_accuracy": float(calls.astype(float).mean()) if len(calls) else math.nan,
            "malformed_kinds": {str(k): int(v) for k, v in kinds.items()}}
