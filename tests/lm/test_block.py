"""The stacked block (opdlab.lm.block) over R = 3 runs: each run's slice of a stacked decode, sampling and packed
scoring equals that run's model alone to float rounding, gradients included, for Qwen3 and Llama with GQA; and
it catches a run given another run's weights (the counterfactual)."""
import pytest
import torch

from echo_tool import EchoTool
from opdlab.config.recipe import ModelRecipe
from opdlab.errors import UserError
from opdlab.lm import block, decoder, packed
from opdlab.lm.modeling import build_model
from opdlab.lm.sampling import completion_logits, sample
from opdlab.training.cohort import split_rollout
from test_decoder import PROMPTS, TASK, TOK, model_of

CASES = [("qwen3", 1), ("llama", 2)]


def models_of(arch, kv_heads, R=3, bias=True):
    """R models of one shape and different weights, calls, answers and stops made likely (run 1's <eos> row
    shifted further), so that rows and runs end at different steps (asserted where a test needs it)."""
    models = [model_of(arch, seed=10 + r, kv_heads=kv_heads) for r in range(R)]
    if bias:
        with torch.no_grad():  # calls, answers and stops likely: rows end at different steps
            for r, m in enumerate(models):
                for c in (">", "\n"):
                    m.lm_head.weight[TOK.convert_tokens_to_ids(c)] += 1.0
                m.lm_head.weight[TOK.eos_token_id] += 5.0 if r == 1 else 0.5
    return models


def prompts_of(rows):
    rows = [TOK.encode(p, add_special_tokens=False) for p in rows]
    P = max(map(len, rows))
    ids = torch.tensor([[TOK.pad_token_id] * (P - len(r)) + r for r in rows])
    return ids, (torch.arange(P)[None] >= torch.tensor([P - len(r) for r in rows])[:, None]).long()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("arch, kv_heads", CASES)
def test_a_stacked_decoder_gives_each_run_its_own_logits(arch, kv_heads, compiled):
    if compiled and arch == "llama":
        pytest.skip("one compiled case keeps the test short")
    models = models_of(arch, kv_heads)
    ids, attention = prompts_of(PROMPTS[:6] * 3)  # three runs of six rows, run-major
    follow = torch.randint(3, len(TOK), (18, 6), generator=torch.Generator().manual_seed(0))
    stacked = decoder.KVDecoder(models, 18, ids.shape[1] + 6, compiled=compiled)
    alone = [decoder.KVDecoder(m, 6, ids.shape[1] + 6) for m in models]
    got = stacked.prefill(ids, attention)
    for r, dec in enumerate(alone):
        assert torch.allclose(got[r * 6:(r + 1) * 6], dec.prefill(ids[r * 6:(r + 1) * 6], attention[:6]), atol=1e-5)
    # run 0 keeps 4 rows, run 1 one, run 2 all six: the slots shrink to 6, runs 0 and 1 padded with ended rows
    keeps = [torch.tensor([1, 0, 1, 1, 0, 1]), torch.tensor([0, 0, 0, 1, 0, 0]), torch.ones(6)]
    for t in range(5):
        if t == 2:
            stacked.keep(torch.cat(keeps).bool())
            for dec, keep in zip(alone, keeps):
                dec.keep(keep.bool())
            assert stacked.where is not None and stacked.rows.tolist() == [0, 2, 3, 5, 9, 12, 13, 14, 15, 16, 17]
        got = stacked.step(follow[stacked.rows, t])
        want = torch.cat([dec.step(follow[dec.rows + 6 * r, t]) for r, dec in enumerate(alone)])
        assert torch.allclose(got, want, atol=1e-5), t
    wrong = decoder.KVDecoder(models[1:2] + models[1:], 18, ids.shape[1] + 6)  # run 0 with run 1's weights
    own = decoder.KVDecoder(models[0], 6, ids.shape[1] + 6)
    assert not torch.allclose(wrong.prefill(ids, attention)[:6], own.prefill(ids[:6], attention[:6]), atol=1e-2)


@pytest.mark.parametrize("arch, kv_heads", CASES)
@pytest.mark.parametrize("task", [TASK, EchoTool()], ids=["arithmetic", "tool"])
def test_stacked_sampling_draws_each_runs_own_tokens_from_its_generator(arch, kv_heads, task):
    models = models_of(arch, kv_heads)
    prompts = [PROMPTS[r:r + 4] for r in range(3)]  # other prompts (and prompt widths) per run
    gens = [torch.Generator().manual_seed(7 + r) for r in range(3)]
    got = split_rollout(sample(models, TOK, [p for run in prompts for p in run], task, 24, gens), 3)
    lengths = []
    for r, m in enumerate(models):
        gen = torch.Generator().manual_seed(7 + r)
        want = sample(m, TOK, prompts[r], task, 24, gen)
        assert torch.equal(got[r].completion_ids_BT, want.completion_ids_BT), r
        assert torch.equal(got[r].prompt_ids_BP, want.prompt_ids_BP), r
        assert torch.equal(got[r].mask_BT, want.mask_BT) and torch.equal(got[r].attention_BT, want.attention_BT)
        assert got[r].texts == want.texts
        assert torch.allclose(got[r].logp_BT, want.logp_BT, atol=1e-5)
        assert torch.equal(gens[r].get_state(), gen.get_state()), f"run {r} drew another number of tokens"
        lengths.append(want.completion_ids_BT.shape[1])
    assert lengths[1] < max(lengths), "run 1 should end before the others (and then draw nothing)"
    if isinstance(task, EchoTool):
        assert any((g.mask_BT < g.attention_BT).any() for g in got), "no tool result was forced in"


@pytest.mark.parametrize("arch, kv_heads", CASES)
def test_stacked_packed_scoring_gives_each_run_its_own_logits_and_gradients(arch, kv_heads):
    models = models_of(arch, kv_heads)
    rollouts = [sample(m, TOK, [p for p in PROMPTS[r:r + 5] for _ in range(2)], EchoTool(), 14,
                       torch.Generator().manual_seed(r)) for r, m in enumerate(models)]
    assert len({r.completion_ids_BT.shape[1] for r in rollouts}) > 1, "runs of one length test no padding"
    weights = [torch.randn(r.completion_ids_BT.shape + (len(TOK),), generator=torch.Generator().manual_seed(1))
               for r in rollouts]

    def loss(x, r):
        return (x.log_softmax(-1) * weights[r] * rollouts[r].attention_BT[..., None]).sum()
    sum(loss(x, r) for r, x in enumerate(packed.stacked_completion_logits(models, rollouts))).backward()
    stacked = [{n: p.grad.clone() for n, p in m.named_parameters()} for m in models]
    for r, m in enumerate(models):
        m.zero_grad()
        want = completion_logits(m, rollouts[r])
        with torch.no_grad():
            got = packed.stacked_completion_logits(models, rollouts)[r]
        real = rollouts[r].attention_BT.bool()
        assert got.shape == want.shape and torch.allclose(got[real], want[real], atol=1e-5), r
        loss(want, r).backward()
        for name, p in m.named_parameters():
            assert (stacked[r][name] - p.grad).norm() <= 1e-5 * p.grad.norm(), (r, name)
    # the counterfactual: run 0 scored with run 1's weights is another function
    with torch.no_grad():
        other = packed.stacked_completion_logits([models[1]] + models[1:], rollouts)[0]
        real = rollouts[0].attention_BT.bool()
        assert not torch.allclose(other[real], completion_logits(models[0], rollouts[0])[real], atol=1e-2)


def test_the_stacked_embedding_gives_the_padding_row_no_gradient_as_nn_embedding():
    models = models_of("qwen3", None, bias=False)
    ids = torch.tensor([[TOK.pad_token_id, 5, 6, TOK.pad_token_id]] * 3)
    s = block.stack(models)
    (block.embed(s, ids) * torch.arange(32.0)).sum().backward()
    for m in models:
        want = torch.autograd.grad((m.model.embed_tokens(ids[0]) * torch.arange(32.0)).sum(),
                                   m.model.embed_tokens.weight)[0]
        assert torch.equal(m.model.embed_tokens.weight.grad, want)
        assert not m.model.embed_tokens.weight.grad[TOK.pad_token_id].any()


def test_a_stack_of_models_of_different_shapes_is_refused_by_name():
    small = model_of("qwen3")
    deeper = build_model(ModelRecipe(hidden=32, layers=3, heads=4, intermediate=64, seed=0), TOK)
    with pytest.raises(UserError, match="model 1 of the stack differs from model 0"):
        block.stack([small, deeper])
    with pytest.raises(UserError, match="multiple of 2 rows"):
        decoder.KVDecoder([small, small], 5, 8)
    with pytest.raises(UserError, match="one generator per model"):
        sample([small, small], TOK, PROMPTS[:2], TASK, 4, [torch.Generator()] * 3)
    with pytest.raises(UserError, match="needs the stacked decoder"):
        sample([small, small], TOK, PROMPTS[:2], TASK, 4, [torch.Generator()] * 2, fast=False)
