"""Token ids: the character-level tokenizer, encoding a task example for SFT, padding id lists into a batch,
and the checks that two models (or a model and a task) read and write the same ids.

A sequence is ``prompt + target + <eos>``. Prompt tokens and environment tokens (tool results, which the model
never produces) carry loss mask 0, in supervised training exactly as in distillation.
"""
from __future__ import annotations

import torch

__all__ = ["PAD", "EOS", "UNK", "char_tokenizer", "encode_example", "collate", "check_compatible",
           "check_task_tokenizer"]

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


def encode_example(tokenizer, example) -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)`` of ``prompt + target + <eos>``. The loss mask is 1 on the target tokens the model
    writes and on <eos>, 0 on the prompt and on environment segments (tool results)."""
    ids = tokenizer.encode(example.prompt, add_special_tokens=False)
    mask = [0] * len(ids)
    for text, is_environment in example.target_segments:
        seg = tokenizer.encode(text, add_special_tokens=False)
        ids, mask = ids + seg, mask + [0 if is_environment else 1] * len(seg)
    return ids + [tokenizer.eos_token_id], mask + [1]


def collate(rows: list[list[int]], pad_id: int, left: bool = True) -> torch.Tensor:
    """Pad integer lists to one (B, T) long tensor, on the left (``left=True``) or the right."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            (out[i, T - len(r):] if left else out[i, :len(r)]).copy_(torch.tensor(r))
    return out


def check_compatible(teacher, student, teacher_tokenizer, student_tokenizer) -> None:
    """Raise a ValueError unless teacher and student share a tokenizer and a vocabulary.

    OPD compares pi_T(y_t|c_t) and pi_theta(y_t|c_t) for the same token ids, so both models must read and
    write the same token ids: the same vocabulary (token -> id map) and output heads of the same size.
    """
    v_t, v_s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if v_t != v_s:
        only_t, only_s = sorted(set(v_t) - set(v_s))[:5], sorted(set(v_s) - set(v_t))[:5]
        raise ValueError(
            f"teacher and student tokenizers differ ({len(v_t)} vs {len(v_s)} tokens; only in the teacher: "
            f"{only_t}, only in the student: {only_s}, or the same tokens with other ids); on-policy "
            "distillation needs one shared tokenizer")
    n_t, n_s = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if n_t != n_s:
        raise ValueError(f"teacher and student vocabularies differ: output heads of {n_t} and {n_s} tokens; "
                         "on-policy distillation needs one shared vocabulary")


def check_task_tokenizer(model, tokenizer, task, path) -> None:
    """Raise a ValueError unless ``tokenizer`` can write every character of ``task.alphabet`` (none becomes
    <unk>) and every token id it can produce has a row in the model's embedding. ``path`` names the checkpoint
    in the message. A task for pretrained tokenizers has no alphabet: there at most ``UNK_LIMIT`` of the tokens
    of a few training examples may be <unk>."""
    alphabet = getattr(task, "alphabet", "") or ""
    if not alphabet and hasattr(task, "examples") and tokenizer.unk_token_id is not None:
        texts = [ex.prompt + ex.target for ex in task.examples("train", 8, seed=0)]
        ids = [i for text in texts for i in tokenizer.encode(text, add_special_tokens=False)]
        share = ids.count(tokenizer.unk_token_id) / max(len(ids), 1)
        if share > UNK_LIMIT:
            raise ValueError(f"the tokenizer of {path} turns {share:.0%} of the tokens of task {task.name!r} into "
                             f"{tokenizer.unk_token!r} (at most {UNK_LIMIT:.0%} allowed); it was made for another "
                             "task: use a checkpoint whose tokenizer can write this task's text")
    encoded = {ch: tokenizer.encode(ch, add_special_tokens=False) for ch in alphabet}
    missing = [ch for ch, ids in encoded.items() if not ids or tokenizer.unk_token_id in ids]
    if missing:
        raise ValueError(f"the tokenizer of {path} cannot encode {len(missing)} of the {len(alphabet)} "
                         f"characters of task {task.name!r} ({''.join(missing)!r}); was it trained on another "
                         "task?")
    n_rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_rows:
        raise ValueError(f"the tokenizer of {path} has {len(tokenizer)} tokens but the model embeds only "
                         f"{n_rows}; they do not belong together")
