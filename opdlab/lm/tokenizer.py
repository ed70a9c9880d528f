"""Token ids: the character-level tokenizer, prompts (plain or through a chat template), the tokens that end a
completion, encoding a task example for SFT, padding id lists into a batch, and the checks that two models (or a
model and a task) read and write the same ids.

A sequence is ``prompt + target + <stop>``. An instruct model's tokenizer carries a chat template: its prompt is
the task's prompt as one user turn followed by the assistant header (``prompt_ids``), and its completion ends at
the template's end-of-turn token as well as at EOS (``stop_ids``). Base models and the character-level models
have no template and keep plain prompts. Prompt tokens and environment tokens (tool results, which the model
never produces) carry loss mask 0, in supervised training exactly as in distillation.
"""
from __future__ import annotations

import weakref

import torch

from opdlab.errors import UserError

__all__ = ["PAD", "EOS", "UNK", "char_tokenizer", "uses_chat_template", "prompt_ids", "end_of_turn_id", "stop_ids",
           "per_tokenizer", "encode_example", "collate", "check_compatible", "check_task_tokenizer"]

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
UNK_LIMIT = 0.01
"""The largest share of <unk> tokens ``check_task_tokenizer`` accepts in a task without an alphabet."""


def char_tokenizer(alphabet: str):
    """A character-level ``PreTrainedTokenizerFast``: ids 0, 1, 2 are <pad>, <eos>, <unk>, then one id per
    character of ``alphabet`` in sorted order. A BPE model with no merges splits text into characters and a
    Fuse decoder joins them back, so ``decode(encode(s)) == s`` for any s over the alphabet."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for ch in sorted(set(alphabet)):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left")


_PER_TOKENIZER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def per_tokenizer(tokenizer, key, compute):
    """``compute()`` once per tokenizer object and ``key``, then remembered for as long as the tokenizer lives
    (for what needs a pass over the vocabulary or a template rendering)."""
    store = _PER_TOKENIZER.setdefault(tokenizer, {})
    if key not in store:
        store[key] = compute()
    return store[key]


def uses_chat_template(tokenizer) -> bool:
    """Whether prompts go through the tokenizer's chat template: exactly when it has one (instruct models).
    Set ``tokenizer.chat_template = None`` to give a model plain prompts."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt``: as a single user turn of the chat template followed by the assistant header
    (``add_generation_prompt``) when the tokenizer has a template, else the plain text; no other special tokens."""
    if uses_chat_template(tokenizer):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return tokenizer.encode(prompt, add_special_tokens=False)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ...):
    the first special token after the content when a one-message assistant turn is rendered; None without a
    template."""
    def find():
        if not uses_chat_template(tokenizer):
            return None
        marker = "opdlab-end-of-turn-probe"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        after = tokenizer.encode(text[text.rfind(marker) + len(marker):], add_special_tokens=False)
        return next((i for i in after if i in special), None)
    return per_tokenizer(tokenizer, "end_of_turn", find)


def stop_ids(tokenizer) -> list[int]:
    """The tokens that end a completion: EOS, and the chat template's end-of-turn token when it differs."""
    eot = end_of_turn_id(tokenizer)
    return [tokenizer.eos_token_id] + ([eot] if eot is not None and eot != tokenizer.eos_token_id else [])


def encode_example(tokenizer, example) -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)`` of ``prompt + target + <stop>`` (``prompt_ids``; the stop is the end-of-turn token
    under a chat template, else <eos>). The loss mask is 1 on the target tokens the model writes and on the stop,
    0 on the prompt and on environment segments (tool results)."""
    ids = prompt_ids(tokenizer, example.prompt)
    mask = [0] * len(ids)
    for text, is_environment in example.target_segments:
        seg = tokenizer.encode(text, add_special_tokens=False)
        ids, mask = ids + seg, mask + [0 if is_environment else 1] * len(seg)
    return ids + [stop_ids(tokenizer)[-1]], mask + [1]


def collate(rows: list[list[int]], pad_id: int, left: bool = True) -> torch.Tensor:
    """Pad integer lists to one (B, T) long tensor, on the left (``left=True``) or the right."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            (out[i, T - len(r):] if left else out[i, :len(r)]).copy_(torch.tensor(r))
    return out


def check_compatible(teacher, student, teacher_tokenizer, student_tokenizer) -> None:
    """Raise a UserError unless teacher and student share a tokenizer and a vocabulary.

    OPD compares pi_T(y_t|c_t) and pi_theta(y_t|c_t) for the same token ids, so both models must read and
    write the same token ids: the same vocabulary (token -> id map) and output heads of the same size.
    """
    v_t, v_s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if v_t != v_s:
        only_t, only_s = sorted(set(v_t) - set(v_s))[:5], sorted(set(v_s) - set(v_t))[:5]
        raise UserError(
            f"teacher and student tokenizers differ ({len(v_t)} vs {len(v_s)} tokens; only in the teacher: "
            f"{only_t}, only in the student: {only_s}, or the same tokens with other ids); on-policy "
            "distillation needs one shared tokenizer")
    n_t, n_s = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if n_t != n_s:
        raise UserError(f"teacher and student vocabularies differ: output heads of {n_t} and {n_s} tokens; "
                         "on-policy distillation needs one shared vocabulary")


def check_task_tokenizer(model, tokenizer, task, path) -> None:
    """Raise a UserError unless ``tokenizer`` can write every character of ``task.alphabet`` (none becomes
    <unk>) and every token id it can produce has a row in the model's embedding. ``path`` names the checkpoint
    in the message. A task for pretrained tokenizers has no alphabet: there at most ``UNK_LIMIT`` of the tokens
    of a few training examples may be <unk>."""
    alphabet = getattr(task, "alphabet", "") or ""
    if not alphabet and hasattr(task, "examples") and tokenizer.unk_token_id is not None:
        texts = [ex.prompt + ex.target for ex in task.examples("train", 8, seed=0)]
        ids = [i for text in texts for i in tokenizer.encode(text, add_special_tokens=False)]
        share = ids.count(tokenizer.unk_token_id) / max(len(ids), 1)
        if share > UNK_LIMIT:
            raise UserError(f"the tokenizer of {path} turns {share:.0%} of the tokens of task {task.name!r} into "
                             f"{tokenizer.unk_token!r} (at most {UNK_LIMIT:.0%} allowed); it was made for another "
                             "task: use a checkpoint whose tokenizer can write this task's text")
    encoded = {ch: tokenizer.encode(ch, add_special_tokens=False) for ch in alphabet}
    missing = [ch for ch, ids in encoded.items() if not ids or tokenizer.unk_token_id in ids]
    if missing:
        raise UserError(f"the tokenizer of {path} cannot encode {len(missing)} of the {len(alphabet)} "
                         f"characters of task {task.name!r} ({''.join(missing)!r}); was it trained on another "
                         "task?")
    n_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_rows:
        raise UserError(f"the tokenizer of {path} has {len(tokenizer)} tokens but the model embeds only "
                         f"{n_rows}; they do not belong together")
