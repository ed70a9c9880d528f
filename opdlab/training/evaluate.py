"""Evaluation with per-item records: held-out greedy accuracy, sampled avg@k and the exact per-token divergence to
the teacher over the vocabulary, one record per held-out item (``ITEM_COLUMNS``). Every run of a task sees the same
items in the same order, so arms compare item by item (``opdlab.experiments.stats``); ``loop.train`` writes the
records into the run directory (``RunLog.write_items``; read back with ``opdlab.rundir.reader.read_items``).
Sampled completions draw from a generator seeded by the step and the run's seed, so a resumed run evaluates as an
uninterrupted one does."""
from __future__ import annotations

import hashlib
import time

import pandas as pd
import torch

from opdlab.config.spec import RunSpec
from opdlab.core import divergences
from opdlab.lm.sampling import completion_logits, gather_logp, sample
from opdlab.training.step import EVAL_SEED, Trainer, eval_examples

__all__ = ["evaluate", "final_sampled_n", "ITEM_COLUMNS"]

ITEM_COLUMNS = ("item", "item_id", "correct", "sampled_correct", "length", "hit_cap", "kl_reverse", "kl_forward",
                "divergence")
"""One evaluation record per held-out item: its index in the evaluation order and a stable id (sha256 of the
prompt, 12 hex), greedy correctness (0/1), the mean correctness of its ``eval_samples`` sampled completions,
the greedy completion's length in tokens and whether it hit the token budget, and the exact per-token reverse
KL, forward KL and run divergence to the teacher along its sampled completions (mean over their tokens)."""


def _item_id(prompt: str) -> str:
    """An item's stable id: the first 12 hex digits of the sha256 of its prompt."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:12]


@torch.no_grad()
def evaluate(tr: Trainer, step: int, n: int | None = None, sampled_n: int | None = None) -> tuple[dict, pd.DataFrame]:
    """Held-out greedy accuracy, sampled avg@k, and the exact per-token divergence to the teacher (the run's
    divergence, reverse KL and forward KL) over the vocabulary at the contexts the student visits, on the first
    ``n`` held-out examples (default ``eval_n``); the sampled accuracy and the divergences on the first
    ``sampled_n`` of them only (default all), the other items' such columns NaN. Returns ``(metrics, items)``: the
    run's metrics and one record per item (``ITEM_COLUMNS``)."""
    s, rt, t0 = tr.spec, tr.runtime, time.perf_counter()
    examples = tr.eval_examples if n is None else eval_examples(tr.task, n, split=s.eval.eval_split)
    drawn = examples[:sampled_n] if sampled_n is not None else examples
    k, cap = s.eval.eval_samples, tr.max_new_tokens
    tr.student.eval()
    fast = None if rt.sampler == "fast" else False

    def draw(prompts, generator, greedy):
        return [sample(tr.student, tr.tokenizer, prompts[i:i + 128], tr.task, cap, generator, greedy=greedy,
                       fast=fast, compiled=rt.compile_decode) for i in range(0, len(prompts), 128)]

    greedy = draw([ex.prompt for ex in examples], None, True)
    gen = torch.Generator(device=tr.device).manual_seed(EVAL_SEED + 7919 * s.optim.seed + step)
    sampled = draw([ex.prompt for ex in drawn for _ in range(k)], gen, False)
    divs = {"divergence": tr.div, "kl_reverse": divergences.get("reverse_kl"),
            "kl_forward": divergences.get("forward_kl")}
    sums, totals = {name: [] for name in divs}, {name: 0.0 for name in divs}
    for r in sampled:
        _, lt = gather_logp(completion_logits(tr.teacher, r), r.completion_ids_BT)
        _, ls = gather_logp(completion_logits(tr.student, r), r.completion_ids_BT)
        for name, div in divs.items():
            D_BT = div.exact(lt, ls) * r.mask_BT
            sums[name].append(D_BT.sum(1))
            totals[name] += float(D_BT.sum())  # each batch's float32 sum, accumulated in a Python float
    tokens_N = torch.cat([r.mask_BT.sum(1) for r in sampled]).double()
    g_texts = [t for r in greedy for t in r.texts]
    g_len = torch.cat([r.attention_BT.sum(1) for r in greedy])
    s_correct = torch.tensor([float(tr.task.score(ex, t).correct)
                              for ex, t in zip([ex for ex in drawn for _ in range(k)],
                                               [t for r in sampled for t in r.texts])]).reshape(-1, k)
    per_item = {"sampled_correct": s_correct.mean(1),
                **{name: torch.cat(v).double().reshape(-1, k).sum(1) / tokens_N.reshape(-1, k).sum(1).clamp_min(1)
                   for name, v in sums.items()}}
    rest = len(examples) - len(drawn)  # items scored greedy only
    items = pd.DataFrame(dict(
        item=range(len(examples)), item_id=[_item_id(ex.prompt) for ex in examples],
        correct=[int(tr.task.score(ex, t).correct) for ex, t in zip(examples, g_texts)],
        length=g_len.numpy(), hit_cap=(g_len >= cap).numpy(),
        **{name: torch.cat([v, v.new_full((rest,), float("nan"))]).numpy() for name, v in per_item.items()}
    ))[list(ITEM_COLUMNS)]
    n_tokens = float(tokens_N.sum())
    totals = {name: total / max(n_tokens, 1) for name, total in totals.items()}
    lengths = torch.cat([r.mask_BT.sum(1) for r in sampled])
    metrics = dict(greedy_accuracy=float(items["correct"].mean()), sampled_accuracy=float(s_correct.mean()),
                   completion_length=float(lengths.mean()), exact_divergence=totals["divergence"],
                   exact_reverse_kl=totals["kl_reverse"], exact_forward_kl=totals["kl_forward"],
                   eval_items=len(examples), hit_cap_rate=float(items["hit_cap"].mean()),
                   time_eval=time.perf_counter() - t0)
    return (metrics if not rest else {**metrics, "sampled_items": len(drawn)}), items


def final_sampled_n(spec: RunSpec) -> int | None:
    """How many of the last evaluation's items are sampled and scored for divergence (None: all of them), as
    ``EvalSpec.final_eval_sampled`` asks."""
    e = spec.eval
    return None if e.final_eval_sampled or not e.final_eval_n or e.final_eval_n <= e.eval_n else e.eval_n

