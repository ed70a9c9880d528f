"""benchmarks/bench_peers.py in --quick mode: every arm runs one timed step on tiny models and reports a positive
time and a finite plain/arm ratio; without TRL the script says so and runs the other arms."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_peers.py"
OPDLAB_ARMS = ("opd", "opd_compiled", "opd_hf_sampler", "plain")


@pytest.fixture(scope="module")
def bench():
    """The script as a module (registered in sys.modules, which its dataclass needs)."""
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_peers", None)


@pytest.fixture
def threads():
    """main() sets torch's thread count: restore it for the tests that follow."""
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def quick(bench, out: Path, *extra) -> dict:
    """Run the script's main in --quick mode on one thread; return the JSON it wrote (checked against its return)."""
    res = bench.main(["--quick", "--threads", "1", "--out", str(out), *extra])
    written = json.loads((out / f"bench_peers-{res['device']}.json").read_text())
    assert written == json.loads(json.dumps(res))
    assert (out / f"bench_peers-{res['device']}.png").stat().st_size > 0
    return written


def check_arms(res: dict, arms) -> None:
    (case,) = res["cases"]
    assert (case["size"], case["batch"], res["steps"], res["threads"]) == ("tiny", 2, 1, 1)
    assert set(arms) <= set(case["arms"])
    for name in arms:
        arm = case["arms"][name]
        assert len(arm["times_s"]) == 1 and arm["median_s"] > 0, name
        assert arm["sampled_tokens_per_step"] > 0, name
        ratio = arm["plain_over_arm"]
        assert all(math.isfinite(ratio[k]) and ratio[k] > 0 for k in ("median", "min", "max")), name
    assert case["arms"]["plain"]["plain_over_arm"]["median"] == 1.0
    # the compiled decode step draws the same tokens as the eager one
    assert case["arms"]["opd_compiled"]["sampled_tokens_per_step"] == case["arms"]["opd"]["sampled_tokens_per_step"]


def test_quick_without_trl(bench, threads, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError, as when it is not installed
    res = quick(bench, tmp_path)
    out = capsys.readouterr().out
    assert "TRL is not installed" in out and "pip install -e .[bench]" in out
    check_arms(res, OPDLAB_ARMS)
    assert set(res["cases"][0]["arms"]) == set(OPDLAB_ARMS) and res["trl_version"] is None


def test_quick_with_trl(bench, threads, tmp_path):
    pytest.importorskip("trl", reason="TRL is an optional extra (pip install -e .[bench])")
    trl, line = bench.trl_status()
    if trl is None:
        pytest.skip(line)
    res = quick(bench, tmp_path)
    check_arms(res, bench.ARMS)


def test_groups_of_samples_share_their_prompt_in_every_arm(bench, threads, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    res = quick(bench, tmp_path, "--samples", "2")
    (case,) = res["cases"]
    assert case["samples"] == 2
    check_arms(res, OPDLAB_ARMS)
    made = bench.make_case("tiny", 4, 2, torch.device("cpu"), samples=2)
    assert [len(set(p)) for p in made.prompts] == [2, 2] and made.prompts[0][0] == made.prompts[0][1]
    assert made.config().optim.prompts_per_step == 2 and made.config().optim.samples_per_prompt == 2


def test_a_batch_that_is_not_a_multiple_of_the_samples_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse(["--batches", "6", "--samples", "4"])


def test_bench_levers_turns_each_lever_off_on_the_same_tokens(bench, threads, tmp_path):
    """benchmarks/bench_levers.py on tiny models: every arm runs, draws the same tokens as opdlab's default
    step, and reports its phases and a finite opdlab/arm ratio."""
    spec = importlib.util.spec_from_file_location("bench_levers", SCRIPT.parent / "bench_levers.py")
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    res = levers.main(["--sizes", "tiny", "--batch", "4", "--samples", "2", "--steps", "2", "--threads", "1",
                       "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench_levers-cpu.json").read_text()) == json.loads(json.dumps(res))
    (case,) = res["cases"]
    assert set(case["arms"]) == set(levers.ARMS)
    tokens = {a["sampled_tokens_per_step"] for a in case["arms"].values()}
    assert len(tokens) == 1 and tokens.pop() > 0, "the arms should sample the same tokens"
    for name, arm in case["arms"].items():
        assert set(arm["phases_s"]) == set(levers.PHASES) and min(arm["phases_s"].values()) > 0, name
        assert all(math.isfinite(arm["opdlab_over_arm"][k]) for k in ("median", "min", "max")), name
    assert case["arms"]["opdlab"]["opdlab_over_arm"]["median"] == 1.0
