"""Questions answered by calling a real tool: the embedded tool-use task.

Format (prompt, then the target; the ``<result>`` piece is written by the environment, not the model)::

    Q:3 km in m?      <call>convert(value=3,unit="km",to="m")</call><result>3000</result>A:3000\n

Tools (typed, keyword arguments only):

- ``add(a: integer, b: integer)`` and ``mul(a: integer, b: integer)``: asked as ``Q:23 plus 45?`` and
  ``Q:12 times 7?``;
- ``convert(value: integer, unit: string, to: string)``: km->m, m->cm, kg->g, h->min, min->s, day->h, asked as
  ``Q:3 km in m?``;
- ``capital(country: string)``: a look-up in an embedded table of 108 countries, asked in six phrasings
  (``Q:capital of Peru?``, ``Q:Peru's capital?``, ``Q:Peru: capital?``, ...), so most countries
  appear in both splits and the model has to learn to copy the name rather than memorise whole prompts.

The model writes a call ending in ``</call>`` (:attr:`call_end`); the harness calls :meth:`tool_result`,
which parses the call with ``ast``, checks it against the tool's signature, really runs the tool and returns
``<result>value</result>`` (or ``<result>error: ...</result>`` for a call it cannot run); the model then
writes ``A:`` and the answer and a newline.

Scoring: the first call is checked like BFCL's AST checker (:mod:`opdlab.tasks.calls`): ``call_correct``
when it names the expected tool with exactly the expected argument values. A call that does not parse,
names an unknown tool, or has unknown/missing/mistyped arguments makes the completion malformed, as does a
missing ``A:`` after the call. ``correct`` when the answer after the call equals the reference exactly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from opdlab.config.checks import is_int
from opdlab.tasks.base import Example, Score, Task, check_option, final_answer
from opdlab.tasks.calls import CALL_END, CALL_START, CallError, check_signature, format_call, match_call, parse_call

RESULT_START, RESULT_END = "<result>", "</result>"
MAX_ABS_INT = 10**9

CONVERSIONS = {("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000, ("h", "min"): 60, ("min", "s"): 60,
               ("day", "h"): 24}
CAPITALS = {"France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Norway": "Oslo",
            "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Iceland": "Reykjavik",
            "Laos": "Vientiane", "Poland": "Warsaw", "Greece": "Athens", "Egypt": "Cairo", "Kenya": "Nairobi",
            "Japan": "Tokyo", "China": "Beijing", "India": "Delhi", "Peru": "Lima", "Chile": "Santiago",
            "Canada": "Ottawa", "Cuba": "Havana", "Ireland": "Dublin", "Austria": "Vienna", "Portugal": "Lisbon",
            "Togo": "Lome", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Fiji": "Suva",
            "Russia": "Moscow", "Ghana": "Accra", "Mali": "Bamako", "Syria": "Damascus", "Latvia": "Riga",
            "Qatar": "Doha", "Oman": "Muscat", "Hungary": "Budapest", "Romania": "Bucharest", "Bulgaria": "Sofia",
            "Serbia": "Belgrade", "Croatia": "Zagreb", "Slovakia": "Bratislava", "Estonia": "Tallinn",
            "Lithuania": "Vilnius", "Ukraine": "Kyiv", "Belgium": "Brussels", "Netherlands": "Amsterdam",
            "Switzerland": "Bern", "Albania": "Tirana", "Cyprus": "Nicosia", "Malta": "Valletta", "Morocco": "Rabat",
            "Tunisia": "Tunis", "Algeria": "Algiers", "Libya": "Tripoli", "Sudan": "Khartoum", "Nigeria": "Abuja",
            "Senegal": "Dakar", "Uganda": "Kampala", "Rwanda": "Kigali", "Angola": "Luanda", "Zambia": "Lusaka",
            "Zimbabwe": "Harare", "Namibia": "Windhoek", "Botswana": "Gaborone", "Brazil": "Brasilia",
            "Colombia": "Bogota", "Venezuela": "Caracas", "Ecuador": "Quito", "Uruguay": "Montevideo",
            "Paraguay": "Asuncion", "Jamaica": "Kingston", "Nepal": "Kathmandu", "Bhutan": "Thimphu",
            "Vietnam": "Hanoi", "Thailand": "Bangkok", "Indonesia": "Jakarta", "Philippines": "Manila",
            "Mongolia": "Ulaanbaatar", "Pakistan": "Islamabad", "Afghanistan": "Kabul", "Jordan": "Amman",
            "Lebanon": "Beirut", "Georgia": "Tbilisi", "Armenia": "Yerevan", "Azerbaijan": "Baku",
            "Kazakhstan": "Astana", "Uzbekistan": "Tashkent", "Australia": "Canberra", "Samoa": "Apia",
            "Niger": "Niamey", "Gabon": "Libreville", "Guinea": "Conakry", "Liberia": "Monrovia",
            "Malawi": "Lilongwe", "Somalia": "Mogadishu", "Eritrea": "Asmara", "Bahrain": "Manama",
            "Belize": "Belmopan", "Honduras": "Tegucigalpa", "Nicaragua": "Managua", "Guyana": "Georgetown",
            "Suriname": "Paramaribo", "Moldova": "Chisinau", "Belarus": "Minsk", "Slovenia": "Ljubljana",
            "Montenegro": "Podgorica", "Liechtenstein": "Vaduz"}


class ToolError(ValueError):
    """A well-formed call the tool refuses (a value out of range, an unknown unit or country)."""


def _int_arg(value: int) -> int:
    if abs(value) > MAX_ABS_INT:
        raise ToolError("value out of range")
    return value


def _convert(value: int, unit: str, to: str) -> int:
    if (unit, to) not in CONVERSIONS:
        raise ToolError("unknown conversion")
    return _int_arg(value) * CONVERSIONS[unit, to]


def _capital(country: str) -> str:
    if country not in CAPITALS:
        raise ToolError("unknown country")
    return CAPITALS[country]


@dataclass(frozen=True)
class Tool:
    """A tool: its name, its parameters as (name, type) pairs, and the function that runs it."""

    name: str
    params: tuple[tuple[str, str], ...]
    fn: Callable

    def __call__(self, **kwargs):
        check_signature(kwargs, dict(self.params))
        return self.fn(**kwargs)


TOOLS = {
    "add": Tool("add", (("a", "integer"), ("b", "integer")), lambda a, b: _int_arg(a) + _int_arg(b)),
    "mul": Tool("mul", (("a", "integer"), ("b", "integer")), lambda a, b: _int_arg(a) * _int_arg(b)),
    "convert": Tool("convert", (("value", "integer"), ("unit", "string"), ("to", "string")), _convert),
    "capital": Tool("capital", (("country", "string"),), _capital),
}
CAPITAL_QUESTIONS = ("capital of {}?", "{} capital?", "{}'s capital?", "capital city of {}?", "{}: capital?",
                     "the capital of {}?")
ERRORS = ("error: parse", "error: unknown tool", "error: bad arguments", "error: bad value")


def checked_call(text: str) -> tuple[str, dict]:
    """``(name, kwargs)`` of the call in ``text``, parsed and checked against the tool's signature; raises
    ``CallError`` ("parse", "unknown tool" or "bad arguments")."""
    name, kwargs = parse_call(text)
    if name not in TOOLS:
        raise CallError("unknown tool", name)
    check_signature(kwargs, dict(TOOLS[name].params))
    return name, kwargs


def run_call(text: str) -> str:
    """Parse, check and execute the call in ``text``; the tool's result as text, or ``"error: <kind>"`` with
    kind "parse", "unknown tool", "bad arguments" or "bad value". Never raises."""
    try:
        name, kwargs = checked_call(text)
        return str(TOOLS[name].fn(**kwargs))
    except CallError as err:
        return f"error: {err.kind}"
    except Exception:  # ToolError, or anything the tool raised on a strange but well-typed value
        return "error: bad value"


class ToolUseTask(Task):
    """Options: ``tools`` (a non-empty subset of ``TOOLS``, default all, drawn uniformly) and ``max_value``
    (largest integer in a question, 1..9999; default 999)."""

    name = "tool_use"
    has_tools = True
    scores_calls = True
    call_end = CALL_END

    def __init__(self, tools=tuple(TOOLS), max_value: int = 999):
        check_option("tools", tools, not isinstance(tools, str) and len(tuple(tools)) > 0
                     and set(tools) <= set(TOOLS), f"a non-empty sequence of names from {sorted(TOOLS)}")
        check_option("max_value", max_value, is_int(max_value) and 1 <= max_value <= 9999, "an int in 1..9999")
        self.tools = tuple(t for t in TOOLS if t in set(tools))
        self.max_value = max_value
        self.alphabet = _alphabet()

    def _draw(self, rng: random.Random, split: str, generate=None) -> Example:
        """Stratified by tool: pick the tool, then draw its arguments until the prompt falls in ``split``."""
        tool = rng.choice(self.tools)
        return super()._draw(rng, split, lambda r: self._generate(r, tool))

    def _generate(self, rng: random.Random, tool: str | None = None) -> Example:
        tool = tool or rng.choice(self.tools)
        if tool in ("add", "mul"):
            a, b = rng.randint(0, self.max_value), rng.randint(0, self.max_value)
            question, args = f"{a} {'plus' if tool == 'add' else 'times'} {b}?", {"a": a, "b": b}
        elif tool == "convert":
            (unit, to), value = rng.choice(sorted(CONVERSIONS)), rng.randint(1, self.max_value)
            question, args = f"{value} {unit} in {to}?", {"value": value, "unit": unit, "to": to}
        else:
            country = rng.choice(sorted(CAPITALS))
            question, args = rng.choice(CAPITAL_QUESTIONS).format(country), {"country": country}
        answer = str(TOOLS[tool](**args))
        segments = ((CALL_START + format_call(tool, args) + CALL_END, False),
                    (RESULT_START + answer + RESULT_END, True),
                    (f"A:{answer}\n", False))
        return Example(prompt=f"Q:{question}", answer=answer, target_segments=segments,
                       meta={"name": tool, "arguments": args})

    def tool_result(self, completion_so_far: str) -> str | None:
        """``<result>...</result>`` for the call that ``completion_so_far`` ends with, else None."""
        if not isinstance(completion_so_far, str) or not completion_so_far.endswith(CALL_END):
            return None
        start = completion_so_far.rfind(CALL_START)
        if start < 0:
            return RESULT_START + ERRORS[0] + RESULT_END
        return RESULT_START + run_call(completion_so_far[start + len(CALL_START):-len(CALL_END)]) + RESULT_END

    def _score(self, example: Example, completion: str) -> Score:
        start = completion.find(CALL_START)
        if start < 0:
            return Score(False, True, False, "no call")
        end = completion.find(CALL_END, start)
        if end < 0:
            return Score(False, True, False, "call not closed")
        try:
            name, kwargs = checked_call(completion[start + len(CALL_START):end])
        except CallError as err:
            return Score(False, True, False, f"malformed call: {err}"[:120])
        expected = example.meta["name"], {k: [v] for k, v in example.meta["arguments"].items()}
        call_ok, why = match_call(name, kwargs, *expected)
        answer = final_answer(completion, end)
        if answer is None:
            return Score(False, True, call_ok, "no final answer 'A:' after the call")
        if answer == example.answer:
            return Score(True, False, call_ok, "correct" if call_ok else f"correct answer; {why}")
        return Score(False, False, call_ok, f"answer {answer[:20]!r}, expected {example.answer!r}; {why}")


def _alphabet() -> str:
    """Every character a prompt, target or tool result can contain."""
    text = ["0123456789-", " plus times in?QA:\n", *(q.format('') for q in CAPITAL_QUESTIONS), CALL_START, CALL_END,
            RESULT_START, RESULT_END, '(),="', *ERRORS, *TOOLS, *(p for t in TOOLS.values() for p, _ in t.params),
            *(u for pair in CONVERSIONS for u in pair), *CAPITALS, *CAPITALS.values()]
    return "".join(sorted(set("".join(text))))
