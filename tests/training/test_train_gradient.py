"""The training path itself against the exact gradient: at fixed (teacher-forced) contexts of a small model, the
mean over many resampled tokens of the gradient of ``step.loss`` (what ``opd_step`` applies) equals
the full-vocabulary gradient, within a tolerance from the standard error; stop-gradient forward KL does not.
Also the reference methods and ``opdlab.experiments.noise``."""
import math

import pytest
import torch

from opdlab.config.recipe import ModelRecipe
from opdlab.config.spec import RunSpec
from opdlab.core import divergences, estimators
from opdlab.errors import UserError
from opdlab.experiments import noise
from opdlab.lm.modeling import build_model
from opdlab.lm.sampling import completion_logits, gather_logp, sample
from opdlab.lm.tokenizer import char_tokenizer
from opdlab.tasks import get_task
from opdlab.training.step import Scores, loss as step_loss
from runs import make

TASK = get_task("arithmetic")
TOK = char_tokenizer(TASK.alphabet)
K = 600  # resampled tokens per context


def _model(seed, hidden=32):
    return build_model(ModelRecipe(hidden=hidden, layers=1, heads=2, intermediate=2 * hidden, seed=seed), TOK)


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    teacher, student = _model(1).eval(), _model(2)
    prompts = ["Q:12+7=", "Q:40-13+2=", "Q:5+5=", "Q:99-9="]
    rollout = sample(student.eval(), TOK, prompts, TASK, 8, torch.Generator().manual_seed(0))
    return teacher, student, rollout


def _gradients(config, teacher, student, rollout, directions_DP=None):
    """The full-vocabulary gradient g_P, and (given directions) the K resampled surrogate gradients projected on
    them, shape (K, D)."""
    div = divergences.get(config.objective.divergence)
    params = list(student.parameters())
    ids_BT, mask_BT = rollout.completion_ids_BT, rollout.mask_BT
    with torch.no_grad():
        _, lt_BTV = gather_logp(completion_logits(teacher, rollout), ids_BT)
    student.eval()  # as opd_step scores it
    _, ls_BTV = gather_logp(completion_logits(student, rollout), ids_BT)

    def flat(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]).double()

    g_P = flat(estimators.full_vocabulary_loss(div, ls_BTV, lt_BTV, mask_BT, config.objective.reduction))
    if directions_DP is None:
        return g_P, None
    gen = torch.Generator().manual_seed(1)
    probs = ls_BTV.detach().exp().reshape(-1, ls_BTV.shape[-1])
    proj_KD = []
    for _ in range(K):
        y_BT = torch.multinomial(probs, 1, generator=gen).reshape(ids_BT.shape)
        scores = Scores(lt_BTV.gather(-1, y_BT[..., None])[..., 0], lt_BTV, ls_BTV.gather(-1, y_BT[..., None])[..., 0],
                        ls_BTV)
        loss, _ = step_loss(config.objective, div, scores, mask_BT, config.optim.samples_per_prompt)
        proj_KD.append(directions_DP @ flat(loss))
    return g_P, torch.stack(proj_KD)


def _directions(n_params, g_P=None, n_random=3):
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randn(n_params, generator=gen, dtype=torch.float64) for _ in range(n_random)]
    if g_P is not None:
        rows.insert(0, g_P)
    return torch.stack([r / r.norm() for r in rows])


@pytest.mark.parametrize("divergence,baseline,reduction", [
    ("reverse_kl", "expected", "token"), ("forward_kl", "none", "token"), ("jsd", "expected", "sequence"),
    ("hellinger", "none", "sequence")])
def test_mean_resampled_opd_plus_gradient_is_the_full_vocabulary_gradient(setting, divergence, baseline, reduction):
    teacher, student, rollout = setting
    config = RunSpec.from_dict(dict(divergence=divergence, method="opd_plus", baseline=baseline, reduction=reduction))
    g_P, _ = _gradients(config, teacher, student, rollout)
    D = _directions(g_P.numel(), g_P)
    _, proj_KD = _gradients(config, teacher, student, rollout, D)
    exact_D = D @ g_P
    se_D = proj_KD.std(0) / math.sqrt(K)
    z_D = (proj_KD.mean(0) - exact_D) / se_D
    assert bool((z_D.abs() < 4.5).all()), z_D  # 4 directions: a false alarm has probability < 3e-5


def test_stop_gradient_forward_kl_is_far_from_its_gradient_on_the_training_path(setting):
    """The same comparison has the power to see the bias: stop-gradient forward KL misses by many SE."""
    teacher, student, rollout = setting
    config = RunSpec.from_dict(dict(divergence="forward_kl", method="opd", baseline="none"))
    g_P, _ = _gradients(config, teacher, student, rollout)
    D = _directions(g_P.numel(), g_P, n_random=0)
    _, proj_KD = _gradients(config, teacher, student, rollout, D)
    z = (proj_KD.mean(0) - D @ g_P) / (proj_KD.std(0) / math.sqrt(K))
    assert float(z.abs().max()) > 10


def test_reference_methods_are_their_losses(setting):
    teacher, student, rollout = setting
    ids_BT, mask_BT = rollout.completion_ids_BT, rollout.mask_BT
    ls_BT, ls_BTV = gather_logp(completion_logits(student, rollout), ids_BT)
    lt_BT, lt_BTV = gather_logp(completion_logits(teacher, rollout), ids_BT)
    base, scores = RunSpec.from_dict(dict(divergence="jsd")), Scores(lt_BT, lt_BTV, ls_BT, ls_BTV)
    full, adv = step_loss(base.replace(method="full_vocabulary").objective, divergences.get("jsd"), scores, mask_BT, 1)
    D_BT = divergences.get("jsd").exact(lt_BTV, ls_BTV)
    assert adv is None and torch.allclose(full, (D_BT * mask_BT).sum() / mask_BT.sum())
    kd, adv = step_loss(base.replace(method="supervised_kd").objective, divergences.get("jsd"), scores, mask_BT, 1)
    assert adv is None and torch.allclose(kd, -(ls_BT * mask_BT).sum() / mask_BT.sum())


def test_token_noise_reports_an_unbiased_estimator_and_its_noise_scale(setting):
    teacher, student, rollout = setting
    out = noise.token_noise(RunSpec.from_dict(dict(divergence="reverse_kl", baseline="expected")), teacher, student, rollout,
                            n_resamples=200)
    assert out["tokens"] == int(rollout.mask_BT.sum())
    assert out["bias_rel"] < 4 * out["bias_se"]  # unbiased: the mean misses by about its standard error
    assert out["B_noise"] > 0 and -1 <= out["cos_min"] <= out["cos_mean"] <= out["cos_max"] <= 1
    # one draw's cosine is about 1 / sqrt(1 + B_noise / tokens)
    predicted = 1 / math.sqrt(1 + out["B_noise"] / out["tokens"])
    assert abs(out["cos_mean"] - predicted) < 0.15, (out, predicted)
    with pytest.raises(ValueError, match="leave-one-out"):
        noise.token_noise(RunSpec.from_dict(dict(baseline="loo")), teacher, student, rollout)
    with pytest.raises(ValueError, match="sampled estimator"):
        noise.token_noise(RunSpec.from_dict(dict(method="full_vocabulary")), teacher, student, rollout)
    tokens = noise.sampled_tokens(RunSpec.from_dict(dict(baseline="expected")), teacher, student, rollout)
    assert len(tokens) == int(rollout.mask_BT.sum()) and tokens["log_u"].notna().all()
    share = noise.tail_share(tokens, (0.05, 0.25, 1.0))["A2_share"].tolist()
    assert 0 <= share[0] <= share[1] <= share[2] and abs(share[2] - 1) < 1e-12


def test_reference_arms_train_end_to_end(tmp_path):
    """``supervised_kd`` samples from the teacher (its completions score like the teacher's), ``full_vocabulary``
    from the student; both log no advantage statistics and lower their loss's own target on a fixed batch."""
    from test_train import SMALL, TASK as T, models_for_test

    from opdlab.rundir.reader import read_metrics
    from opdlab.training.loop import train
    from opdlab.training.step import Trainer, opd_step

    models = models_for_test()
    for method in ("supervised_kd", "full_vocabulary"):
        config, runtime = make(**SMALL, divergence="reverse_kl", method=method)
        train(config, tmp_path / method, runtime, T, models)
        steps = read_metrics(tmp_path / method)
        steps = steps[steps.kind == "train"]
        assert len(steps) == config.optim.steps and steps["loss"].notna().all()
        assert "adv_mean" not in steps.columns or steps["adv_mean"].isna().all()
    # the supervised arm's completions are the teacher's: with one shared generator state, the same tokens
    teacher, student, tok, _ = models
    config, _ = make(**SMALL, method="supervised_kd")
    tr = Trainer(config, T, teacher, student, tok)
    state = tr.generator.get_state()
    from opdlab.lm.sampling import sample
    expect = sample(teacher, tok, [ex.prompt for ex in tr.batch(0)], T, tr.max_new_tokens,
                    torch.Generator().set_state(state), temperature=1.0)
    metrics = opd_step(tr, 0)
    assert metrics["tokens"] == expect.n_sampled


@pytest.mark.parametrize("gamma, baseline, clip", [(0.0, "none", None), (1.0, "loo", None), (0.5, "expected", 2.0)])
def test_step_noise_measures_whole_steps_and_falls_with_the_batch(gamma, baseline, clip):
    """noise.step_noise: finite, positive numbers for every estimator setting opd_step takes (γ, leave-one-out,
    clip), and a relative variance that falls when the step holds 8x the prompts (the same student)."""
    from opdlab.training.step import Trainer

    teacher, student = _model(1).eval(), _model(2).eval()
    config = RunSpec.from_dict(dict(prompts_per_step=2, samples_per_prompt=2, steps=1, max_new_tokens=8,
                                    gamma=gamma, baseline=baseline, log_u_clip=clip, divergence="forward_kl"))
    # the signal |E g|^2 is estimated as |mean|^2 - tr Cov / K: reliable where the relative variance of one step
    # is well below K, so the small step has 4 prompts and there are 16 batches
    small = noise.step_noise(Trainer(config.replace(prompts_per_step=4), TASK, teacher, student, TOK), n_batches=16)
    big = noise.step_noise(Trainer(config.replace(prompts_per_step=32), TASK, teacher, student, TOK), n_batches=16)
    for r in (small, big):
        assert all(math.isfinite(v) and v > 0 for v in r.values() if not isinstance(v, str)), r
    assert big["tokens"] > 4 * small["tokens"]  # 8x the tokens: tr Cov of a mean falls about 8x
    assert big["variance"] < small["variance"] / 4 and big["relative_variance"] < small["relative_variance"] / 2
    with pytest.raises(ValueError, match="n_batches"):
        noise.step_noise(Trainer(config, TASK, teacher, student, TOK), n_batches=1)
    with pytest.raises(UserError, match="the student's own samples"):  # its completions come from the teacher
        noise.step_noise(Trainer(config.replace(method="supervised_kd"), TASK, teacher, student, TOK))
    full = noise.step_noise(Trainer(config.replace(method="full_vocabulary", prompts_per_step=4), TASK, teacher,
                                    student, TOK), n_batches=4)  # noisy too: its contexts are sampled
    assert full["variance"] > 0 and full["log_relative_variance_se"] > 0


def test_step_noise_of_several_trainers_is_one_call_per_trainer():
    """noise.step_noise([t_1, ..., t_n]) draws and scores each batch once for every estimator: the numbers equal,
    bit for bit, n calls with a trainer each (every one draws the same batches), top-k and full-vocabulary arms
    included; trainers that would draw other batches are refused."""
    from opdlab.training.step import Trainer

    teacher, student = _model(1).eval(), _model(2).eval()
    config = RunSpec.from_dict(dict(prompts_per_step=4, samples_per_prompt=2, steps=1, max_new_tokens=8,
                                    divergence="forward_kl", baseline="expected"))
    arms = [dict(method="opd_plus"), dict(method="opd", divergence="jsd", baseline="loo"),
            dict(method="opd_plus", teacher_topk=1, baseline="tail"), dict(method="full_vocabulary")]

    def trainers():
        return [Trainer(config.replace(**arm), TASK, teacher, student, TOK) for arm in arms]
    alone = [noise.step_noise(tr, n_batches=3) for tr in trainers()]
    together = trainers()
    shared = noise.step_noise(together, n_batches=3)
    assert shared == alone  # every float of every dict, exactly
    assert len({r["relative_variance"] for r in shared}) == len(arms)  # four estimators, four measurements
    assert all(torch.equal(t.generator.get_state(), together[0].generator.get_state()) for t in together)
    assert noise.step_noise(trainers()[:1], n_batches=3) == alone[:1]  # a list of one: a list back
    with pytest.raises(ValueError, match="trainer 1 differs"):  # another seed draws other batches
        noise.step_noise([Trainer(config, TASK, teacher, student, TOK),
                          Trainer(config.replace(seed=1), TASK, teacher, student, TOK)], n_batches=2)
    with pytest.raises(ValueError, match="trainer 1 differs"):  # another student object
        noise.step_noise([Trainer(config, TASK, teacher, student, TOK),
                          Trainer(config, TASK, teacher, _model(2).eval(), TOK)], n_batches=2)
    moved = trainers()[:2]  # trainer 1 has drawn already: alone it would draw other batches
    noise.student_rollout(moved[1])
    with pytest.raises(ValueError, match="trainer 1 differs"):
        noise.step_noise(moved, n_batches=2)
    with pytest.raises(ValueError, match="empty list"):
        noise.step_noise([])
