"""Cohorts (opdlab.training.cohort): a run stepped inside a cohort of mixed arms draws the same tokens, gets the same
gradient and ends each step with the same metrics, weights and generator state as the same run stepped alone
by step.opd_step, to float rounding; the comparison fails for another run (the counterfactual)."""
import copy

import pytest
import torch
from test_decoder import TASK, TOK, model_of

from opdlab.config import choices
from opdlab.config.runtime import Runtime
from opdlab.config.spec import RunSpec
from opdlab.errors import UserError
from opdlab.lm import sampling
from opdlab.lm.sampling import sample
from opdlab.training import step as opd
from opdlab.training.cohort import check, cohort_step, merge_rollouts, split_rollout
from opdlab.training.step import Models, Trainer, opd_step

BASE = RunSpec.from_dict(dict(steps=2, prompts_per_step=3, samples_per_prompt=2, max_new_tokens=12, eval_n=4))
ARMS = [  # divergence, method, γ, baseline, learning rate, clip, schedule and seed all differ
    dict(divergence="reverse_kl", method="opd_plus", baseline="expected", lr=1e-3, seed=0),
    dict(divergence="forward_kl", method="opd", gamma=0.5, log_u_clip=2.0, lr=3e-4, seed=1, grad_clip=0.05),
    dict(divergence="jsd", method="full_vocabulary", lr=2e-3, seed=2, lr_schedule="cosine"),
    dict(divergence="gjsd:0.3", method="opd_plus", baseline="loo", lr=5e-4, seed=3),
    dict(divergence="reverse_kl", method="supervised_kd", lr=1e-3, seed=4),
]


def trainers_of(arms, arch, kv_heads, teacher=None, runtimes=None):
    teacher = teacher or model_of(arch, seed=99, kv_heads=kv_heads)
    students = [model_of(arch, seed=20 + i, kv_heads=kv_heads) for i in range(len(arms))]
    runtimes = runtimes or [Runtime()] * len(arms)
    return teacher, [Trainer(BASE.replace(arch=arch, **arm), TASK, teacher, s, TOK, rt)
                     for arm, s, rt in zip(arms, students, runtimes)]


def clone(tr):
    return Trainer(tr.spec, tr.task, tr.teacher, copy.deepcopy(tr.student), tr.tokenizer, tr.runtime)


@pytest.mark.parametrize("arch, kv_heads, together", [("qwen3", 1, True), ("llama", 2, True), ("qwen3", 1, False)],
                         ids=["qwen3-stacked", "llama-stacked", "qwen3-apart"])
def test_a_run_in_a_cohort_of_mixed_arms_steps_as_it_does_alone(arch, kv_heads, together):
    """Scored apart, run 2 also asks for the transformers sampler and the padded scorer: it samples alone."""
    runtimes = [Runtime(sampler="transformers", scorer="padded") if r == 2 and not together else Runtime()
                for r in range(len(ARMS))]
    teacher, cohort = trainers_of(ARMS, arch, kv_heads, runtimes=runtimes)
    alone = [clone(tr) for tr in cohort]
    for step in range(BASE.optim.steps):
        before = [[p.detach().clone() for p in tr.student.parameters()] for tr in alone]
        got = cohort_step(cohort, step, score_together=together)
        for r, (tr, solo) in enumerate(zip(cohort, alone)):
            want = opd_step(solo, step)
            assert torch.equal(tr.generator.get_state(), solo.generator.get_state()), (step, r)
            for key, value in want.items():
                if not key.startswith("time_"):
                    assert got[r][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, r, key)
            for (name, p), q in zip(tr.student.named_parameters(), solo.student.parameters()):
                assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm() + 1e-8, (step, r, name)
            # AdamW's first steps move each weight by about lr * sign(g): a gradient entry near 0 turns float
            # rounding into a visible difference of that one entry, so the updates are compared as a whole
            moved = [(p - b, q - b) for p, q, b in zip(tr.student.parameters(), solo.student.parameters(), before[r])]
            error = sum((d - e).norm() ** 2 for d, e in moved) ** 0.5
            assert error <= 1e-3 * sum(e.norm() ** 2 for _, e in moved) ** 0.5, (step, r)
    # the counterfactual: run 0 of the cohort against run 1 alone
    assert not torch.allclose(next(cohort[0].student.parameters()), next(alone[1].student.parameters()), atol=1e-3)


def test_a_top_k_arm_scored_with_the_others_steps_as_it_does_alone():
    """The stacked scorer hands the loss the scored tokens too: a top-k teacher's payload is built at them."""
    arms = [dict(divergence="jsd", method="opd_plus", teacher_topk=2, baseline="tail", lr=1e-3, seed=5), ARMS[1]]
    _, cohort = trainers_of(arms, "qwen3", 1)
    alone = [clone(tr) for tr in cohort]
    got = cohort_step(cohort, 0, score_together=True)
    for r, solo in enumerate(alone):
        want = opd_step(solo, 0)
        assert {k: v for k, v in got[r].items() if not k.startswith("time_")} == pytest.approx(
            {k: v for k, v in want.items() if not k.startswith("time_")}, rel=1e-5, abs=1e-6), r
    assert got[0]["loss"] != pytest.approx(got[1]["loss"], rel=1e-3)  # the two runs are not one


def test_the_other_members_change_nothing_in_a_run():
    teacher, first = trainers_of(ARMS[:3], "qwen3", None)
    other = [clone(first[0])] + trainers_of(ARMS[3:], "qwen3", None, teacher=teacher)[1]
    a, b = cohort_step(first, 0, score_together=True)[0], cohort_step(other, 0, score_together=True)[0]
    assert {k: v for k, v in a.items() if not k.startswith("time_")} == pytest.approx(
        {k: v for k, v in b.items() if not k.startswith("time_")}, rel=1e-5, abs=1e-6)
    for p, q in zip(first[0].student.parameters(), other[0].student.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm() + 1e-8


def test_split_inverts_merge_of_rollouts_of_other_widths():
    model = model_of("qwen3", seed=3)
    rollouts = [sample(model, TOK, ["Q:1+2=", "Q:100-99+1=", "Q:7=", "Q:3+3="][2 * r:2 * r + 2], TASK, 3 + 4 * r,
                       torch.Generator().manual_seed(r)) for r in range(2)]
    assert rollouts[0].prompt_ids_BP.shape != rollouts[1].prompt_ids_BP.shape
    for r, back in zip(rollouts, split_rollout(merge_rollouts(rollouts, TOK.pad_token_id), 2)):
        for name in ("prompt_ids_BP", "prompt_attention_BP", "completion_ids_BT", "mask_BT", "attention_BT", "logp_BT"):
            assert torch.equal(getattr(r, name), getattr(back, name)), name
        assert r.texts == back.texts


def test_a_cohort_refuses_runs_that_cannot_share_a_step():
    _, trainers = trainers_of(ARMS[:2], "qwen3", None)
    check(trainers)
    with pytest.raises(UserError, match="at least one run"):
        check([])
    other_teacher = Trainer(trainers[1].spec, TASK, model_of("qwen3", seed=5), trainers[1].student, TOK)
    with pytest.raises(UserError, match="run 1 of the cohort has another teacher"):
        check([trainers[0], other_teacher])
    bigger = Trainer(trainers[1].spec.replace(prompts_per_step=4), TASK, trainers[0].teacher, trainers[1].student, TOK)
    with pytest.raises(UserError, match="equally many completions"):
        check([trainers[0], bigger])
    budget = Trainer(trainers[1].spec.replace(max_new_tokens=20), TASK, trainers[0].teacher, trainers[1].student, TOK)
    with pytest.raises(UserError, match="up to 20 tokens"):
        check([trainers[0], budget])


def test_the_cohort_benchmark_writes_its_columns_and_its_ratio_line(tmp_path):
    """benchmarks/bench_cohort.py on tiny models: a row per R with positive rates, and the last line the ratio's
    (n/a here: the tiny case is not notebook 04's)."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "cohort.csv"
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_cohort.py"), "--case", "tiny/arithmetic",
                           "--R", "1", "3", "--steps", "1", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "cohort ratio at notebook 04 size: n/a", done.stdout
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["size", "task", "R", "run_steps_per_s", "baseline_run_steps_per_s", "ratio", "gflops",
                             "peak_fraction", "peak_rss_mb"]
    assert [r["R"] for r in rows] == ["1", "3"], done.stdout
    for r in rows:
        assert all(float(r[k]) > 0 for k in ("run_steps_per_s", "baseline_run_steps_per_s", "ratio", "gflops",
                                               "peak_fraction", "peak_rss_mb")), (r, done.stdout)


# -- the step's pieces the cohort shares ---------------------------------------------------------------------------
def test_each_models_gets_a_meta_of_its_own():
    a, b = Models("t", "s", "k"), Models("t", "s", "k")
    a.meta["teacher"] = {"path": "x"}
    assert b.meta == {} and a.meta is not b.meta
    given = {"student": {"path": "y"}}
    teacher, student, tokenizer, meta = Models("t", "s", "k", given)
    assert meta is given and (teacher, student, tokenizer) == ("t", "s", "k")
    assert Models("t", "s", "k")._replace(teacher="u") == ("u", "s", "k", {})


def test_the_two_completion_budgets_are_named_and_the_ones_committed_numbers_used():
    examples = TASK.examples("train", 500, seed=0)
    longest = max(len(ex.target) for ex in examples)
    assert (sampling.RUN_BUDGET_MARGIN, sampling.CHECK_BUDGET_MARGIN) == (8, 16)
    assert opd.max_new_tokens(TASK) == longest + 8
    assert sampling.completion_budget(examples, sampling.CHECK_BUDGET_MARGIN) == longest + 16


def test_the_evaluation_seeds_are_the_choices_ones():
    assert opd.EVAL_SEED is choices.EVAL_SEED == 10_000 and choices.VALIDATION_SEED == 20_000
    assert [ex.prompt for ex in opd.eval_examples(TASK, 3)] == [ex.prompt for ex in TASK.examples("test", 3,
                                                                                                     seed=10_000)]


def test_timed_adds_the_rate_and_the_phases_in_the_order_runs_record_them():
    clock = opd.Clock(torch.device("cpu"))
    clock.lap("sample")
    clock.lap("sample")
    record = opd.timed({"loss": 1.0, "tokens": 10}, 0.1, clock)
    assert list(record) == ["loss", "tokens", "lr", "time_sample", "time_tokens_per_s"]
    assert record["time_tokens_per_s"] == pytest.approx(10 / record["time_sample"])
