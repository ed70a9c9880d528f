"""The lean decode path (opdlab.lm.decoder): the same logits as the transformers forward, and the sampler draws
the same tokens from the same generator state with it as without it (tools, finished rows, GQA, both archs)."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from echo_tool import EchoTool
from opdlab.config.recipe import ModelRecipe
from opdlab.lm import decoder
from opdlab.lm.modeling import build_model
from opdlab.lm.sampling import sample
from opdlab.lm.tokenizer import char_tokenizer
from opdlab.tasks import get_task

TASK = get_task("arithmetic")
TOK = char_tokenizer(TASK.alphabet + "<>()")


def model_of(arch, seed=0, kv_heads=None):
    if kv_heads is None:
        return build_model(ModelRecipe(arch=arch, hidden=32, layers=2, heads=4, intermediate=64, seed=seed), TOK).eval()
    config = AutoConfig.for_model(arch, vocab_size=len(TOK), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8,
                                  intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
                                  pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


PROMPTS = ["Q:1+2=", "Q:12+34-5=", "Q:7=", "Q:100-99+1=", "<12", "Q:3+3="] * 6


@pytest.mark.parametrize("arch, kv_heads", [("qwen3", None), ("llama", None), ("llama", 2), ("qwen3", 1)])
def test_decoder_logits_equal_the_transformers_forward(arch, kv_heads):
    model = model_of(arch, kv_heads=kv_heads)
    assert decoder.supports(model)
    rows = [TOK.encode(p, add_special_tokens=False) for p in PROMPTS[:6]]
    P = max(map(len, rows))
    ids = torch.tensor([[TOK.pad_token_id] * (P - len(r)) + r for r in rows])
    attention = (torch.arange(P)[None] >= torch.tensor([P - len(r) for r in rows])[:, None]).long()
    follow = torch.randint(3, len(TOK), (6, 5), generator=torch.Generator().manual_seed(0))
    dec = decoder.KVDecoder(model, 6, P + 5)
    got = [dec.prefill(ids, attention)] + [dec.step(follow[:, t]) for t in range(4)]
    full = torch.cat([ids, follow], 1)
    att = torch.cat([attention, torch.ones_like(follow)], 1)
    with torch.no_grad():
        want = model(input_ids=full, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp_min(0)).logits
    for t in range(5):
        assert torch.allclose(got[t], want[:, P - 1 + t], atol=1e-5), t


@pytest.mark.parametrize("arch, kv_heads", [("qwen3", None), ("llama", 2)])
@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("task", [TASK, EchoTool()], ids=["arithmetic", "tool"])
def test_fast_and_plain_sampling_draw_the_same_tokens(arch, kv_heads, greedy, task):
    model = model_of(arch, seed=2, kv_heads=kv_heads)
    with torch.no_grad():  # make calls, answers and stops likely, so rows finish at different steps
        for c in (">", "\n"):
            model.lm_head.weight[TOK.convert_tokens_to_ids(c)] += 1.0
        model.lm_head.weight[TOK.eos_token_id] += 0.5
    out = {fast: sample(model, TOK, PROMPTS, task, 14, torch.Generator().manual_seed(7), greedy=greedy, fast=fast)
           for fast in (False, True)}
    plain, fast = out[False], out[True]
    assert torch.equal(plain.completion_ids_BT, fast.completion_ids_BT)
    assert torch.equal(plain.mask_BT, fast.mask_BT) and torch.equal(plain.attention_BT, fast.attention_BT)
    assert plain.texts == fast.texts
    assert torch.allclose(plain.logp_BT, fast.logp_BT, atol=1e-5)
    lengths = plain.attention_BT.sum(1)
    if not greedy:  # (greedy decoding of a random model repeats one token in every row)
        assert lengths.min() < lengths.max(), "rows should finish at different steps (the decoder drops them)"
    if isinstance(task, EchoTool) and not greedy:
        assert (plain.mask_BT < plain.attention_BT).any(), "no tool result was forced in"


@pytest.mark.parametrize("arch, kv_heads", [("qwen3", 1), ("llama", 2)])
def test_the_compiled_decode_step_gives_the_same_logits_and_tokens(arch, kv_heads):
    model = model_of(arch, seed=2, kv_heads=kv_heads)
    with torch.no_grad():  # calls, answers and stops likely: rows finish at different steps and are dropped
        for c in (">", "\n"):
            model.lm_head.weight[TOK.convert_tokens_to_ids(c)] += 1.0
        model.lm_head.weight[TOK.eos_token_id] += 0.5
    rows = [TOK.encode(p, add_special_tokens=False) for p in PROMPTS[:6]]
    P = max(map(len, rows))
    ids = torch.tensor([[TOK.pad_token_id] * (P - len(r)) + r for r in rows])
    attention = (torch.arange(P)[None] >= torch.tensor([P - len(r) for r in rows])[:, None]).long()
    follow = torch.randint(3, len(TOK), (6, 6), generator=torch.Generator().manual_seed(0))
    eager, compiled = decoder.KVDecoder(model, 6, P + 6), decoder.KVDecoder(model, 6, P + 6, compiled=True)
    for dec in (eager, compiled):
        dec.prefill(ids, attention)
    for t in range(5):
        if t == 2:  # drop two rows, as the sampler does when they end
            for dec in (eager, compiled):
                dec.keep(torch.tensor([True, False, True, True, False, True]))
        tok = follow[eager.rows, t]
        assert torch.allclose(compiled.step(tok), eager.step(tok), atol=1e-5), t
    for task in (TASK, EchoTool()):
        out = {c: sample(model, TOK, PROMPTS, task, 14, torch.Generator().manual_seed(7), compiled=c)
               for c in (False, True)}
        assert torch.equal(out[False].completion_ids_BT, out[True].completion_ids_BT)
        assert torch.equal(out[False].mask_BT, out[True].mask_BT) and out[False].texts == out[True].texts
        assert torch.allclose(out[False].logp_BT, out[True].logp_BT, atol=1e-5)
        lengths = out[False].attention_BT.sum(1)
        assert lengths.min() < lengths.max(), "rows should finish at different steps (the decoder drops them)"


def test_a_compile_that_cannot_run_here_says_so_in_one_line(tmp_path):
    """No working C++ compiler (torch.compile's CPU backend needs one): a ValueError that names the way out, not
    inductor's traceback. A fresh process, so that no compiled step is cached."""
    code = ("import torch\nfrom test_decoder import model_of, TOK, TASK\nfrom opdlab.lm.sampling import sample\n"
            "try:\n    sample(model_of('qwen3'), TOK, ['Q:1+2=', 'Q:3='], TASK, 4, torch.Generator(), compiled=True)\n"
            "except ValueError as err:\n    print('ValueError:', err)\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "c"),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "ValueError: compile_decode: torch.compile could not compile the decode step here" in out.stdout, \
        out.stdout + out.stderr[-2000:]
    assert "compile_decode=False" in out.stdout and "C++ compiler" in out.stdout


def test_past_torchs_recompile_limit_a_model_decodes_eagerly_with_a_warning():
    sample(model_of("qwen3"), TOK, PROMPTS, TASK, 6, torch.Generator().manual_seed(0), compiled=True)
    other = build_model(ModelRecipe(hidden=32, layers=3, heads=4, intermediate=64, seed=0), TOK).eval()
    with torch._dynamo.config.patch(recompile_limit=1):  # no room for another model size
        with pytest.warns(UserWarning, match="compile_decode: this process has compiled the decode step for as many"):
            got = sample(other, TOK, PROMPTS, TASK, 6, torch.Generator().manual_seed(0), compiled=True)
    want = sample(other, TOK, PROMPTS, TASK, 6, torch.Generator().manual_seed(0))
    assert torch.equal(got.completion_ids_BT, want.completion_ids_BT)


def test_unsupported_models_fall_back_to_the_transformers_forward():
    model = model_of("qwen3")
    model.config.layer_types = ["sliding_attention"] * 2
    assert not decoder.supports(model)
    with pytest.raises(ValueError, match="KVDecoder supports"):
        decoder.KVDecoder(model, 2, 8)
    model.config.layer_types = ["full_attention"] * 2
    model.config.hidden_act = "gelu"
    assert not decoder.supports(model)
    r = sample(model, TOK, PROMPTS[:4], TASK, 6, torch.Generator().manual_seed(0))  # plain path, no error
    assert r.completion_ids_BT.shape[0] == 4
