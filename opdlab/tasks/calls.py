"""Function calls as text: parse with ``ast``, check against a signature, compare with ground truth.

A call is one Python call expression with keyword arguments only and literal values, e.g.
``convert(value=3,unit="km",to="m")`` (a dotted name such as ``math.factorial`` is allowed, and BFCL's
bracketed form ``[f(x=1)]`` is unwrapped). Nothing is ever evaluated: values go through
``ast.literal_eval``. The comparison follows BFCL's AST checker: the function name must match, no argument
may be unknown, every required argument must be present, each value must have the declared type and equal
one of the acceptable values (an acceptable ``""`` marks an argument that may be omitted). Strings may be
compared after BFCL's normalisation (case, spaces and ``,./-_*^`` ignored).
"""
from __future__ import annotations

import ast
import re
import warnings

CALL_START, CALL_END = "<call>", "</call>"  # how a model writes a call in the tool tasks
MAX_CALL_CHARS = 2000

_TYPES = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, (list, tuple)),
    "tuple": lambda v: isinstance(v, (list, tuple)),
    "dict": lambda v: isinstance(v, dict),
    "object": lambda v: isinstance(v, dict),
    "any": lambda v: True,
}
_NORMALISE_RE = re.compile(r"[ ,./\-_*^]")


class CallError(ValueError):
    """A call that cannot be accepted; ``kind`` is one of "parse", "unknown tool", "bad arguments"."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def parse_call(text: str) -> tuple[str, dict]:
    """``(name, kwargs)`` from the text of one call; CallError("parse", ...) if it is not one."""
    text = text.strip()
    if len(text) > MAX_CALL_CHARS:
        raise CallError("parse", f"call longer than {MAX_CALL_CHARS} characters")
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    try:
        with warnings.catch_warnings():  # a sampled "1if" is an invalid call here, not a warning to print
            warnings.simplefilter("ignore", SyntaxWarning)  # Python 3.12+ (and 3.11 for some literals)
            warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.10
            node = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise CallError("parse", type(err).__name__) from None
    if not isinstance(node, ast.Call):
        raise CallError("parse", "not a call")
    name = _dotted_name(node.func)
    if node.args:
        raise CallError("parse", "positional arguments; use name=value")
    kwargs: dict = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise CallError("parse", "**kwargs")
        if keyword.arg in kwargs:
            raise CallError("parse", f"argument {keyword.arg} repeated")
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise CallError("parse", f"argument {keyword.arg} is not a literal") from None
    return name, kwargs


def _dotted_name(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise CallError("parse", "the function is not a name")
    return ".".join([node.id, *reversed(parts)])


def format_value(value) -> str:
    """A Python literal for ``value``; strings in double quotes."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, (list, tuple)):
        inner = ",".join(format_value(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ",".join(f"{format_value(k)}:{format_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def format_call(name: str, kwargs: dict) -> str:
    """The canonical text of a call: ``name(a=1,b="x")``, arguments in the given order, no spaces."""
    return f"{name}(" + ",".join(f"{k}={format_value(v)}" for k, v in kwargs.items()) + ")"


def type_ok(value, type_name: str) -> bool:
    """Whether ``value`` has the JSON-schema-like type ``type_name`` (int is accepted for float)."""
    check = _TYPES.get(type_name)
    return True if check is None else check(value)


def check_signature(kwargs: dict, params: dict[str, str], required=None) -> None:
    """CallError("bad arguments", ...) unless every argument is known, typed right, and required ones given.

    ``params`` maps argument names to type names (see :func:`type_ok`); ``required`` defaults to all.
    """
    for key, value in kwargs.items():
        if key not in params:
            raise CallError("bad arguments", f"unknown argument {key}")
        if not type_ok(value, params[key]):
            raise CallError("bad arguments", f"{key} should be {params[key]}")
    missing = [k for k in (params if required is None else required) if k not in kwargs]
    if missing:
        raise CallError("bad arguments", f"missing {', '.join(missing)}")


def normalise_string(text: str) -> str:
    """BFCL's string normalisation: lower case, without spaces and ``,./-_*^``, single quotes as double."""
    return _NORMALISE_RE.sub("", text.lower()).replace("'", '"')


def values_equal(got, want, normalise: bool = False) -> bool:
    """Structural equality of literals; strings normalised when ``normalise``; int equals float by value."""
    if isinstance(want, str) or isinstance(got, str):
        if not (isinstance(want, str) and isinstance(got, str)):
            return False
        return normalise_string(got) == normalise_string(want) if normalise else got == want
    if isinstance(want, bool) or isinstance(got, bool):
        return isinstance(want, bool) and isinstance(got, bool) and got == want
    if isinstance(want, (list, tuple)):
        return (isinstance(got, (list, tuple)) and len(got) == len(want)
                and all(values_equal(g, w, normalise) for g, w in zip(got, want)))
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return False
        return match_arguments(got, {k: (v if isinstance(v, list) else [v]) for k, v in want.items()},
                               normalise)[0]
    try:
        return got == want
    except Exception:
        return False


def match_arguments(kwargs: dict, possible: dict[str, list], normalise: bool = False) -> tuple[bool, str]:
    """BFCL-style check of arguments against ``possible`` (name -> list of acceptable values; ``""`` or
    ``None`` in the list means the argument may be omitted or given as None). Returns ``(ok, reason)``."""
    for key in kwargs:
        if key not in possible:
            return False, f"unexpected argument {key}"
    for key, options in possible.items():
        if kwargs.get(key) is None and ("" in options or None in options):
            continue  # an optional argument left out, or given as None (its default)
        if key not in kwargs:
            return False, f"missing argument {key}"
        if not any(values_equal(kwargs[key], option, normalise) for option in options if option != ""):
            return False, f"wrong value for {key}"
    return True, "call matches"


def match_call(name: str, kwargs: dict, expected_name: str, possible: dict[str, list],
               normalise: bool = False) -> tuple[bool, str]:
    """Right function and right arguments (see :func:`match_arguments`)."""
    if name != expected_name:
        return False, f"called {name}, expected {expected_name}"
    return match_arguments(kwargs, possible, normalise)
