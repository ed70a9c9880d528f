"""Data-parallel training under torchrun: two CPU processes (gloo) make the update one process makes on the same
global batch, write the same metrics, and an interrupted two-process run resumes exactly."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import opdlab.training.step as step_module
from opdlab.lm.modeling import load_model
from opdlab.lm.sampling import Rollout, sample
from opdlab.rundir.reader import read_metrics
from opdlab.tasks import get_task
from opdlab.training import distributed
from opdlab.training.loop import train
from opdlab.training.models import load_models
from runs import make

TASK = get_task("arithmetic")
# the loo baseline's groups must stay whole, and the token reduction needs the global token count
FIELDS = dict(steps=4, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=10, eval_every=2, eval_n=4,
              eval_samples=1, checkpoint_every=2, device="cpu", lr=3e-3, divergence="jsd", baseline="loo",
              teacher_hidden=16, teacher_layers=1, teacher_sft_steps=5, student_hidden=16, student_layers=1,
              student_warmup_steps=2, sft_batch=8)
LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENV = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER}, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
STOP = ("import sys; from opdlab.config.presets import resolve; from opdlab.training.loop import train\n"
        "spec, runtime = resolve({**eval(sys.argv[2]), 'progress': False})\n"
        "train(spec, sys.argv[1], runtime, stop_after=int(sys.argv[3]))\n")


def params(fields):
    return sum((["-p", k, repr(v) if isinstance(v, str) else str(v)] for k, v in fields.items()), [])


def torchrun(*args):
    done = subprocess.run([*TORCHRUN, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def metrics(run_dir):
    return read_metrics(run_dir, volatile=False).drop(columns="run")


def weights(run_dir):
    return load_model(run_dir / "checkpoint")[0].state_dict()


def weights_initial(config, runtime):
    return load_models(config, TASK, runtime).student.state_dict()


def _join(a: Rollout, b: Rollout, pad: int) -> Rollout:
    """Two rollouts as one batch: prompts left-padded and completions right-padded to the longer of the two."""
    P = max(a.prompt_ids_BP.shape[1], b.prompt_ids_BP.shape[1])
    T = max(a.completion_ids_BT.shape[1], b.completion_ids_BT.shape[1])

    def both(name, width, left, value):
        x, y = getattr(a, name), getattr(b, name)
        return torch.cat([F.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value)
                          for t in (x, y)])

    return Rollout(both("prompt_ids_BP", P, True, pad), both("prompt_attention_BP", P, True, 0),
                   both("completion_ids_BT", T, False, pad), both("mask_BT", T, False, 0),
                   both("attention_BT", T, False, 0), both("logp_BT", T, False, 0), a.texts + b.texts)


def two_rank_sampler(seed: int):
    """``sample`` for a one-process run that draws what two ranks draw: the first half of the step's prompts
    with the trainer's generator (rank 0's), the second half with rank 1's, joined into one batch."""
    rank1 = torch.Generator().manual_seed(distributed.rank_seed(seed, 1))

    def sampler(model, tokenizer, prompts, task, max_new_tokens, generator, **kwargs):
        half = len(prompts) // 2
        a = sample(model, tokenizer, prompts[:half], task, max_new_tokens, generator, **kwargs)
        b = sample(model, tokenizer, prompts[half:], task, max_new_tokens, rank1, **kwargs)
        return _join(a, b, tokenizer.pad_token_id)

    return sampler


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A two-process run from the command line, and the one-process run of the same global batches."""
    root = tmp_path_factory.mktemp("ddp")
    config, runtime = make(**FIELDS, cache=str(root / "cache"))
    models = load_models(config, TASK, runtime)  # fills the cache the ranks read
    with pytest.MonkeyPatch.context() as m:
        m.setattr(step_module, "sample_completions", two_rank_sampler(config.optim.seed))
        train(config, root / "one", runtime, TASK, models)
    torchrun("-m", "opdlab", "train", root / "two", "-q", *params({**FIELDS, "cache": runtime.cache}))
    return config, runtime, root


def test_two_processes_make_the_one_process_update(runs):
    config, runtime, root = runs
    one, two = metrics(root / "one"), metrics(root / "two")
    assert list(one.columns) == list(two.columns) and one[["step", "kind"]].equals(two[["step", "kind"]])
    exact = ["tokens", "accuracy", "greedy_accuracy", "sampled_accuracy", "completion_length"]
    assert one[exact].equals(two[exact])  # the same completions were sampled and scored
    numbers = [c for c in one.columns if one[c].dtype.kind == "f"]
    diff = (one[numbers] - two[numbers]).abs().max().max()
    assert diff < 1e-6, (one[numbers] - two[numbers]).abs().max()  # summation order only
    w1, w2 = weights(root / "one"), weights(root / "two")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
    assert max(float((w2[k] - weights_initial(config, runtime)[k]).abs().max()) for k in w2) > 1e-3  # it did train
    run = (root / "two" / "run.json").read_text()
    assert '"world_size": 2' in run and not list((root / "two").glob("checkpoint.*"))


def test_an_interrupted_two_process_run_resumes_exactly(runs, tmp_path):
    config, runtime, root = runs
    (tmp_path / "stop.py").write_text(STOP)
    torchrun(tmp_path / "stop.py", tmp_path / "cut", repr({**FIELDS, "cache": runtime.cache}), 3)  # checkpoint at step 2
    assert metrics(tmp_path / "cut")["step"].max() == 3
    state = torch.load(tmp_path / "cut" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2 and state["rng"]["world_size"] == 2 and len(state["rng"]["ranks"]) == 2
    with pytest.raises(ValueError, match=r"was run by 2 process\(es\) and is being resumed by 1"):
        train(config, tmp_path / "cut", runtime, TASK)
    torchrun("-m", "opdlab", "train", tmp_path / "cut", "-q")  # its recorded spec, and the runtime it ran with
    assert metrics(tmp_path / "cut").equals(metrics(root / "two"))
    w_cut, w_two = weights(tmp_path / "cut"), weights(root / "two")
    assert all(torch.equal(w_cut[k], w_two[k]) for k in w_two)


def test_prompts_that_the_processes_cannot_share_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="prompts_per_step = 3 cannot be shared by 2 processes"):
        spec, runtime = make(**{**FIELDS, "prompts_per_step": 3})
        train(spec, tmp_path / "run", runtime, TASK)
    assert not (tmp_path / "run").exists()
