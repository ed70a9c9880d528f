"""The packed forward (opdlab.lm.packed): the same logits and the same gradients as the transformers forward
over the padded layout, with shared prompts, tool results, rows of different lengths, GQA and both archs."""
import pytest
import torch

from echo_tool import EchoTool
from opdlab.lm import packed
from opdlab.lm.sampling import completion_logits, sample
from test_decoder import PROMPTS, TASK, TOK, model_of


def rollout_of(model, task, prompts, seed=7):
    with torch.no_grad():  # make calls, answers and stops likely, so rows finish at different steps
        for c in (">", "\n"):
            model.lm_head.weight[TOK.convert_tokens_to_ids(c)] += 1.0
        model.lm_head.weight[TOK.eos_token_id] += 1.0
    return sample(model, TOK, prompts, task, 14, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch, kv_heads", [("qwen3", None), ("llama", None), ("llama", 2), ("qwen3", 1)])
@pytest.mark.parametrize("task", [TASK, EchoTool()], ids=["arithmetic", "tool"])
def test_packed_logits_and_gradients_equal_the_padded_forward(arch, kv_heads, task):
    model = model_of(arch, seed=2, kv_heads=kv_heads)
    prompts = [p for p in PROMPTS[:6] for _ in range(3)] + PROMPTS[:2]  # groups of 3 and two singles
    r = rollout_of(model, task, prompts)
    real = r.attention_BT.bool()
    assert r.attention_BT.sum(1).min() < r.attention_BT.sum(1).max()
    packing, _ = packed.pack_rollout(r)
    n_real = int(r.prompt_attention_BP.sum() + r.attention_BT.sum())
    assert len(packing.ids_N) < n_real  # prompts shared
    weights = torch.randn(r.completion_ids_BT.shape + (len(TOK),), generator=torch.Generator().manual_seed(1))
    out = {}
    for fast in (False, True):
        model.zero_grad()
        logits = completion_logits(model, r, fast=fast)
        (logits.log_softmax(-1) * weights * real[..., None]).sum().backward()
        out[fast] = logits.detach()[real], {n: p.grad.clone() for n, p in model.named_parameters()}
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    for name, grad in out[False][1].items():  # float rounding of sums in another order, relative to the norm
        assert (out[True][1][name] - grad).norm() <= 1e-5 * grad.norm(), name
    if isinstance(task, EchoTool):
        assert (r.mask_BT < r.attention_BT).any(), "no tool result was forced in"


def test_packed_logits_are_finite_past_a_rows_end_and_the_default_is_packed():
    model = model_of("qwen3", seed=2)
    r = rollout_of(model, TASK, PROMPTS)
    with torch.no_grad():
        assert torch.isfinite(completion_logits(model, r, fast=True)).all()
        assert torch.equal(completion_logits(model, r), completion_logits(model, r, fast=True))
    model.config.layer_types = ["sliding_attention"] * 2
    assert not packed.supports(model)


def test_rows_and_their_gradient_are_those_of_indexing_bit_for_bit():
    """``packed._rows`` (index_select, whose backward is index_add) against ``x[idx]``: the same values, and with
    repeated indices a gradient summed in index order whatever the thread count, which is what the backward of
    ``x[idx]`` (an accumulating index_put) gives on one thread: the faster backward changes no number trained
    on one thread (notebook 04's workers), and makes two threads give the same numbers as one."""
    x = torch.randn(300, 4, 16, requires_grad=True)
    idx = torch.randint(0, 300, (64, 40), generator=torch.Generator().manual_seed(0))  # ~8.5 uses per row
    g = torch.randn(64, 40, 4, 16)
    assert torch.equal(packed._rows(x, idx), x[idx])
    in_order = torch.zeros_like(x)
    for i, row in enumerate(idx.reshape(-1).tolist()):
        in_order[row] += g.reshape(-1, 4, 16)[i]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            (got,) = torch.autograd.grad((packed._rows(x, idx) * g).sum(), x)
            assert torch.equal(got, in_order), n
        torch.set_num_threads(1)
        (want,) = torch.autograd.grad((x[idx] * g).sum(), x)
        assert torch.equal(got, want)
    finally:
        torch.set_num_threads(threads)
