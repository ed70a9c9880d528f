"""opdlab.core.objective, the one table of what each method is: it names exactly the methods of config.choices,
its loss is each method's own estimator bit for bit (and not another's), what it says a method logs is what the
step logs, and its labels are the ones figures and arms use."""
import dataclasses

import pytest
import torch

from opdlab.app.plots import METHOD_STYLE
from opdlab.config import choices
from opdlab.config.spec import Objective
from opdlab.core import divergences, estimators, objective, sparse
from opdlab.errors import UserError
from opdlab.training import step


def test_the_table_names_exactly_the_methods_of_choices():
    assert tuple(objective.TABLE) == choices.TRAIN_METHODS
    assert objective.names(sampled=True) == choices.METHODS
    assert objective.names(sampled=False) == choices.REFERENCE_METHODS
    assert {m.samples_from for m in objective.TABLE.values()} <= {"student", "teacher"}
    assert objective.names(samples_from="teacher") == ("supervised_kd",)
    for name, method in objective.TABLE.items():
        assert method.name == name
        assert method.logs == (objective.ADVANTAGE_METRICS if method.sampled else ())


def test_every_label_has_a_style_and_every_style_a_label():
    assert set(METHOD_STYLE) == set(objective.LABELS)
    assert objective.label("opd_plus_topk") == "OPD+ from the teacher's top-k"
    assert objective.label("no such method") == "no such method"


@pytest.mark.parametrize("method", choices.TRAIN_METHODS)
def test_the_methods_that_take_a_top_k_teacher_are_the_ones_a_spec_accepts(method):
    takes = objective.get(method).topk_loss is not None
    assert takes == (method in objective.names_with_topk())
    if takes:
        Objective(method=method, teacher_topk=1)
    else:
        with pytest.raises(UserError, match="teacher_topk"):
            Objective(method=method, teacher_topk=1)


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(UserError, match="allowed: opd, opd_plus, full_vocabulary, supervised_kd"):
        objective.get("grpo")


def _scores(B=4, T=5, V=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits_s = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_(True)
    logp_s_BTV = torch.log_softmax(logits_s, -1)
    logp_t_BTV = torch.log_softmax(2 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    ids = torch.multinomial(logp_s_BTV.detach().exp().reshape(-1, V), 1, generator=g).reshape(B, T)
    mask = (torch.rand(B, T, generator=g) > 0.2).double()
    scores = objective.Scores(logp_t_BTV.gather(-1, ids[..., None])[..., 0], logp_t_BTV,
                              logp_s_BTV.gather(-1, ids[..., None])[..., 0], logp_s_BTV, ids)
    return scores, mask, logits_s


def _direct(o, div, s, mask, G):
    """Each method's estimator called as its own module writes it, without the table."""
    if o.teacher_topk is not None:
        payload = sparse.topk_payload(s.logp_teacher_BTV, s.ids_BT, o.teacher_topk)
        return sparse.sparse_surrogate(div, s.logp_student_BTV, s.ids_BT, payload, mask, o.gamma, o.baseline, G,
                                       o.log_u_clip, o.reduction)[0]
    if o.method == "full_vocabulary":
        return estimators.full_vocabulary_loss(div, s.logp_student_BTV, s.logp_teacher_BTV, mask, o.reduction)
    if o.method == "supervised_kd":
        return estimators.supervised_loss(s.logp_student_BT, mask, o.reduction)
    adv = estimators.baselined_advantages(div, s.logp_student_BT.detach(), s.logp_teacher_BT, mask, o.method,
                                          o.gamma, o.baseline, s.logp_student_BTV.detach(), s.logp_teacher_BTV, G,
                                          o.log_u_clip)
    return estimators.reinforce_loss(s.logp_student_BT, adv.A_BT, mask, o.reduction)


OBJECTIVES = [Objective(method="opd"), Objective(method="opd_plus", gamma=0.5, baseline="loo", log_u_clip=1.0),
              Objective(divergence="forward_kl", method="opd_plus", baseline="expected", reduction="sequence"),
              Objective(method="full_vocabulary"), Objective(method="supervised_kd"),
              Objective(divergence="jsd", method="opd_plus", teacher_topk=2, baseline="tail")]


@pytest.mark.parametrize("o", OBJECTIVES, ids=lambda o: f"{o.method}-{o.teacher_topk}-{o.baseline}")
def test_the_loss_is_each_methods_own_estimator_bit_for_bit(o):
    scores, mask, logits = _scores()
    div = divergences.get(o.divergence)
    value, terms = objective.loss(o, div, scores, mask, 2)
    direct = _direct(o, div, scores, mask, 2)
    assert torch.equal(value, direct)
    g, g_direct = (torch.autograd.grad(x, logits, retain_graph=True)[0] for x in (value, direct))
    assert torch.equal(g, g_direct)
    assert (terms is None) == (objective.get(o.method).logs == ())
    # the comparison can fail: another method's estimator on the same scores is another gradient
    other = {"opd": "opd_plus", "opd_plus": "opd", "full_vocabulary": "opd_plus", "supervised_kd": "opd_plus"}
    swapped = dataclasses.replace(o, method=other[o.method], teacher_topk=None,
                                  baseline="none" if o.baseline == "tail" else o.baseline)
    assert not torch.allclose(torch.autograd.grad(_direct(swapped, div, scores, mask, 2), logits)[0], g)


def test_the_reduction_can_be_overridden_and_a_top_k_needs_its_method():
    scores, mask, _ = _scores()
    div = divergences.get("reverse_kl")
    o = Objective(method="opd_plus", reduction="token")
    seq = objective.loss(o, div, scores, mask, reduction="sequence")[0]
    assert torch.equal(seq, objective.loss(dataclasses.replace(o, reduction="sequence"), div, scores, mask)[0])
    assert not torch.equal(seq, objective.loss(o, div, scores, mask)[0])
    settings = type("Settings", (), dict(method="opd", gamma=0.0, baseline="none", log_u_clip=None,
                                         reduction="token", teacher_topk=1))()  # e.g. an unchecked TRL config
    with pytest.raises(UserError, match="teacher_topk needs method 'opd_plus', got 'opd'"):
        objective.loss(settings, div, scores, mask)
    with pytest.raises(UserError, match="ids_BT"):
        objective.loss(Objective(method="opd_plus", teacher_topk=1), div, dataclasses.replace(scores, ids_BT=None),
                       mask)


def test_what_a_method_logs_is_what_the_step_logs():
    """step.step_metrics logs the advantage metrics exactly when the loss returned advantages, and a method's
    ``logs`` say whether it does (test_the_loss_is_each_methods_own_estimator_bit_for_bit)."""
    part = dict(loss=torch.tensor(1.0), D=torch.ones(3), mask=torch.ones(3), H=torch.ones(3),
                lengths=torch.tensor([3.0]), tokens=3, stopped=torch.ones(1), truncated=torch.zeros(1),
                correct=[True])
    common = set(step.step_metrics([part], 1.0))
    with_terms = dict(part, A=torch.tensor([0.5, -1.0]), log_u=torch.tensor([0.1, 0.2]), n_clipped=1, n_tokens=2)
    assert set(step.step_metrics([with_terms], 1.0)) - common == set(objective.ADVANTAGE_METRICS)


def test_arm_labels_come_from_the_table():
    assert objective.arm_label("opd_plus", "forward_kl") == "OPD+ forward KL"
    assert objective.arm_label("opd_plus", "jsd", 1) == "OPD+ Jensen-Shannon, top-1 teacher"
    assert objective.arm_label("supervised_kd", "jsd") == "supervised KD"
    with pytest.raises(UserError, match="unknown method"):
        objective.arm_label("grpo", "jsd")
