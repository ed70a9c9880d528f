"""Tasks: deterministic disjoint splits, targets that score correct, real tool execution, malformed input."""
import math
import random

import pandas as pd
import pytest

from opdlab.tasks import TASK_NAMES, Example, Score, get_task, score_batch, split_of, summarize

EMBEDDED = ["arithmetic", "tool_use"]

GARBAGE = ["", " ", "\n", "A:", "A:\n", "A:abc\n", "A:--1\n", "A:1.5\n", "A:" + "9" * 5000, "\x00\x01",
           "💥🙃 ünïcödé \u202e", "<call>", "</call>", "<call></call>", "<call>)(</call>A:1\n",
           "<call>add(a=1,b=2)", "<call>nope(a=1)</call>A:3\n", "<call>add(1,2)</call>A:3\n",
           "<call>add(a='1',b=2)</call>A:3\n", "<call>add(a=True,b=2)</call>A:3\n",
           "<call>add(a=1,b=2,c=3)</call>A:3\n", "<call>add(a=1)</call>A:3\n", "<call>__import__('os')</call>",
           "<call>add(a=1,b=2)</call><result>3</result>", "<call>" + "(" * 500 + "</call>",
           "<call>add(a=" + "9" * 5000 + ",b=1)</call>", "<call>convert(value=1,unit=\"km\",to=\"kg\")</call>",
           "<call>os.system(cmd='ls')</call>A:0\n", "<call>add(**{'a':1})</call>", "<call>lambda: 1</call>"]


@pytest.fixture(params=EMBEDDED)
def task(request):
    return get_task(request.param)


def test_names_and_unknown_task():
    assert set(EMBEDDED) <= set(TASK_NAMES)
    with pytest.raises(ValueError, match="known tasks"):
        get_task("nope")


def test_deterministic_by_seed(task):
    a = task.examples("train", 50, seed=3)
    assert a == task.examples("train", 50, seed=3)
    assert a != task.examples("train", 50, seed=4)
    prompts = [e.prompt for e in task.examples("test", 20, seed=1)]
    assert prompts == [e.prompt for e in task.examples("test", 20, seed=1)]


def test_train_test_disjoint(task):
    train = {e.prompt for seed in range(3) for e in task.examples("train", 400, seed=seed)}
    test = {e.prompt for seed in range(3) for e in task.examples("test", 200, seed=seed)}
    assert train and test and not train & test
    assert all(split_of(p) == "test" for p in test)


def test_targets_score_correct(task):
    for e in task.examples("train", 300) + task.examples("test", 100):
        s = task.score(e, e.target)
        assert s.correct and not s.malformed, (e, s)
        if task.has_tools:
            assert s.call_correct is True
        else:
            assert s.call_correct is None
        assert task.finished(e.target)


def test_alphabet_covers_everything(task):
    seen = set()
    for e in task.examples("train", 500) + task.examples("test", 100):
        seen |= set(e.prompt) | set(e.target)
    assert seen <= set(task.alphabet), seen - set(task.alphabet)
    assert task.alphabet == "".join(sorted(set(task.alphabet)))


@pytest.mark.parametrize("completion", GARBAGE)
def test_malformed_never_raises(task, completion):
    e = task.examples("test", 1)[0]
    s = task.score(e, completion)
    assert isinstance(s, Score) and not s.correct
    assert task.tool_result(completion) is None or isinstance(task.tool_result(completion), str)


def test_random_strings_never_raise(task):
    rng = random.Random(0)
    chars = task.alphabet + "<>/()=,\"' 'éλ💥\x00"
    examples = task.examples("test", 20)
    for i in range(400):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 80)))
        e = examples[i % len(examples)]
        s = task.score(e, text)
        assert isinstance(s, Score) and (not s.correct or text.count("A:") >= 1)
        assert not (s.correct and s.malformed)
        r = task.tool_result(text)
        assert r is None or isinstance(r, str)


def test_wrong_answer_is_wrong_not_malformed(task):
    e = task.examples("test", 1, seed=5)[0]
    wrong = e.target.replace("A:" + e.answer, "A:" + e.answer + "7")
    s = task.score(e, wrong)
    assert not s.correct and not s.malformed


def test_arithmetic_format_and_steps():
    t = get_task("arithmetic", n_operands=3, max_value=99)
    for e in t.examples("train", 200):
        expr = e.prompt[2:-1]
        assert e.prompt.startswith("Q:") and e.prompt.endswith("=")
        assert int(e.answer) == eval(expr)  # left to right is ordinary evaluation for + and -
        steps = e.target.split(";")
        assert len(steps) == 3 and steps[-1] == f"A:{e.answer}\n"
        for step in steps[:-1]:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs) >= 0
        assert len(e.prompt + e.target) < 64
    e = t.examples("test", 1)[0]
    assert t.score(e, "A:" + e.answer + "\n").correct  # the steps are not scored
    assert t.score(e, "A: 0" + e.answer + " \n").correct  # spaces and leading zeros are tolerated
    assert t.score(e, "no answer").malformed


@pytest.mark.parametrize("options", [dict(n_operands=1), dict(n_operands=(3, 2)), dict(n_operands=7),
                                     dict(n_operands="3"), dict(max_value=0), dict(max_value=1.5),
                                     dict(ops="*"), dict(ops=""), dict(colour="red")])
def test_arithmetic_bad_options(options):
    with pytest.raises(ValueError, match="option|bad options"):
        get_task("arithmetic", **options)


def test_bad_split_and_n(task):
    with pytest.raises(ValueError, match="split"):
        task.examples("valid", 3)
    with pytest.raises(ValueError, match="n must"):
        task.examples("train", -1)
    assert task.examples("train", 0) == []


def test_score_batch_and_summarize(task):
    examples = task.examples("test", 4)
    completions = [examples[0].target, "garbage", examples[2].target, ""]
    df = score_batch(task, examples, completions)
    assert isinstance(df, pd.DataFrame) and len(df) == 4
    assert list(df["correct"]) == [True, False, True, False]
    assert list(df["malformed"]) == [False, True, False, True]
    summary = summarize(df)
    assert summary["accuracy"] == 0.5 and summary["malformed_rate"] == 0.5 and summary["n"] == 4
    if task.has_tools:
        assert summary["call_accuracy"] == 0.5
    else:
        assert math.isnan(summary["call_accuracy"])
    with pytest.raises(ValueError, match="completions"):
        score_batch(task, examples, completions[:2])
    assert summarize(score_batch(task, [], []))["n"] == 0


def test_example_target_joins_segments():
    e = Example(prompt="p", answer="1", target_segments=(("a", False), ("b", True), ("c", False)), meta={})
    assert e.target == "abc"


# -- tool use ---------------------------------------------------------------------------------------------
def test_tool_use_format_and_segments():
    t = get_task("tool_use")
    assert t.has_tools and t.call_end == "</call>"
    for e in t.examples("train", 3000):
        (call, env0), (result, env1), (answer, env2) = e.target_segments
        assert (env0, env1, env2) == (False, True, False)
        assert call.startswith("<call>" + e.meta["name"] + "(") and call.endswith("</call>")
        assert result == f"<result>{e.answer}</result>" and answer == f"A:{e.answer}\n"
        assert len(e.prompt + e.target) < 120  # longest: "Q:capital city of Netherlands?" + target, 111
        # the harness, run on the model's part so far, produces exactly the environment segment
        assert t.tool_result(call) == result
        assert t.tool_result(e.prompt + call) == result
        assert t.tool_result(call[:-1]) is None and t.tool_result(e.target) is None


@pytest.mark.parametrize("call,result", [
    ("add(a=23,b=45)", "68"), ("add(a=-5,b=2)", "-3"), ("mul(a=12,b=7)", "84"), ("mul(b=0,a=999)", "0"),
    ('convert(value=3,unit="km",to="m")', "3000"), ("convert(value=2, unit='h', to='min')", "120"),
    ('capital(country="Peru")', "Lima"), (' [add(a=1,b=1)] ', "2"),
    ("add(a=1,b=2", "error: parse"), ("add(1,2)", "error: parse"), ("add(a=x,b=2)", "error: parse"),
    ("add(a=1,a=2)", "error: parse"), ("sub(a=1,b=2)", "error: unknown tool"),
    ("os.system(cmd='ls')", "error: unknown tool"),
    ('add(a="1",b=2)', "error: bad arguments"), ("add(a=1.0,b=2)", "error: bad arguments"),
    ("add(a=True,b=2)", "error: bad arguments"), ("add(a=1)", "error: bad arguments"),
    ("add(a=1,b=2,c=3)", "error: bad arguments"), ('convert(value=3,unit="m",to="km")', "error: bad value"),
    ('capital(country="Atlantis")', "error: bad value"), ("mul(a=10**20,b=1)", "error: parse"),
    ("mul(a=100000000000,b=1)", "error: bad value"), ("", "error: parse"), ("💥", "error: parse"),
])
def test_tools_really_execute(call, result):
    t = get_task("tool_use")
    assert t.tool_result(f"Q:anything?<call>{call}</call>") == f"<result>{result}</result>"
    assert set(result) <= set(t.alphabet)


def test_tool_use_scoring_cases():
    t = get_task("tool_use")
    e = next(e for e in t.examples("test", 200) if e.meta["name"] == "add")
    a, b = e.meta["arguments"]["a"], e.meta["arguments"]["b"]
    right = f"<call>add(a={a},b={b})</call><result>{a + b}</result>A:{a + b}\n"
    assert t.score(e, right) == Score(True, False, True, "correct")
    swapped = t.score(e, f"<call>add(b={b}, a={a})</call><result>{a + b}</result>A:{a + b}\n")
    assert swapped.correct and swapped.call_correct  # argument order does not matter
    wrong_args = t.score(e, f"<call>add(a={a + 1},b={b})</call><result>0</result>A:{a + b}\n")
    assert wrong_args.correct and not wrong_args.malformed and wrong_args.call_correct is False
    wrong_tool = t.score(e, f"<call>mul(a={a},b={b})</call><result>0</result>A:0\n")
    assert not wrong_tool.correct and not wrong_tool.malformed and wrong_tool.call_correct is False
    for bad in [f"A:{a + b}\n", f"<call>add(a={a},b={b})</call><result>{a + b}</result>",
                f"<call>add(a='{a}',b={b})</call>A:{a + b}\n", f"<call>plus(a={a},b={b})</call>A:{a + b}\n",
                f"<call>add(a={a},b={b})A:{a + b}\n", f"<call>add(a={a} b={b})</call>A:{a + b}\n"]:
        s = t.score(e, bad)
        assert s.malformed and not s.correct and s.call_correct in (False, True), (bad, s)


@pytest.mark.parametrize("options", [dict(tools=()), dict(tools=("add", "sub")), dict(tools="add"),
                                     dict(max_value=0), dict(max_value=10**5), dict(n_operands=3)])
def test_tool_use_bad_options(options):
    with pytest.raises(ValueError, match="option|bad options"):
        get_task("tool_use", **options)


def test_tool_use_splits_have_the_same_tool_mix():
    t = get_task("tool_use")
    for split in ("train", "test"):
        names = [e.meta["name"] for e in t.examples(split, 2000)]
        assert all(abs(names.count(tool) / 2000 - 0.25) < 0.05 for tool in ("add", "mul", "convert", "capital"))
    train_countries = {e.meta["arguments"].get("country") for e in t.examples("train", 3000)}
    test_countries = {e.meta["arguments"].get("country") for e in t.examples("test", 1000)}
    assert len(test_countries - train_countries) <= 1  # countries recur in train under another phrasing


def test_tool_use_subset_of_tools():
    t = get_task("tool_use", tools=["convert"], max_value=9)
    assert {e.meta["name"] for e in t.examples("train", 50)} == {"convert"}


# -- property-style fuzz -----------------------------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_FRAGMENTS = st.sampled_from(["<call>", "</call>", "<result>", "</result>", "A:", "\n", "add(", "mul(", "a=",
                              "b=", ",", ")", '"km"', "1", "-", "99", "capital(country=", "'", "💥", "\x00"])
_TEXT = st.one_of(st.text(max_size=120), st.lists(_FRAGMENTS, max_size=30).map("".join))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(EMBEDDED), completion=_TEXT, index=st.integers(0, 9))
def test_fuzz_score_and_tool_result_never_raise(name, completion, index):
    task = get_task(name)
    example = task.examples("test", 10)[index]
    s = task.score(example, completion)
    assert isinstance(s, Score) and not (s.correct and s.malformed)
    assert s.call_correct is None if not task.has_tools else s.call_correct in (True, False)
    r = task.tool_result(completion)
    assert r is None or (r.startswith("<result>") and r.endswith("</result>"))
    if task.has_tools and completion.endswith("</call>"):
        assert r is not None and set(r) <= set(task.alphabet) | set(completion)


# -- external tasks (need the optional packages) -----------------------------------------------------------
def test_gsm_symbolic():
    pytest.importorskip("reasoning_gym")
    t = get_task("gsm_symbolic")
    train, test = t.examples("train", 60, seed=1), t.examples("test", 30, seed=1)
    assert train == t.examples("train", 60, seed=1)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    for e in train + test:
        assert e.prompt.startswith("Q: ") and e.target.endswith(f"A: {e.answer}\n")
        assert t.score(e, e.target) == Score(True, False, None, "correct")
    e = test[0]
    assert t.score(e, "A: " + e.answer).correct and t.score(e, "work...\nA: 0" + e.answer + "1\n").correct is False
    assert not t.score(e, "A: 0" + e.answer + "1").malformed
    for bad in ["", "the answer is " + e.answer, "A: many\n", "💥" * 50]:
        s = t.score(e, bad)
        assert s.malformed and not s.correct
    for options in [dict(dataset_seed="x"), dict(pool_size=0), dict(difficulty=2)]:
        with pytest.raises(ValueError, match="option|bad options"):
            get_task("gsm_symbolic", **options)


@pytest.mark.parametrize("category", ["simple_python", "live_simple"])
def test_bfcl_simple(category):
    pytest.importorskip("bfcl_eval")
    t = get_task("bfcl_simple", category=category)
    train, test = t.examples("train", t.size("train")), t.examples("test", t.size("test"))
    assert len(train) + len(test) + len(t.dropped) == {"simple_python": 400, "live_simple": 258}[category]
    assert len(t.dropped) <= 5
    assert not {e.meta["id"] for e in train} & {e.meta["id"] for e in test}
    assert t.examples("test", 10, seed=2) == t.examples("test", 10, seed=2) != t.examples("test", 10, seed=3)
    for e in train + test:
        assert t.score(e, e.target) == Score(True, False, True, "call matches")
        assert t.finished(e.target)
    with pytest.raises(ValueError, match="non-negative int"):
        t.examples("test", -1)


def test_a_fixed_pool_cycles_in_reshuffled_passes_and_says_so_once():
    pytest.importorskip("bfcl_eval")
    t = get_task("bfcl_simple")
    n = t.size("train")
    with pytest.warns(UserWarning, match=f"500 train examples asked of a pool of {n}; cycling"):
        many = t.examples("train", 500, seed=1)
    assert len(many) == 500 and many[:n] == t.examples("train", n, seed=1)  # the first pass is the plain shuffle
    assert {e.meta["id"] for e in many[:n]} == {e.meta["id"] for e in many[n:2 * n] + many[:n]}
    assert [e.meta["id"] for e in many[n:2 * n]] != [e.meta["id"] for e in many[:500 - n]]  # reshuffled
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t.examples("train", 600)  # said once per task and split
    with pytest.warns(UserWarning, match="test examples asked"):
        assert len(t.examples("test", 3 * t.size("test"))) == 3 * t.size("test")


def test_bfcl_ast_check():
    pytest.importorskip("bfcl_eval")
    t = get_task("bfcl_simple")
    e = next(e for e in t.examples("train", t.size("train")) if e.meta["id"] == "simple_python_0")
    # calculate_triangle_area(base=10, height=5, unit="units" optional)
    assert e.target == '<call>calculate_triangle_area(base=10,height=5,unit="units")</call>'
    cases = {
        "<call>calculate_triangle_area(base=10, height=5)</call>": (True, False),  # optional left out
        "[calculate_triangle_area(height=5, base=10, unit='Units')]": (True, False),  # BFCL form, normalised
        "<call>calculate_triangle_area(base=10,height=6)</call>": (False, False),  # wrong value
        "<call>calculate_triangle_area(base=10,height=5,unit=\"cm\")</call>": (False, False),
        "<call>calculate_area(base=10,height=5)</call>": (False, True),  # unknown function
        "<call>calculate_triangle_area(base='10',height=5)</call>": (False, True),  # wrong type
        "<call>calculate_triangle_area(base=10)</call>": (False, True),  # required argument missing
        "<call>calculate_triangle_area(base=10,height=5,colour=1)</call>": (False, True),  # unknown argument
        "<call>calculate_triangle_area(10, 5)</call>": (False, True),  # positional
        "": (False, True), "I cannot help": (False, True), "<call>calculate_triangle_area(": (False, True),
    }
    for completion, (correct, malformed) in cases.items():
        s = t.score(e, completion)
        assert (s.correct, s.malformed, s.call_correct) == (correct, malformed, correct), (completion, s)


def test_missing_package_hint(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("reasoning_gym"):
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install -e \.\[pretrained\]"):
        get_task("gsm_symbolic")


def test_a_malformed_number_in_a_call_is_an_error_without_a_warning():
    """Python's parser warns (invalid decimal literal) on a sampled ``1if ...`` or ``1and ...`` that it still
    parses; the warning must not reach the user's console once per bad sample: the call is simply invalid."""
    import warnings

    from opdlab.tasks.calls import CallError, parse_call

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for text in ("add(a=1a, b=2)", "add(a=1if b else 2, b=2)", "add(a=1and 2, b=2)"):
            with pytest.raises(CallError):
                parse_call(text)
        assert parse_call("add(a=1, b=2)") == ("add", {"a": 1, "b": 2})
    assert not caught, [str(w.message) for w in caught]


def test_a_scorer_bug_keeps_its_traceback_and_malformed_kinds_are_counted():
    """Task.score no longer turns every exception into 'malformed': a bug in a scorer (here a KeyError) raises,
    while a completion's own errors stay malformed scores, counted by kind."""
    task = get_task("tool_use")
    example = task.examples("test", 1, seed=0)[0]

    class Buggy(type(task)):
        def _score(self, example, completion):
            return {}["missing"]

    with pytest.raises(KeyError):
        Buggy().score(example, "A:1\n")
    df = score_batch(task, [example] * 3, ["<call>)(</call>A:1\n", "<call>nope(a=1)</call>A:3\n", "A:"])
    kinds = summarize(df)["malformed_kinds"]
    assert sum(kinds.values()) == int(df["malformed"].sum()) == 3 and kinds.get("malformed call") == 2, kinds
