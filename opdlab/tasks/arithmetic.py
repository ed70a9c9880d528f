"""Multi-step integer arithmetic written out step by step: the embedded math-reasoning task.

Format (prompt, then target)::

    Q:23+45-17=       23+45=68;68-17=51;A:51\n

The prompt is ``Q:`` and an expression of ``n_operands`` non-negative integers joined by ``+``/``-``, then
``=``. The target evaluates it left to right, one ``a op b=c;`` step per operator (each step starts from the
previous result), then ``A:`` and the final value and a newline. A subtrahend never exceeds the running
value, so every intermediate value is non-negative. The steps make each new digit depend on a short, local
computation, which a small character-level transformer learns in minutes; the final answer of a 3-operand
problem is hard to get right without them.

Scoring: the text after the first ``A:`` up to the next newline must be an integer (else malformed) equal to
the value of the expression. The steps themselves are not scored.
"""
from __future__ import annotations

import random

from opdlab.config.checks import is_int
from opdlab.tasks.base import Example, Score, Task, check_option, final_answer, parse_int


class ArithmeticTask(Task):
    """Options: ``n_operands`` (an int, or a ``(lo, hi)`` range drawn uniformly, 2..6; default (2, 3)),
    ``max_value`` (largest operand, 1..9999; default 99), ``ops`` (a non-empty subset of "+-"; default "+-").
    """

    name = "arithmetic"
    alphabet = "".join(sorted(set("0123456789+-=;:QA\n")))

    def __init__(self, n_operands: int | tuple[int, int] = (2, 3), max_value: int = 99, ops: str = "+-"):
        if is_int(n_operands):
            n_operands = (n_operands, n_operands)
        check_option("n_operands", n_operands,
                     isinstance(n_operands, (tuple, list)) and len(n_operands) == 2
                     and all(is_int(k) for k in n_operands) and 2 <= n_operands[0] <= n_operands[1] <= 6,
                     "an int or (lo, hi) with 2 <= lo <= hi <= 6")
        check_option("max_value", max_value, is_int(max_value) and 1 <= max_value <= 9999, "an int in 1..9999")
        check_option("ops", ops, isinstance(ops, str) and len(ops) > 0 and set(ops) <= set("+-"),
                     'a non-empty string of "+" and "-"')
        self.n_operands = (int(n_operands[0]), int(n_operands[1]))
        self.max_value = max_value
        self.ops = "".join(sorted(set(ops)))

    def _generate(self, rng: random.Random) -> Example:
        k = rng.randint(*self.n_operands)
        value = rng.randint(0, self.max_value)
        expression, steps = str(value), []
        for _ in range(k - 1):
            op = rng.choice(self.ops)
            operand = rng.randint(0, min(self.max_value, value) if op == "-" else self.max_value)
            new = value + operand if op == "+" else value - operand
            steps.append(f"{value}{op}{operand}={new};")
            expression += f"{op}{operand}"
            value = new
        answer = str(value)
        return Example(prompt=f"Q:{expression}=", answer=answer,
                       target_segments=(("".join(steps) + f"A:{answer}\n", False),),
                       meta={"n_operands": k})

    def _score(self, example: Example, completion: str) -> Score:
        text = final_answer(completion)
        if text is None:
            return Score(False, True, None, "no final answer 'A:'")
        got = parse_int(text)
        if got is None:
            return Score(False, True, None, f"answer is not an integer: {text[:20]!r}")
        if got == int(example.answer):
            return Score(True, False, None, "correct")
        return Score(False, False, None, f"answer {got}, expected {example.answer}")
