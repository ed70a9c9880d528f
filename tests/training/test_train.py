"""The OPD loop: sampling and log-prob alignment, one step per method, resume, teacher == student, config."""
import copy
import math

import pandas as pd
import pytest
import torch

from echo_tool import EchoTool
from naive import naive_advantages
from opdlab.config.recipe import ModelRecipe
from opdlab.config.spec import RunSpec
from opdlab.core import estimators
from opdlab.errors import UserError
from opdlab.lm.modeling import build_model
from opdlab.lm.sampling import completion_logits, gather_logp, sample
from opdlab.lm.sft import warmup_cosine_lr
from opdlab.lm.tokenizer import char_tokenizer
from opdlab.rundir.reader import read_metrics, results
from opdlab.tasks import get_task
from opdlab.training.loop import train
from opdlab.training.step import Models, Trainer, opd_step
from runs import make, resign

TASK = get_task("arithmetic")
TOK = char_tokenizer(TASK.alphabet + "<>()")
SMALL = dict(steps=2, prompts_per_step=3, samples_per_prompt=2, max_new_tokens=12, eval_every=2, eval_n=4,
             eval_samples=1, checkpoint_every=1, device="cpu", lr=3e-3)


def tiny(seed=0, hidden=32):
    return build_model(ModelRecipe(hidden=hidden, layers=1, heads=2, intermediate=2 * hidden, seed=seed), TOK).eval()


def rollout_of(model, prompts, seed=0, task=TASK, max_new_tokens=10):
    return sample(model, TOK, prompts, task, max_new_tokens, torch.Generator().manual_seed(seed))


def test_logp_alignment_matches_a_naive_gather():
    model = tiny()
    r = rollout_of(model, ["Q:1+2=", "Q:12+34-5=", "Q:7="])
    logp_BT, _ = gather_logp(completion_logits(model, r), r.completion_ids_BT)
    ids, attention, pos = r.full()
    P = r.prompt_ids_BP.shape[1]
    for b in range(ids.shape[0]):  # one unpadded sequence at a time, read token by token
        real = attention[b].bool()
        seq = ids[b][real][None]
        logp_all = torch.log_softmax(model(seq).logits[0], -1)
        n_prompt = int(r.prompt_attention_BP[b].sum())
        for t in range(int(r.attention_BT[b].sum())):
            expect = logp_all[n_prompt + t - 1, seq[0, n_prompt + t]]
            assert torch.allclose(logp_BT[b, t], expect, atol=1e-5), (b, t)
    # and the sampler's own log-probabilities (KV cache) agree with the scoring pass
    assert torch.allclose(logp_BT * r.mask_BT, r.logp_BT * r.mask_BT, atol=1e-5)
    assert P + r.completion_ids_BT.shape[1] == ids.shape[1]


def test_sampling_draws_from_the_full_distribution_at_temperature_one():
    model = tiny(seed=3, hidden=16)
    n = 3000
    r = rollout_of(model, ["Q:5="] * n, max_new_tokens=1)
    ids = torch.tensor([TOK.encode("Q:5=", add_special_tokens=False)])
    p_V = torch.softmax(model(ids).logits[0, -1], -1).detach()
    freq_V = torch.bincount(r.completion_ids_BT[:, 0], minlength=p_V.numel()).float() / n
    se_V = (p_V * (1 - p_V) / n).sqrt()
    assert ((freq_V - p_V).abs() <= 5 * se_V + 1e-3).all()  # every token, none truncated (no top-k / top-p)


def test_tool_results_are_forced_in_and_masked():
    model = tiny(seed=1)
    task = EchoTool()
    with torch.no_grad():  # make the call end ">" likely so that some samples call the tool
        model.lm_head.weight[TOK.convert_tokens_to_ids(">")] += 2.0
    r = rollout_of(model, ["<12"] * 16, task=task, max_new_tokens=12)
    called = [i for i, t in enumerate(r.texts) if ">" in t]
    assert called, "no sample ended a call"
    for i in called:
        text, ids = r.texts[i], r.completion_ids_BT[i].tolist()
        k = ids.index(TOK.convert_tokens_to_ids(">"))  # the first call ends at completion token k
        result = task.tool_result(text[:k + 1])
        n_env = min(len(result), len(ids) - k - 1)
        assert r.mask_BT[i, k] == 1 and (r.mask_BT[i, k + 1:k + 1 + n_env] == 0).all()
        assert TOK.decode(ids[k + 1:k + 1 + n_env]) == result[:n_env] and text.startswith(text[:k + 1] + result[:n_env])


def models_for_test(same=False):
    teacher = tiny(seed=0)
    student = copy.deepcopy(teacher) if same else tiny(seed=1)
    return Models(teacher, student, TOK, {})


@pytest.mark.parametrize("method", ["opd", "opd_plus"])
@pytest.mark.parametrize("divergence, baseline, gamma, clip, reduction", [
    ("reverse_kl", "none", 0.0, None, "token"), ("forward_kl", "expected", 0.5, 0.5, "token"),
    ("jsd", "loo", 1.0, None, "sequence")])
def test_one_step_applies_the_independently_computed_update(method, divergence, baseline, gamma, clip, reduction):
    """One opd_step against a second computation: the same samples (same seed), advantages from plain loops over
    the closed forms, the surrogate and its gradient, the gradient clip, and Adam's first step."""
    config, rt = make(**SMALL, divergence=divergence, method=method, baseline=baseline, gamma=gamma,
                         log_u_clip=clip, reduction=reduction, grad_clip=0.05)
    teacher, student, tok, _ = models_for_test()
    tr = Trainer(config, TASK, teacher, copy.deepcopy(student), tok)
    # the reference, on an untouched copy of the student
    ref = copy.deepcopy(student)
    r = sample(ref, tok, [ex.prompt for ex in tr.batch(0)], TASK, tr.max_new_tokens,
               torch.Generator().manual_seed(config.optim.seed), temperature=1.0)
    with torch.no_grad():
        lt_BTV = torch.log_softmax(completion_logits(teacher, r), -1)
    ls_BTV = torch.log_softmax(completion_logits(ref.train(), r), -1)
    ids = r.completion_ids_BT[..., None]
    lt_BT, ls_BT = lt_BTV.gather(-1, ids)[..., 0], ls_BTV.gather(-1, ids)[..., 0]
    A, n_clipped = naive_advantages(divergence, method, gamma, baseline, ls_BT.detach(), lt_BT, r.mask_BT,
                                    ls_BTV.detach(), lt_BTV, SMALL["samples_per_prompt"], clip)
    A_BT = torch.tensor(A)
    n = r.mask_BT.sum() if reduction == "token" else r.mask_BT.shape[0]
    loss = -(A_BT * ls_BT * r.mask_BT).sum() / n
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    clipped = [g * min(1.0, config.optim.grad_clip / (norm + 1e-6)) for g in grads]
    before = [p.detach().clone() for p in tr.student.parameters()]

    m = opd_step(tr, 0)

    assert m["tokens"] == int(r.mask_BT.sum()) > 0 and m["clip_fraction"] == n_clipped / m["tokens"]
    assert m["loss"] == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-6)
    assert m["grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > config.optim.grad_clip  # the clip binds
    assert m["adv_abs_max"] == pytest.approx(float(A_BT.abs().max()), rel=1e-4)
    for p, p0, g in zip(tr.student.parameters(), before, clipped):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-3 * float(g.abs().max()) + 1e-9)
        big = g.abs() > 1e-5  # Adam's first step moves each weight by lr * g / (|g| + eps): about lr * sign(g)
        torch.testing.assert_close(p.detach()[big] - p0[big], -config.optim.lr * g[big] / (g[big].abs() + 1e-8),
                                   rtol=1e-2, atol=1e-3 * config.optim.lr)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), models_for_test()[1].parameters()))


def test_trainer_derives_its_state_from_the_config():
    config, rt = make(**SMALL, divergence="jsd", seed=3)
    teacher, student, tok, _ = models_for_test()
    tr = Trainer(config, TASK, teacher, student, tok)
    assert tr.div.name == "jsd" and tr.max_new_tokens == SMALL["max_new_tokens"]
    assert [ex.prompt for ex in tr.prompts] == [ex.prompt for ex in TASK.examples("train", 6, seed=3)]
    assert len(tr.eval_examples) == SMALL["eval_n"]
    with pytest.raises(TypeError):
        Trainer(config, TASK, teacher, student, tok, optimizer=None)


def test_teacher_equal_to_student_gives_zero_divergence_and_zero_expected_gradient():
    teacher, student, tok, _ = models_for_test(same=True)
    r = rollout_of(student, ["Q:1+2=", "Q:30-4="] * 4)
    logp_t_BT, logp_t_BTV = gather_logp(completion_logits(teacher, r).detach(), r.completion_ids_BT)
    logits_BTV = completion_logits(student, r)
    logp_s_BT, logp_s_BTV = gather_logp(logits_BTV, r.completion_ids_BT)
    for name in ("reverse_kl", "forward_kl", "jsd"):
        from opdlab.core.divergences import get
        div = get(name)
        assert div.exact(logp_t_BTV, logp_s_BTV.detach()).abs().max() < 1e-6
        opd = estimators.compute_advantages(div, logp_s_BT.detach(), logp_t_BT, r.mask_BT, "opd")
        assert opd.A_BT.abs().max() < 1e-6  # -f(1) = 0 at every token
        # OPD+ gives w_f(1) = f'(1) at every token: a constant, whose expected gradient vanishes
        plus = estimators.compute_advantages(div, logp_s_BT.detach(), logp_t_BT, r.mask_BT, "opd_plus")
        c = float(div.opd_plus_advantage(torch.zeros(())))
        assert torch.allclose(plus.A_BT, c * r.mask_BT, atol=1e-6)
        A_BTV = div.opd_plus_advantage(logp_t_BTV - logp_s_BTV.detach())
        expected = -(logp_s_BTV.detach().exp() * A_BTV * logp_s_BTV).sum(-1).mul(r.mask_BT).sum()
        grads = torch.autograd.grad(expected, list(student.parameters()), retain_graph=True, allow_unused=True)
        assert max(g.abs().max() for g in grads if g is not None) < 1e-5
    config, rt = make(**SMALL, divergence="forward_kl", method="opd_plus", baseline="expected")
    m = opd_step(Trainer(config, TASK, teacher, copy.deepcopy(student), tok), 0)
    assert m["exact_divergence"] < 1e-6 and m["adv_abs_max"] < 1e-6 and m["grad_norm"] < 1e-6


def test_interrupted_run_resumes_to_the_same_metrics(tmp_path):
    config, rt = make(**{**SMALL, "steps": 4, "checkpoint_every": 2}, divergence="jsd", method="opd",
                         lr_schedule="cosine")
    models = models_for_test()
    full = train(config, tmp_path / "full", rt, TASK, models)
    train(config, tmp_path / "cut", rt, TASK, models, stop_after=3)  # dies after step 3, ckpt at 2
    assert read_metrics(tmp_path / "cut")["step"].max() == 3
    resumed = train(config, tmp_path / "cut", rt, TASK, models)
    a = read_metrics(tmp_path / "full", volatile=False).drop(columns="run")
    b = read_metrics(tmp_path / "cut", volatile=False).drop(columns="run")
    assert len(resumed) == len(full) == len(a)
    assert a.equals(b)
    lrs = a[a["kind"] == "train"]["lr"].tolist()  # warm-up over 5% of steps (one), cosine decay to 10% of lr
    assert lrs == [warmup_cosine_lr(s, 4, config.optim.lr) for s in range(4)]
    assert lrs[0] == lrs[1] == config.optim.lr and 0.1 * config.optim.lr < lrs[3] < lrs[2] < config.optim.lr
    for name in ("config.json", "versions.json", "metrics.jsonl", "checkpoint/state.pt"):
        assert (tmp_path / "full" / name).exists()
    tidy = results([tmp_path / "full", tmp_path / "cut"], long=True)
    assert {"run", "step", "metric", "value", "divergence", "method"} <= set(tidy.columns)
    with pytest.raises(ValueError, match="different config"):
        train(config.replace(lr=1e-2), tmp_path / "full", rt, TASK, models)
    # interrupted before its first checkpoint: the restart starts over without keeping the orphan lines
    train(config, tmp_path / "early", rt, TASK, models, stop_after=1)
    assert not (tmp_path / "early" / "checkpoint" / "state.pt").exists()
    train(config, tmp_path / "early", rt, TASK, models)
    assert read_metrics(tmp_path / "early", volatile=False).drop(columns="run").equals(a)
    # a run started on another device is refused with a message, not a torch error from the generator state
    state_path = tmp_path / "cut" / "checkpoint" / "state.pt"
    state = torch.load(state_path, weights_only=False)
    torch.save({**state, "rng": {**state["rng"], "device": "cuda"}}, state_path)
    resign(state_path.parent)
    with pytest.raises(ValueError, match="was started on cuda and is being resumed on cpu"):
        train(config, tmp_path / "cut", rt, TASK, models)


def test_final_table_has_no_interval_for_a_single_seed():
    from opdlab.app.plots.training import final_table, mean_band
    evals = pd.DataFrame(dict(task="t", divergence="jsd", method=["opd"] * 2 + ["opd_plus"] * 4,
                              seed=[0, 0, 0, 0, 1, 1], step=[0, 5] * 3, greedy_accuracy=[.5, .4, .5, .6, .5, .8],
                              run=["a", "a", "b", "b", "c", "c"]))
    table = final_table(evals).set_index("method")
    assert math.isnan(table.loc["opd", "ci"]) and table.loc["opd", "n"] == 1
    assert table.loc["opd_plus", "mean"] == pytest.approx(0.7)
    assert table.loc["opd_plus", "ci"] == pytest.approx(12.706 * (0.02 ** 0.5) / 2 ** 0.5, rel=1e-4)
    assert mean_band(evals, ["method", "step"], "greedy_accuracy")["ci"].isna().sum() == 2


@pytest.mark.parametrize("bad, match", [
    (dict(divergence="kl_typo"), "divergence"), (dict(method="ppo"), "method"), (dict(gamma=1.5), "gamma"),
    (dict(baseline="mean"), "baseline"), (dict(log_u_clip=0), "log_u_clip"), (dict(steps=-1), "steps"),
    (dict(prompts_per_step=0), "prompts_per_step"), (dict(lr=0), "lr"), (dict(device="tpu"), "device"),
    (dict(baseline="loo", samples_per_prompt=1), "leave-one-out"), (dict(steps=2.5), "steps"),
    (dict(teacher_hidden=48), "multiple of 32"), (dict(reduction="mean"), "reduction"), (dict(lr_schedule="linear"), "lr_schedule"), (dict(device=None), "device"),
])
def test_bad_config_values_are_named(bad, match):
    with pytest.raises(UserError, match=match):
        make(**bad)
    with pytest.raises(UserError, match="unknown run field.*'stepz' \\(did you mean steps"):
        RunSpec.from_dict({"stepz": 3})


def test_a_top_k_teacher_trains_and_its_k0_limit_is_sampled_opd_plus(tmp_path):
    """teacher_topk: only the teacher's top-k and the sampled token's log-probabilities reach the estimator.
    At k = 0 (no support) it is one-sample OPD+, so the run's steps equal the dense run's; at k = 4 with the
    tail baseline it is another estimator of the same gradient, and trains."""
    models = models_for_test()
    runs = {}
    for name, fields in {"dense": {}, "k0": dict(teacher_topk=0), "k4": dict(teacher_topk=4, baseline="tail")}.items():
        spec, rt = make(**{**SMALL, "steps": 2}, divergence="forward_kl", method="opd_plus", **fields)
        train(spec, tmp_path / name, rt, TASK, models)
        runs[name] = read_metrics(tmp_path / name, volatile=False).query("kind == 'train'").reset_index(drop=True)
    for key in ("loss", "grad_norm", "adv_mean", "exact_divergence", "tokens"):
        assert runs["k0"][key].tolist() == pytest.approx(runs["dense"][key].tolist(), rel=1e-5, abs=1e-7), key
    # the first step samples the same tokens (same generator, same student); only the estimator differs
    assert runs["k4"]["grad_norm"].notna().all() and runs["k4"]["tokens"][0] == runs["dense"]["tokens"][0]
    assert runs["k4"]["loss"].tolist() != pytest.approx(runs["dense"]["loss"].tolist(), rel=1e-3)
    with pytest.raises(UserError, match="'expected' needs the teacher's whole distribution"):
        make(teacher_topk=4, baseline="expected")
    with pytest.raises(UserError, match="'opd_plus' with teacher_topk"):
        make(teacher_topk=4, method="opd")
