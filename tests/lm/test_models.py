"""opdlab.lm: character tokenizer round-trip, save/load, the vocabulary check, SFT masks and the recipe cache."""
import json
import math

import pytest
import torch

from opdlab.config.recipe import ModelRecipe
from opdlab.config.spec import RunSpec
from opdlab.lm import cache
from opdlab.lm.modeling import build_model, load_model, save_model
from opdlab.lm.tokenizer import char_tokenizer, check_compatible, encode_example
from opdlab.tasks import Example, get_task

TINY = ModelRecipe(hidden=16, layers=1, heads=1, intermediate=32, sft_steps=3, sft_batch=4, max_len=64)


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer
    task = get_task("arithmetic")
    tok = char_tokenizer(task.alphabet)
    text = "".join(ex.prompt + ex.target for ex in task.examples("train", 5, seed=0))
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert again.get_vocab() == tok.get_vocab() and again.decode(again.encode(text, add_special_tokens=False)) == text
    assert tok.decode([tok.eos_token_id] + ids, skip_special_tokens=True) == text


def test_save_and_load_local_checkpoint(tmp_path):
    tok = char_tokenizer("ab\n")
    model = build_model(TINY, tok).eval()
    save_model(model, tok, tmp_path / "ckpt", meta={"note": 1})
    loaded, tok2 = load_model(tmp_path / "ckpt")
    ids = torch.tensor([tok.encode("abba\nab", add_special_tokens=False)])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tok2.get_vocab() == tok.get_vocab() and tok2.padding_side == "left"
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text()) == {"note": 1}
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        load_model(tmp_path / "missing")


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_architectures_build(arch):
    model = build_model(ModelRecipe(arch=arch, hidden=32, layers=1, heads=1, intermediate=64), char_tokenizer("xy"))
    assert model.config.model_type == arch and model.config.vocab_size == 5


def test_mismatched_vocabularies_are_refused(tmp_path):
    tok_a, tok_b = char_tokenizer("abc"), char_tokenizer("abd")
    m_a, m_b = build_model(TINY, tok_a), build_model(TINY, tok_b)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_compatible(m_a, m_b, tok_a, tok_b)
    m_big = build_model(TINY, char_tokenizer("abcdef"))
    with pytest.raises(ValueError, match="vocabularies differ"):
        check_compatible(m_a, m_big, tok_a, tok_a)
    # and through the config, with local checkpoint directories
    save_model(m_a, tok_a, tmp_path / "t")
    save_model(m_b, tok_b, tmp_path / "s")
    from opdlab.training.models import load_models
    config = RunSpec.from_dict(dict(teacher_path=str(tmp_path / "t"), student_path=str(tmp_path / "s")))
    with pytest.raises(ValueError, match="tokenizers differ"):
        load_models(config, task=None)
    # a local checkpoint whose tokenizer cannot write the task's characters is refused before any training
    save_model(m_a, tok_a, tmp_path / "s")
    with pytest.raises(ValueError, match=r"tokenizer of .*/t cannot encode 18 of the 18 characters of task"):
        load_models(config, task=get_task("arithmetic"))


def test_environment_segments_are_masked_out_of_sft():
    tok = char_tokenizer("abc<>=0123456789")
    ex = Example(prompt="a=", answer="3", target_segments=(("<c>", False), ("=3", True), ("b", False)))
    ids, mask = encode_example(tok, ex)
    assert tok.decode(ids, skip_special_tokens=True) == "a=<c>=3b" and ids[-1] == tok.eos_token_id
    assert mask == [0, 0, 1, 1, 1, 0, 0, 1, 1]


def test_sft_lowers_the_loss_and_the_cache_trains_once(tmp_path, monkeypatch):
    task = get_task("arithmetic")
    recipe = ModelRecipe(hidden=32, layers=1, heads=1, intermediate=64, sft_steps=20, sft_batch=16, sft_lr=1e-2)
    calls = []
    real_sft = cache.sft
    monkeypatch.setattr(cache, "sft", lambda *a, **k: calls.append(1) or real_sft(*a, **k))
    model, tok, meta = cache.cached_model(task, recipe, "teacher", "cpu", tmp_path, eval_n=8, progress=False)
    assert meta["final_sft_loss"] < math.log(len(tok)) - 0.5 and 0 <= meta["greedy_accuracy"] <= 1 and len(calls) == 1
    again, _, meta2 = cache.cached_model(task, recipe, "teacher", "cpu", tmp_path, eval_n=8, progress=False)
    assert len(calls) == 1 and meta2 == meta
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))
    assert recipe.key("arithmetic", task.alphabet) != ModelRecipe(**{**recipe.__dict__, "seed": 1}).key(
        "arithmetic", task.alphabet)


@pytest.mark.parametrize("bad, match", [
    (dict(arch="gpt9"), "unknown architecture"), (dict(hidden=30, heads=4), "divisible"),
    (dict(layers=0), "layers must be a positive"), (dict(sft_lr=0.0), "sft_lr"),
    (dict(layers=True), "layers must be a positive"), (dict(sft_steps=1.5), "sft_steps must be an integer"),
    (dict(seed=-1), "seed must be an integer"), (dict(sft_lr="fast"), "sft_lr must be a positive number"),
    (dict(sft_target=0.0), "sft_target"), (dict(sft_target=1.2), "sft_target"), (dict(sft_target=True), "sft_target"),
])
def test_bad_recipes(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelRecipe(**bad)


def test_a_warm_up_target_stops_supervised_training_at_the_first_check_that_reaches_it(tmp_path, monkeypatch):
    task = get_task("arithmetic")
    recipe = ModelRecipe(hidden=32, layers=1, heads=1, intermediate=64, sft_steps=100, sft_batch=8, sft_lr=1e-2,
                         sft_target=0.5)
    scored = []
    # the check scores training-split prompts, never the held-out set: report 0.2, 0.4, then 0.6
    monkeypatch.setattr(cache, "greedy_accuracy", lambda model, tok, task_, examples, **k: (
        scored.append([ex.prompt for ex in examples]) or (0.2 * len(scored) if len(scored) <= 3 else 0.0)))
    _, _, meta = cache.cached_model(task, recipe, "student", "cpu", tmp_path, eval_n=8, progress=False)
    assert meta["sft_steps_taken"] == 3 * 25 and len(scored) == 4  # three checks, then the held-out score
    train_prompts = {ex.prompt for ex in task.examples("train", 2000, seed=recipe.seed + 20_000)}
    assert set(scored[0]) <= train_prompts and not set(scored[0]) & {ex.prompt for ex in task.examples("test", 500)}
    # a recipe without a target keeps the cache key it had before targets existed
    assert ModelRecipe().key("arithmetic", "ab") == "cb6d0a7c2b21fbde"
    assert recipe.key("arithmetic", "ab") != ModelRecipe(**{**recipe.__dict__, "sft_target": None}).key(
        "arithmetic", "ab")


def test_a_task_without_an_alphabet_asks_for_pretrained_checkpoints(tmp_path):
    class Pretrained:
        name, alphabet = "pretrained_only", ""
    with pytest.raises(ValueError, match="'pretrained_only' is meant for a pretrained model's tokenizer"):
        cache.cached_model(Pretrained(), TINY, "teacher", "cpu", tmp_path, progress=False)
    assert not any(tmp_path.iterdir())
