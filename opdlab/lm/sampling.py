"""Sampling completions from a causal LM with a KV cache and tool pauses, and aligning log-probabilities.

The OPD estimator needs samples from the student pi_theta itself (docs/math.md §6): temperature 1 and no
top-k/top-p truncation. ``transformers``' ``generate`` takes its defaults from ``generation_config`` (which
may set ``top_k=50``) and cannot pause for a tool, so this module samples with its own small loop: one
forward per position over the whole batch, reusing the KV cache, drawing ``y_t ~ softmax(logits / 1)`` over
the full vocabulary with an explicit ``torch.Generator``.

Prompts go through the chat template where the tokenizer has one (``opdlab.lm.tokenizer.prompt_ids``).

Tool use. When a sampled token completes ``task.call_end``, ``task.tool_result(text)`` runs the call and its
result is *forced* into that sequence, one token per step, while the other sequences keep sampling; forced
tokens are environment tokens and get ``mask = 0`` (never in the loss). A sequence ends at a stop token (<eos>,
or the chat template's end-of-turn), when ``task.finished(text)``, or at ``max_new_tokens``.

BPE tokenizers merge characters: a call's closing ``</call>`` may end inside a token that also holds the next
characters (``</call>\n``). Only tokens whose text contains the marker's last character can end a call or an
answer (the trigger tokens, found once per tokenizer with one pass over the vocabulary); at those the decoded
text is searched for a marker that ends inside the new token, and the call is cut there.

Layout. Prompts are left-padded to P columns and completions right-padded to T columns, so completion token
t of every row sits at column P + t and is predicted by the logits at column P + t - 1 (``completion_logits``).
Position ids count real tokens only (``cumsum(attention) - 1``), the same in sampling and in scoring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from opdlab.errors import UserError
from opdlab.lm import decoder, packed
from opdlab.lm.device import autocast
from opdlab.lm.tokenizer import collate, per_tokenizer, prompt_ids, stop_ids

__all__ = ["Rollout", "sample", "completion_logits", "gather_logp", "greedy_accuracy", "sampled_accuracy",
           "completion_budget", "RUN_BUDGET_MARGIN", "CHECK_BUDGET_MARGIN"]

RUN_BUDGET_MARGIN = 8
"""Tokens past the longest of 500 training targets that a run samples (``step.max_new_tokens``: training,
evaluation, ``opdlab eval``). Every committed run and its figures were sampled with this budget."""

CHECK_BUDGET_MARGIN = 16
"""Tokens past the longest target of the examples scored that ``sampled_accuracy`` allows when given no budget:
the model cache's SFT stopping check and its held-out accuracy (``lm.cache``). It differs from
``RUN_BUDGET_MARGIN`` because the check decides when supervised training stops, so it fixes the cached teacher
and warm-up weights behind every committed number; making the two one margin would move those weights or every
run's completions."""


def completion_budget(examples, margin: int) -> int:
    """``max_e len(e.target) + margin``: a completion budget in tokens from targets measured in characters (a
    token holds at least one character, so a completion as long as its target fits)."""
    return max(len(ex.target) for ex in examples) + margin


@dataclass
class Rollout:
    """A batch of prompts and the completions sampled for them.

    Attributes:
        prompt_ids_BP: left-padded prompt tokens; prompt_attention_BP: 1 on real prompt tokens.
        completion_ids_BT: right-padded completion tokens (sampled and environment).
        mask_BT: 1 on tokens the model sampled (including a final <eos>), 0 on environment tokens and padding.
        attention_BT: 1 on every real completion token (sampled or environment), 0 on padding.
        logp_BT: the sampler's log-probability of each token (no gradient); meaningful where mask_BT = 1.
        texts: the decoded completions, environment text included, <eos> excluded.
    """

    prompt_ids_BP: torch.Tensor
    prompt_attention_BP: torch.Tensor
    completion_ids_BT: torch.Tensor
    mask_BT: torch.Tensor
    attention_BT: torch.Tensor
    logp_BT: torch.Tensor
    texts: list[str]

    def full(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids_BL, attention_BL, position_ids_BL)`` of prompt and completion side by side, L = P + T."""
        ids = torch.cat([self.prompt_ids_BP, self.completion_ids_BT], 1)
        attention = torch.cat([self.prompt_attention_BP, self.attention_BT], 1)
        return ids, attention, positions(attention)

    @property
    def n_sampled(self) -> int:
        """Number of tokens the model sampled (the tokens that carry a loss)."""
        return int(self.mask_BT.sum())


def positions(attention_BL: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only: ``cumsum(attention) - 1``, clamped at 0 on left padding."""
    return (attention_BL.long().cumsum(-1) - 1).clamp_min(0)


def _trigger_ids(tokenizer, chars: set[str]) -> torch.Tensor:
    """Ids of the tokens whose text contains any of ``chars`` (only these can end a call or an answer); the
    vocabulary is decoded once per tokenizer, and the ids once per set of characters."""
    texts = per_tokenizer(tokenizer, "token_texts", lambda: tokenizer.batch_decode(
        [[i] for i in range(len(tokenizer))]))
    return per_tokenizer(tokenizer, ("triggers", frozenset(chars)), lambda: torch.tensor(
        [i for i, text in enumerate(texts) if any(c in text for c in chars)], dtype=torch.long))


def marker_end(text: str, marker: str, new_chars: int) -> int | None:
    """The index just past an occurrence of ``marker`` in ``text`` that ends within its last ``new_chars``
    characters (the newest token's text), or None."""
    at = text.rfind(marker, max(0, len(text) - new_chars - len(marker) + 1))
    return None if at < 0 else at + len(marker)


def _cache_kwargs(model) -> dict:
    """A fresh ``DynamicCache`` under the keyword this transformers version takes (``cache`` in 5.x,
    ``past_key_values`` before); the model fills it in place."""
    import inspect

    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: DynamicCache(config=model.config)}


def _next_token(logits_BV: torch.Tensor, greedy: bool, generator, temperature: float, live_B: torch.Tensor):
    """Draw from softmax(logits / temperature) over the full vocabulary (no top-k, no top-p), or argmax.

    ``generator`` may be a list of R generators, one per run of B / R rows (run-major): run r's rows are drawn
    from generator r, and a run whose rows have all ended (``live_B``) draws nothing, as it would have stopped
    alone; every run thus draws the tokens it draws by itself."""
    logp_BV = torch.log_softmax(logits_BV.float() / temperature, -1)
    if greedy:
        tok_B = logp_BV.argmax(-1)
    elif isinstance(generator, (list, tuple)):
        n = len(logits_BV) // len(generator)
        tok_B = torch.zeros(len(logits_BV), dtype=torch.long, device=logits_BV.device)
        for r in torch.nonzero(live_B.view(len(generator), n).any(1)).flatten().tolist():
            tok_B[r * n:(r + 1) * n] = torch.multinomial(logp_BV[r * n:(r + 1) * n].exp(), 1,
                                                         generator=generator[r]).squeeze(1)
    else:
        tok_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(1)
    return tok_B, logp_BV.gather(1, tok_B[:, None]).squeeze(1)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], task=None, max_new_tokens: int = 64,
           generator: torch.Generator | None = None, greedy: bool = False, temperature: float = 1.0,
           fast: bool | None = None, compiled: bool = False) -> Rollout:
    """Sample one completion per prompt from ``model`` (KV cache), pausing for tools; see the module doc.

    ``fast`` (None: wherever ``decoder.supports(model)``) decodes with ``decoder.KVDecoder``, a static KV cache
    and the bare arithmetic of the model's blocks, instead of the ``transformers`` forward; both draw the same
    tokens from the same generator state up to float rounding of the logits (``tests/lm/test_decoder.py``);
    ``compiled`` runs its decode steps through ``torch.compile`` (``KVDecoder(compiled=True)``; ignored without
    ``fast``).

    Several runs at once: ``model`` a list of R models of one architecture and size, ``prompts`` R groups of
    equally many (run-major), ``generator`` a list of R generators; group r is sampled from model r with
    generator r (one stacked decoder, ``fast`` only), drawing what that model alone would draw from that
    generator, up to float rounding of the logits; ``opdlab.training.cohort.sample_runs`` splits the result by run.

    ``temperature`` must stay 1.0 for the OPD estimator (``opd_step`` passes it explicitly); another value
    samples from softmax(logits / temperature), and the rollout's log-probabilities are then of that
    distribution, not of pi_theta.
    """
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise UserError(f"temperature must be a positive number (1.0 samples from the model itself), "
                         f"got {temperature!r}")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    model, device = models[0] if len(models) == 1 else models, next(models[0].parameters()).device
    if isinstance(generator, (list, tuple)) and (len(generator) != len(models) or len(prompts) % len(models)):
        raise UserError(f"sampling {len(models)} model(s) needs one generator per model and equally many prompts "
                        f"per model; got {len(generator)} generators for {len(prompts)} prompts")
    pad = tokenizer.pad_token_id
    rows = [prompt_ids(tokenizer, p) for p in prompts]
    prompt_BP, prompt_att = collate(rows, pad).to(device), collate([[1] * len(r) for r in rows], 0).to(device)
    B = len(prompts)
    stops = torch.tensor(stop_ids(tokenizer), device=device)
    ends = {task.stop[-1]} if task is not None and getattr(task, "stop", None) else set()
    call_end = getattr(task, "call_end", None) if task is not None and task.has_tools else None
    triggers = _trigger_ids(tokenizer, ends | ({call_end[-1]} if call_end else set())).to(device)
    tokens, masks, logps, reals = [], [], [], []
    done, forced = torch.zeros(B, dtype=torch.bool, device=device), [[] for _ in range(B)]
    texts_ids: list[list[int]] = [[] for _ in range(B)]

    fast = decoder.supports(models[0]) if fast is None else fast
    if len(models) > 1 and not fast:
        raise UserError(f"sampling {len(models)} models at once needs the stacked decoder (fast), which supports "
                        f"Qwen3/Llama causal LMs with full attention; got {type(models[0]).__name__}")
    if fast:
        dec = decoder.KVDecoder(model, B, prompt_BP.shape[1] + max_new_tokens, compiled=compiled)
    else:
        attention, pos, cache = prompt_att, positions(prompt_att), _cache_kwargs(model)
    ids = prompt_BP
    for t in range(max_new_tokens):
        if fast:  # the decoder holds only the rows still live; finished rows get zero logits (never used)
            with autocast(device):
                logits_R = dec.prefill(prompt_BP, prompt_att) if t == 0 else dec.step(ids[dec.rows, 0])
            logits = logits_R if len(dec.rows) == B else logits_R.new_zeros(B, logits_R.shape[-1]).index_copy_(
                0, dec.rows, logits_R)
        else:
            with autocast(device):
                logits = model(input_ids=ids, attention_mask=attention, position_ids=pos, use_cache=True,
                               logits_to_keep=1, **cache).logits[:, -1]
        tok, logp = _next_token(logits, greedy, generator, temperature, ~done)
        sampled = ~done
        for i in (i for i in range(B) if forced[i]):  # environment tokens override the draw
            tok[i], sampled[i] = forced[i].pop(0), False
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        live = ~done
        tokens.append(tok), masks.append(sampled), logps.append(torch.where(sampled, logp, 0.0)), reals.append(live)
        is_stop = sampled & torch.isin(tok, stops)
        done = done | is_stop
        _check_events(tok, sampled & ~done & torch.isin(tok, triggers), texts_ids, live & ~is_stop, tokenizer,
                      task, call_end, forced, done)
        if bool(done.all()):
            break
        if not fast:
            attention = torch.cat([attention, torch.ones(B, 1, dtype=attention.dtype, device=device)], 1)
            pos = pos[:, -1:] + 1
        elif int((~done).sum()) <= 3 * len(dec.rows) // 4:  # a quarter of the decoded rows ended: drop them
            dec.keep(~done[dec.rows])
        ids = tok[:, None]
    return _assemble(prompt_BP, prompt_att, tokens, masks, logps, reals, texts_ids, tokenizer)


def _check_events(tok, candidates, texts_ids, keep, tokenizer, task, call_end, forced, done):
    """Record the token of each row in ``keep`` (live, not a stop token); where a token may end a call or an
    answer, decode the text so far and queue the tool's result (forced environment tokens) or mark the row
    finished. A call marker merged with the characters after it still counts (``marker_end``)."""
    tok_list, keep_list = tok.tolist(), keep.tolist()
    for i in range(len(tok_list)):
        if keep_list[i]:
            texts_ids[i].append(tok_list[i])
    for i in torch.nonzero(candidates).flatten().tolist():
        text = tokenizer.decode(texts_ids[i], skip_special_tokens=True)
        end = marker_end(text, call_end, len(tokenizer.decode(texts_ids[i][-1:], skip_special_tokens=True))) \
            if call_end else None
        if end is not None:
            result = task.tool_result(text[:end])
            if result:
                forced[i].extend(tokenizer.encode(result, add_special_tokens=False))
                continue
        if task.finished(text):
            done[i] = True


def _assemble(prompt_BP, prompt_att, tokens, masks, logps, reals, texts_ids, tokenizer) -> Rollout:
    ids_BT = torch.stack(tokens, 1)
    mask_BT = torch.stack(masks, 1).float()
    attention_BT = torch.stack(reals, 1).long()  # every token of a live row, sampled or environment
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in texts_ids]
    return Rollout(prompt_BP, prompt_att, ids_BT, mask_BT, attention_BT, torch.stack(logps, 1), texts)


def completion_logits(model, rollout: Rollout, fast: bool | None = None) -> torch.Tensor:
    """Logits that predict each completion token, shape (B, T, V): one forward over prompt + completion,
    keeping only the last T + 1 positions (``logits_to_keep``) and dropping the final one, so that
    ``[:, t]`` comes from column P + t - 1 and predicts completion token t.

    ``fast`` (None: wherever ``packed.supports(model)``) runs ``packed.completion_logits`` instead: the same
    logits up to float rounding at every real completion token, from matrix products over real tokens only,
    each distinct prompt once (past a row's end, where nothing is scored, its logits differ)."""
    if packed.supports(model) if fast is None else fast:
        return packed.completion_logits(model, rollout)
    ids, attention, pos = rollout.full()
    T = rollout.completion_ids_BT.shape[1]
    with autocast(ids.device):
        logits = model(input_ids=ids, attention_mask=attention, position_ids=pos, logits_to_keep=T + 1).logits
    return logits[:, :-1].float()


def gather_logp(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_BT, logp_BTV)``: log-softmax over the vocabulary and the log-probability of each token."""
    logp_BTV = torch.log_softmax(logits_BTV, -1)
    return logp_BTV.gather(-1, ids_BT[..., None]).squeeze(-1), logp_BTV


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task, examples, max_new_tokens: int | None = None, batch: int = 128) -> float:
    """Fraction of ``examples`` answered correctly with greedy decoding (tools executed)."""
    return sampled_accuracy(model, tokenizer, task, examples, k=1, greedy=True, max_new_tokens=max_new_tokens,
                            batch=batch)[0]


@torch.no_grad()
def sampled_accuracy(model, tokenizer, task, examples, k: int = 1, greedy: bool = False, generator=None,
                     max_new_tokens: int | None = None, batch: int = 128,
                     compiled: bool = False) -> tuple[float, list[Rollout]]:
    """avg@k: the mean accuracy of k completions per example (greedy: k = 1), and the rollouts drawn;
    ``max_new_tokens`` None: ``completion_budget(examples, CHECK_BUDGET_MARGIN)``; ``compiled`` as in ``sample``."""
    max_new_tokens = max_new_tokens or completion_budget(examples, CHECK_BUDGET_MARGIN)
    prompts = [ex.prompt for ex in examples for _ in range(k)]
    refs = [ex for ex in examples for _ in range(k)]
    correct, rollouts = 0, []
    for s in range(0, len(prompts), batch):
        r = sample(model, tokenizer, prompts[s:s + batch], task, max_new_tokens, generator, greedy=greedy,
                   compiled=compiled)
        correct += sum(task.score(ex, text).correct for ex, text in zip(refs[s:s + batch], r.texts))
        rollouts.append(r)
    return correct / max(len(prompts), 1), rollouts
