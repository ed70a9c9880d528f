"""The run-directory tests' shared fixtures, written once: a tiny arithmetic run (``CONFIG``, ``RT``) over two
tiny models (``MODELS``), the same run from the command line (``CLI_FIELDS``, ``params``), its metrics read back,
a run cut short, a process that holds a run's lock, and waiting for a process to take it."""
import os
import time

from opdlab.config.recipe import ModelRecipe
from opdlab.lm.modeling import build_model
from opdlab.lm.tokenizer import char_tokenizer
from opdlab.rundir.reader import read_metrics
from opdlab.tasks import get_task
from opdlab.training.loop import train
from opdlab.training.step import Models
from runs import make

TASK = get_task("arithmetic")
TOK = char_tokenizer(TASK.alphabet + "<>()")
SMALL = dict(steps=4, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=10, eval_every=2, eval_n=4,
             eval_samples=1, checkpoint_every=2, device="cpu", lr=3e-3)
CONFIG, RT = make(**SMALL)
# the same tiny run from the command line: models trained into a cache once per module (test_rundir's `cache`)
CLI_FIELDS = dict(SMALL, steps=6, checkpoint_every=1, eval_every=3, teacher_hidden=16, teacher_layers=1,
                  teacher_sft_steps=5, student_hidden=16, student_layers=1, student_warmup_steps=2, sft_batch=8)


def tiny(seed):
    return build_model(ModelRecipe(hidden=16, layers=1, heads=1, intermediate=32, seed=seed), TOK).eval()


MODELS = Models(tiny(0), tiny(1), TOK, {})


def params(fields):
    """``-p FIELD VALUE`` arguments of ``opdlab train`` for a dict of RunSpec and Runtime fields."""
    return sum((["-p", k, str(v)] for k, v in fields.items()), [])


def metrics(run_dir):
    return read_metrics(run_dir, volatile=False).drop(columns="run")


def cut(tmp_path, steps=3):
    """A run of CONFIG that stopped after ``steps`` steps (checkpoint at step 2)."""
    train(CONFIG, tmp_path / "run", RT, TASK, MODELS, stop_after=steps)
    return tmp_path / "run"


HOLD = ("import sys; from opdlab.config.presets import resolve; from opdlab.rundir.writer import RunLog; "
        "log = RunLog(sys.argv[1], resolve(%s)[0]); print('locked', flush=True); sys.stdin.read()")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def wait_for_lock(run_dir, proc, timeout=60):
    """Until ``proc`` holds the run directory (it writes its pid into the lock file), or has ended."""
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        try:
            if (run_dir / "lock").read_text() == str(proc.pid):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)
