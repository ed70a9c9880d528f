"""opdlab.integrations.trl: inside TRL's DistillationTrainer, on the completions TRL sampled, the loss and the
student's gradient are opdlab's own surrogate (estimators.baselined_advantages + reinforce_loss on gather_logp of
the same logits) to float rounding; bad combinations are refused by name; two CPU processes train and log."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from opdlab.config.choices import FIXED_DIVERGENCES  # noqa: E402
from opdlab.config.recipe import ModelRecipe  # noqa: E402
from opdlab.core import divergences, estimators, sparse  # noqa: E402
from opdlab.errors import UserError  # noqa: E402
from opdlab.integrations.trl import OPDConfig, OPDTrainer  # noqa: E402
from opdlab.lm.modeling import build_model  # noqa: E402
from opdlab.lm.sampling import gather_logp  # noqa: E402
from opdlab.lm.tokenizer import char_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ALPHABET = "0123456789+-= "
PROMPTS = ["1+2=", "13-4=", "7+70=", "5 5=", "9-9=", "2+22="]
RTOL = 1e-5  # float32 rounding of two forwards that order their sums differently, relative to the gradient's size


def _recipe(seed: int, hidden: int = 32) -> ModelRecipe:
    return ModelRecipe(hidden=hidden, layers=2, heads=2, intermediate=2 * hidden, max_len=64, seed=seed)


def _trainer(tmp_path, tok=None, teacher_tok=None, teacher=None, **opd):
    tok = tok or char_tokenizer(ALPHABET)
    teacher = teacher or build_model(_recipe(1, 48), tok)
    args = OPDConfig(**{**dict(output_dir=str(tmp_path), per_device_train_batch_size=len(PROMPTS),
                               max_completion_length=24, bf16=False, use_cpu=True, report_to="none",
                               save_strategy="no", disable_tqdm=True, seed=0), **opd})
    return OPDTrainer(model=build_model(_recipe(0), tok), teacher_model=teacher, args=args, processing_class=tok,
                      teacher_processing_class=teacher_tok, train_dataset=Dataset.from_dict({"prompt": PROMPTS}))


def _sampled(trainer):
    """A batch TRL generated from the student itself, as its training step sees it."""
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS])
    lengths = inputs["completion_mask"].sum(1)
    assert lengths.min() < lengths.max() and lengths.float().mean() > 3, "ragged, not tiny: padding is exercised"
    return inputs


def _logp(model, inputs):
    """``(logp_BT, logp_BTV)`` of the completion tokens from one forward over prompt + completion, positions
    counting real tokens (opdlab's own alignment, written independently of the integration)."""
    P = inputs["prompt_ids"].shape[1]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(1) - 1).clamp_min(0)).logits
    return gather_logp(logits[:, P - 1:-1].float(), inputs["completion_ids"])


def _reference(trainer, inputs, method, gamma=0.0, baseline="none", log_u_clip=None, reduction="token"):
    """opdlab's surrogate on the same completions."""
    a = trainer.args
    mask = inputs["completion_mask"].float()
    with torch.no_grad():
        lt, lt_V = _logp(trainer.teacher_model, inputs)
    ls, ls_V = _logp(trainer.model, inputs)
    if method == "full_vocabulary":
        return estimators.full_vocabulary_loss(a.divergence, ls_V, lt_V, mask, reduction)
    adv = estimators.baselined_advantages(a.divergence, ls.detach(), lt, mask, method, gamma, baseline, ls_V.detach(),
                                          lt_V, None, log_u_clip)
    return estimators.reinforce_loss(ls, adv.A_BT, mask, reduction)


def _grad(trainer, loss):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _assert_same(loss, grad, ref_loss, ref_grad):
    scale = float(ref_grad.abs().max())
    assert scale > 0
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=RTOL * abs(float(ref_loss)))
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=RTOL * scale)


CASES = ([(d, m, {}) for d in ("reverse_kl", "forward_kl", "jsd") for m in ("opd", "opd_plus")]
         + [(d, "opd_plus", {}) for d in FIXED_DIVERGENCES[3:] + ("gjsd:0.3", "alpha:0.5", "alpha:-1")]
         + [("forward_kl", "opd_plus", dict(gamma=0.9, baseline="expected", log_u_clip=0.05)),
            ("jsd", "opd", dict(gamma=1.0, baseline="loo")),
            ("reverse_kl", "opd_plus", dict(gamma=0.5, reduction="sequence")),
            ("jsd", "full_vocabulary", {}), ("forward_kl", "full_vocabulary", dict(reduction="sequence"))])


@pytest.mark.parametrize("divergence,method,extra", CASES, ids=[f"{d}-{m}-{'-'.join(e)}" for d, m, e in CASES])
def test_loss_and_gradient_are_opdlabs_surrogate(tmp_path, divergence, method, extra):
    trainer = _trainer(tmp_path, divergence=divergence, method=method, **extra)
    inputs = _sampled(trainer)
    loss = trainer.compute_loss(trainer.model, inputs)
    grad, loss = _grad(trainer, loss), loss.detach()
    ref = _reference(trainer, inputs, method, **extra)
    _assert_same(loss, grad, ref.detach(), _grad(trainer, ref))
    # the comparison can fail: the same check against the other method's surrogate (or, for the full-vocabulary
    # loss, the sampled OPD+ one) is far outside the tolerance
    other = {"opd": "opd_plus", "opd_plus": "opd", "full_vocabulary": "opd_plus"}[method]
    wrong = _reference(trainer, inputs, other, **({} if method == "full_vocabulary" else extra))
    with pytest.raises(AssertionError):
        _assert_same(loss, grad, wrong.detach(), _grad(trainer, wrong))
    if method != "full_vocabulary":
        assert set(trainer._metrics["train"]) >= {"opd/clip_fraction", "opd/exact_divergence", "entropy"}
        if extra.get("log_u_clip"):
            assert trainer._metrics["train"]["opd/clip_fraction"][-1] > 0, "the clip bound nowhere: untested"


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_a_top_k_teacher_runs_opdlabs_sparse_estimator_with_its_exact_limits(tmp_path, divergence):
    """teacher_topk: k = V is the full-vocabulary gradient, k = 0 (no baseline) sampled OPD+; in between the loss is
    opdlab.core.sparse's surrogate on the same completions."""
    trainer = _trainer(tmp_path, divergence=divergence, method="opd_plus", teacher_topk=0)
    inputs = _sampled(trainer)
    V = trainer.model.config.vocab_size
    mask = inputs["completion_mask"].float()

    def close(loss, ref):
        g, g_ref = _grad(trainer, loss), _grad(trainer, ref)
        torch.testing.assert_close(g, g_ref, rtol=RTOL, atol=RTOL * float(g_ref.abs().max()))

    for k, method in ((0, "opd_plus"), (V, "full_vocabulary")):
        trainer.args.teacher_topk = k
        close(trainer.compute_loss(trainer.model, inputs), _reference(trainer, inputs, method))
    trainer.args.teacher_topk, trainer.args.baseline = 2, "tail"
    loss = trainer.compute_loss(trainer.model, inputs)
    with torch.no_grad():
        lt, lt_V = _logp(trainer.teacher_model, inputs)
    ls, ls_V = _logp(trainer.model, inputs)
    top = lt_V.topk(2, -1)
    ref = sparse.sparse_loss(divergence, ls_V, inputs["completion_ids"], sparse.TopK(top.indices, top.values, lt),
                             mask, baseline="tail")
    close(loss, ref)
    with pytest.raises(AssertionError):  # and it differs from the dense estimator it replaces
        close(trainer.compute_loss(trainer.model, inputs), _reference(trainer, inputs, "opd_plus"))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_accumulated_micro_batches_give_the_whole_batchs_gradient(tmp_path, reduction):
    """Gradient accumulation over two halves of a generation batch (as TRL splits it) sums to the gradient of
    opdlab's surrogate over the whole batch: the normaliser is the global one, not each micro-batch's."""
    from trl.trainer.utils import split_tensor_dict

    trainer = _trainer(tmp_path, divergence="forward_kl", method="opd_plus", baseline="expected", gamma=0.5,
                       reduction=reduction, per_device_train_batch_size=len(PROMPTS) // 2,
                       gradient_accumulation_steps=2)
    inputs = _sampled(trainer)
    trainer.current_gradient_accumulation_steps = 2  # what Trainer sets for the window
    halves = split_tensor_dict(inputs, 2)
    assert halves[0]["completion_mask"].sum() != halves[1]["completion_mask"].sum(), "equal halves test less"
    grad = sum(_grad(trainer, trainer.compute_loss(trainer.model, h)) for h in halves)
    ref = _reference(trainer, inputs, "opd_plus", gamma=0.5, baseline="expected", reduction=reduction)
    ref_grad = _grad(trainer, ref)
    torch.testing.assert_close(grad, ref_grad, rtol=RTOL, atol=RTOL * float(ref_grad.abs().max()))
    if reduction == "sequence":  # halves of equal size: their own means average to the whole batch's
        return
    # each half normalised by its own token count instead (the per-micro-batch mean) is another gradient
    own = sum(_grad(trainer, _reference(trainer, h, "opd_plus", gamma=0.5, baseline="expected", reduction=reduction))
              for h in halves) / 2
    assert not torch.allclose(own, ref_grad, rtol=RTOL, atol=RTOL * float(ref_grad.abs().max()))


def test_a_clip_changes_the_gradient_it_is_compared_with(tmp_path):
    """The clip reaches the advantages: with a tight clip the loss is not the unclipped surrogate."""
    trainer = _trainer(tmp_path, divergence="forward_kl", method="opd_plus", log_u_clip=0.05)
    inputs = _sampled(trainer)
    loss = trainer.compute_loss(trainer.model, inputs)
    grad, loss = _grad(trainer, loss), loss.detach()
    unclipped = _reference(trainer, inputs, "opd_plus")
    with pytest.raises(AssertionError):
        _assert_same(loss, grad, unclipped.detach(), _grad(trainer, unclipped))


def test_the_logged_entropy_and_divergence_are_the_students(tmp_path):
    trainer = _trainer(tmp_path, divergence="jsd", method="opd_plus")
    inputs = _sampled(trainer)
    trainer.compute_loss(trainer.model, inputs)
    mask = inputs["completion_mask"].float()
    with torch.no_grad():
        _, ls_V = _logp(trainer.model, inputs)
        _, lt_V = _logp(trainer.teacher_model, inputs)
    n = mask.sum()
    entropy = float((-(ls_V.exp() * ls_V).sum(-1) * mask).sum() / n)
    D = float((divergences.get(trainer.args.divergence).exact(lt_V, ls_V) * mask).sum() / n)
    logged = trainer._metrics["train"]
    assert logged["entropy"][-1] == pytest.approx(entropy, rel=RTOL)
    assert logged["opd/exact_divergence"][-1] == pytest.approx(D, rel=1e-4)  # a small number: relative rounding


def test_training_logs_the_estimators_statistics(tmp_path):
    trainer = _trainer(tmp_path, divergence="jsd", method="opd_plus", baseline="loo", max_steps=2, logging_steps=1,
                       learning_rate=1e-3)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        assert all(k in h for k in ("opd/exact_divergence", "opd/clip_fraction", "opd/adv_mean", "grad_norm"))
        assert h["opd/exact_divergence"] > 0 and torch.isfinite(torch.tensor(h["loss"]))
    evaluated = trainer.evaluate(Dataset.from_dict({"prompt": PROMPTS}))  # TRL's eval path: the batch's own mean
    assert evaluated["eval_opd/exact_divergence"] > 0 and "eval_opd/adv_mean" in evaluated


@pytest.mark.parametrize("setting,phrase", [
    (dict(divergence="kl_forward"), "allowed: reverse_kl, forward_kl"),
    (dict(divergence="gjsd:2"), "[0, 1]"),
    (dict(method="grpo"), "opd, opd_plus, full_vocabulary"),
    (dict(baseline="mean"), "none, expected, loo"),
    (dict(gamma=1.5), "gamma"),
    (dict(beta=0.5), "gjsd"),
    (dict(temperature=0.7), "temperature=1.0"),
    (dict(method="opd_plus", top_k=20), "'top_k': 20"),
    (dict(method="opd", top_p=0.9), "only method='full_vocabulary'"),
    (dict(method="opd_plus", generation_kwargs={"do_sample": False}), "do_sample"),
    (dict(method="full_vocabulary", baseline="expected"), "no advantages"),
    (dict(method="opd_plus", teacher_topk=8, baseline="expected"), "none, tail, loo"),
    (dict(method="opd", teacher_topk=8), "method='opd_plus'"),
    (dict(method="opd_plus", teacher_topk=-1), "int >= 0"),
    (dict(divergence="gjsd:0"), "trains nothing"),       # refused as the run spec refuses it (check_trainable)
    (dict(divergence="gjsd:1"), "trains nothing"),
    (dict(divergence="gjsd:1e-9"), "trains nothing"),
])
def test_bad_settings_are_refused_by_name(tmp_path, setting, phrase):
    with pytest.raises(UserError, match=None) as err:
        OPDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **setting)
    assert phrase in str(err.value)


def test_the_full_vocabulary_loss_accepts_other_sampling(tmp_path):
    OPDConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", method="full_vocabulary", top_k=20)


def test_teacher_and_student_tokenizers_must_agree(tmp_path):
    tok = char_tokenizer(ALPHABET)
    shuffled = char_tokenizer(ALPHABET.replace(" ", "*"))  # one character swapped: the same vocabulary size
    assert len(shuffled) == len(tok) and shuffled.get_vocab() != tok.get_vocab()
    with pytest.raises(UserError, match="tokenizers differ"):
        _trainer(tmp_path, tok=tok, teacher_tok=shuffled)
    other_template = char_tokenizer(ALPHABET)
    tok.chat_template, other_template.chat_template = "{{ messages }}", "{{ messages }}!"
    with pytest.raises(UserError, match="chat templates"):
        _trainer(tmp_path, tok=tok, teacher_tok=other_template)
    _trainer(tmp_path, tok=tok, teacher_tok=tok)  # the same one passes


def test_only_an_opd_config_is_taken(tmp_path):
    from trl import DistillationConfig
    tok = char_tokenizer(ALPHABET)
    with pytest.raises(UserError, match="OPDConfig"):
        OPDTrainer(model=build_model(_recipe(0), tok), teacher_model=build_model(_recipe(1), tok),
                   args=DistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
                   processing_class=tok)


@pytest.mark.slow
def test_two_cpu_processes_train_and_log(tmp_path):
    """examples/trl_opd_plus.py under torchrun: two gloo processes, three steps, the metrics written."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "trl_opd_plus.py"), "--steps", "3", "--output-dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "log_history.json").read_text())
    assert record["num_processes"] == 2
    steps = [h for h in record["log_history"] if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2, 3]
    assert all(h["opd/exact_divergence"] > 0 and h["grad_norm"] > 0 for h in steps)


def test_without_trl_the_import_says_how_to_get_it():
    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    import opdlab.integrations.trl\nexcept ImportError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "pip install 'opdlab[trl]'" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["token"])  # "sequence" passes too (about 30 s more)
def test_two_processes_step_along_the_global_batchs_gradient(tmp_path, reduction):
    """Two gloo processes, one SGD step at lr 1 without clipping (tests/integrations/trl_ddp_step.py): the update is minus the
    gradient of opdlab's surrogate over both ranks' completions together, normalised by the global batch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "integrations" / "trl_ddp_step.py"), str(tmp_path), "forward_kl", reduction]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "weights.pt")
    assert saved["num_processes"] == 2
    tok = char_tokenizer(ALPHABET)
    student, teacher = build_model(_recipe(0), tok), build_model(_recipe(1, 48), tok)
    student.load_state_dict(saved["initial"])
    ranks = [torch.load(tmp_path / f"inputs{r}.pt") for r in range(2)]
    assert not torch.equal(ranks[0]["completion_ids"], ranks[1]["completion_ids"]), "the ranks sampled alike"
    n = sum(float(r["completion_mask"].sum()) for r in ranks) if reduction == "token" else len(PROMPTS)
    parts = []  # each rank's summed surrogate ("sequence" times its B) over the global normaliser
    for inputs in ranks:
        mask = inputs["completion_mask"].float()
        with torch.no_grad():
            lt, lt_V = _logp(teacher, inputs)
        ls, ls_V = _logp(student, inputs)
        adv = estimators.baselined_advantages("forward_kl", ls.detach(), lt, mask, "opd_plus", 0.0, "expected",
                                              ls_V.detach(), lt_V)
        parts.append(estimators.reinforce_loss(ls, adv.A_BT, mask, "sequence") * mask.shape[0] / n)
    names = [k for k, _ in student.named_parameters()]

    def flat(loss):
        grads = torch.autograd.grad(loss, list(student.parameters()), retain_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    step = torch.cat([(saved["initial"][k] - saved["final"][k]).reshape(-1) for k in names])
    ref = flat(parts[0] + parts[1])
    torch.testing.assert_close(step, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # the check can fail: rank 0's completions alone (normalised by its own count) are another step
    share = float(ranks[0]["completion_mask"].sum()) / n if reduction == "token" else 0.5
    with pytest.raises(AssertionError):
        torch.testing.assert_close(step, flat(parts[0] / share), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
