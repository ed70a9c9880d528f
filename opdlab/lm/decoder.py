"""A lean decode path for sampling: the same transformer as the ``transformers`` model, with a preallocated
(static) KV cache and none of the per-call machinery.

Why. At the sizes the embedded tasks train (hidden 96-256, 4-6 layers), one decoded token costs far less in matrix
products than the ``transformers`` forward spends around them: building the causal mask, growing a
``DynamicCache``, dispatching through attention interfaces and output classes. ``KVDecoder`` reads the model's own
weights (``opdlab.lm.block.stack``, built when the decoder is) and runs only the arithmetic of a Qwen3/Llama block
(``opdlab.lm.block``), in the same order as ``transformers`` does it, so its logits agree with the model's to float
rounding and the sampler draws the same tokens from the same generator state (tested in ``tests/lm/test_decoder.py``).

Layout. The cache holds ``(runs, slots, H_kv, L_max, D)`` keys and values per layer, L_max = P + max_new_tokens
(one run: slots are the batch's rows). Column j of the cache is column j of ``Rollout.full()``: a left-padded
prompt then the completion. ``valid_RSL`` marks the columns a query may attend to (real prompt tokens and every
completion column written so far); a padded prompt column attends to itself only, so that no softmax is empty.

Compiled step. ``KVDecoder(..., compiled=True)`` runs each decode step (two slots or more) through one
``torch.compile``d function instead: the same arithmetic with the per-token Python and op dispatch fused away.
So that one graph serves every token, it attends over the whole cache (columns not yet written masked like
padding) plus the new key, and returns the new keys and values, which are written into the cache outside it
(an in-place cache write inside the compiled function costs a copy of the cache per token). The batch and cache
length are dynamic dimensions, so dropping finished rows and a new prompt length compile nothing new; a new
model size or device does; a last single row decodes eagerly (a size-1 dimension would be compiled apart).
Logits agree with the eager step to float rounding, so the sampler draws the same tokens unless a draw falls
within that rounding of a boundary (``tests/lm/test_decoder.py``).

Runs. ``KVDecoder([m_1, ..., m_R], R * B, ...)`` decodes R models of one architecture and size at once, B rows
each (the batch's rows run-major: rows r B .. (r + 1) B - 1 are run r's), every product one ``torch.bmm`` over
runs. Each run keeps its own rows: when rows end, every run's live rows move to the front of its slots and the
slots shrink to the most any run still has; a run with fewer live rows fills its slots with ended ones, which
are computed and never read. Run r's logits equal model r's alone to float rounding (``tests/lm/test_block.py``).

Supported: ``transformers``' ``Qwen3ForCausalLM`` and ``LlamaForCausalLM`` (grouped-query attention, optional
biases, any rotary type the model's own ``rotary_emb`` computes) without sliding windows. ``supports(model)``
says whether a model qualifies; ``sampling.sample`` falls back to the ``transformers`` forward otherwise.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from opdlab.errors import UserError
from opdlab.lm import block
from opdlab.lm.block import supports

__all__ = ["KVDecoder", "supports"]


class KVDecoder:
    """Prefill a batch of left-padded prompts, then decode one token per call, with a static KV cache.

    ``prefill(ids_BP, attention_BP)`` returns the logits of the next token after each prompt (B, V);
    ``step(tok_R)`` appends one token to each of the R rows still decoded and returns the logits after it (R, V);
    ``keep(rows)`` drops the other rows (finished sequences cost nothing afterwards). ``rows`` is the index of
    the decoded rows in the original batch. Positions count real tokens only (``cumsum(attention) - 1``), as
    ``sampling.positions`` does.

    ``model`` is one model or a list of R models of one architecture and size (``block.stack``), the batch
    then R groups of ``batch / R`` rows, run by run. The weights are stacked (q/k/v and gate/up concatenated)
    once per decoder, so a decoder sees the parameters of the moment it was built. ``compiled=True`` runs
    ``step`` through one ``torch.compile``d function (see the module doc).

    Layout: the cache is ``(layers, runs, slots, H_kv, L, D)``; ``slot_row`` (runs, slots) is the batch row in
    each slot, ``where`` the flat slot of each decoded row (None while every slot holds one, in order).
    """

    def __init__(self, model, batch: int, max_len: int, compiled: bool = False):
        models = list(model) if isinstance(model, (list, tuple)) else [model]
        if not all(supports(m) for m in models):
            raise UserError(f"KVDecoder supports Qwen3/Llama causal LMs with full attention; got "
                            f"{', '.join(sorted({type(m).__name__ for m in models}))}")
        if batch % len(models):
            raise UserError(f"KVDecoder of {len(models)} models needs a batch of whole runs (a multiple of "
                            f"{len(models)} rows), got {batch}")
        with torch.no_grad():
            self.s = block.stack(models)
        p = next(models[0].parameters())
        self.device, self.dtype = p.device, p.dtype
        R, S = self.s.R, batch // self.s.R
        shape = (len(self.s.layers), R, S, self.s.Hkv, max_len, self.s.D)
        self.K = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.V = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.valid_RSL = torch.zeros(R, S, max_len, dtype=torch.bool, device=self.device)
        self.B, self.L, self.n, self.compiled = batch, max_len, 0, compiled
        self.slot_row = torch.arange(batch, device=self.device).view(R, S)
        self.rows, self.where = torch.arange(batch, device=self.device), None
        self.pos_RS = torch.zeros(R, S, dtype=torch.long, device=self.device)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = block.rotary(self.s, probe, torch.arange(max_len, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # (L, D): the model's own rotary module at positions 0..L-1

    def _write(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Layer i's keys and values (runs, slots, S, H_kv, D) into cache columns n-S..n-1."""
        S = k.shape[2]
        self.K[i, :, :, :, self.n - S:self.n] = k.transpose(2, 3)
        self.V[i, :, :, :, self.n - S:self.n] = v.transpose(2, 3)

    def _slots(self, tok_R: torch.Tensor) -> torch.Tensor:
        """The decoded rows' tokens in their slots (runs, slots); a slot without a decoded row gets token 0."""
        if self.where is None:
            return tok_R.view(self.slot_row.shape)
        return tok_R.new_zeros(self.slot_row.numel()).index_copy_(0, self.where, tok_R).view(self.slot_row.shape)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the decoded rows (rows, V) from the slots' hidden states (runs, slots, S, hidden)."""
        return self._rows_of(block.logits(self.s, h[:, :, -1]))

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(0, 1)
        return x if self.where is None else x[self.where]

    @torch.no_grad()
    def prefill(self, ids_BP: torch.Tensor, attention_BP: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the token after each left-padded prompt."""
        B, P = ids_BP.shape
        if B != self.B or P >= self.L:
            raise ValueError(f"prefill of {B} x {P} tokens does not fit a decoder for {self.B} rows of "
                             f"{self.L} columns")
        (R, S), (H, D) = self.slot_row.shape, (self.s.H, self.s.D)
        real = attention_BP.bool()
        self.valid_RSL[:, :, :P] = real.view(R, S, P)
        pos_BP = (attention_BP.long().cumsum(-1) - 1).clamp_min(0)
        self.pos_RS, self.n = pos_BP[:, -1].view(R, S), P
        idx = torch.arange(P, device=self.device)
        # query i sees real keys j <= i; a padded query sees itself, so that no softmax is empty
        mask = (idx[None, :] <= idx[:, None])[None] & (real[:, None, :] | (idx[None, :] == idx[:, None])[None])
        cos, sin = self.cos[pos_BP].view(R, S, P, 1, D), self.sin[pos_BP].view(R, S, P, 1, D)

        def attend(i, q, k, v):
            self._write(i, k, v)
            k, v = self.K[i, :, :, :, :self.n].flatten(0, 1), self.V[i, :, :, :, :self.n].flatten(0, 1)
            o = F.scaled_dot_product_attention(q.flatten(0, 1).transpose(1, 2), k, v, attn_mask=mask[:, None],
                                               scale=self.s.scale, enable_gqa=self.s.Hkv != H)
            return o.transpose(1, 2).reshape(R, S, P, H * D)
        h = block.embed(self.s, ids_BP.view(R, S, P))
        for i in range(len(self.s.layers)):
            h = block.layer(self.s, i, h, cos, sin, attend)
        return self._logits(h)

    @torch.no_grad()
    def step(self, tok_R: torch.Tensor) -> torch.Tensor:
        """Append ``tok_R`` to each decoded row; logits (R, V) of the token after it."""
        if self.n >= self.L:
            raise ValueError(f"the decoder's {self.L} columns are full")
        (R, S), (H, Hkv, D) = self.slot_row.shape, (self.s.H, self.s.Hkv, self.s.D)
        if self.compiled and S >= 2:  # size-1 dimensions would be specialised: a one-slot tail runs eagerly
            return self._compiled_step(tok_R)
        self.valid_RSL[:, :, self.n] = True
        self.pos_RS, self.n = self.pos_RS + 1, self.n + 1
        cos, sin = self.cos[self.pos_RS][:, :, None, None], self.sin[self.pos_RS][:, :, None, None]
        # one query per slot: (R*S*H, 1, D) against (R*S*H, n, D) in two batched products, padding as -inf
        bias = torch.zeros(R * S, 1, self.n, dtype=self.dtype, device=self.device).masked_fill_(
            ~self.valid_RSL.flatten(0, 1)[:, None, :self.n], float("-inf")).repeat_interleave(H, 0)

        def attend(i, q, k, v):
            self._write(i, k, v)
            k, v = self.K[i, :, :, :, :self.n].flatten(0, 1), self.V[i, :, :, :, :self.n].flatten(0, 1)
            if Hkv != H:
                k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            k, v = k.reshape(R * S * H, self.n, D), v.reshape(R * S * H, self.n, D)
            q = q.flatten(0, 1).transpose(1, 2).reshape(R * S * H, 1, D)
            w = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.s.scale), -1)
            return torch.bmm(w, v).view(R, S, H, 1, D).transpose(2, 3).reshape(R, S, 1, H * D)
        h = block.embed(self.s, self._slots(tok_R)[..., None])
        for i in range(len(self.s.layers)):
            h = block.layer(self.s, i, h, cos, sin, attend)
        return self._logits(h)

    def _compiled_step(self, tok_R: torch.Tensor) -> torch.Tensor:
        """``step`` through ``_decode_step``: the cache is read whole, the new column written here. Where the
        process already holds as many compiled versions as torch allows (one per model size and device), it warns
        and this decoder steps eagerly from then on."""
        col, pos_RS = self.n, self.pos_RS + 1
        args = (self._slots(tok_R), self.cos[pos_RS], self.sin[pos_RS], self.K, self.V, self.valid_RSL)
        for x, dims in zip(args, ((1,), (1,), (1,), (2, 4), (2, 4), (1, 2))):  # slots and columns vary
            torch._dynamo.mark_dynamic(x, dims)
        try:
            logits, k_new, v_new = _compiled_decode()(self.s, *args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            warnings.warn("compile_decode: this process has compiled the decode step for as many model sizes as "
                          "torch allows (torch._dynamo.config.recompile_limit); this model decodes without it",
                          stacklevel=2)
            self.compiled = False
            return self.step(tok_R)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            reason = str(err).strip().splitlines()[0]
            raise ValueError(f"compile_decode: torch.compile could not compile the decode step here ({reason}); "
                             "decode without it (compile_decode=False), or install what torch.compile needs: a "
                             "C++ compiler such as gcc on CPU, Triton on CUDA") from None
        self.K[:, :, :, :, col], self.V[:, :, :, :, col] = k_new, v_new
        self.valid_RSL[:, :, col], self.n, self.pos_RS = True, col + 1, pos_RS
        return self._rows_of(logits)

    def keep(self, keep_R: torch.Tensor) -> None:
        """Keep only the decoded rows where ``keep_R`` (a bool over the current rows) is true: each run's kept
        rows move to the front of its slots, in order, and the slots shrink to the most any run keeps."""
        R, S = self.slot_row.shape
        keep_RS = keep_R.new_zeros(R * S) if self.where is not None else keep_R.clone()
        if self.where is not None:
            keep_RS[self.where] = keep_R
        keep_RS = keep_RS.view(R, S)
        count_R = keep_RS.sum(1)
        order = torch.argsort((~keep_RS).to(torch.uint8), dim=1, stable=True)[:, :max(int(count_R.max()), 1)]
        run = torch.arange(R, device=self.device)[:, None]
        self.K, self.V = self.K[:, run, order], self.V[:, run, order]
        self.valid_RSL, self.pos_RS, self.slot_row = self.valid_RSL[run, order], self.pos_RS[run, order], \
            self.slot_row[run, order]
        real_RS = torch.arange(order.shape[1], device=self.device)[None] < count_R[:, None]
        self.rows = self.slot_row[real_RS]
        self.where = None if bool(real_RS.all()) else torch.nonzero(real_RS.flatten()).flatten()


def _decode_step(s: block.Stack, tok_RS, cos_RSD, sin_RSD, K, V, valid_RSL):
    """One decode step of every layer, for ``torch.compile``: logits (runs, slots, V) after ``tok_RS`` and the
    new keys and values (layers, runs, slots, H_kv, D). Each query attends to the cache columns ``valid_RSL``
    marks (K, V: (layers, runs, slots, H_kv, L, D)) and to its own new key, as one softmax over the L + 1
    scores; grouped-query heads are grouped (H = g H_kv), not repeated."""
    R, S, Hkv, D = K.shape[1], K.shape[2], K.shape[3], K.shape[5]
    H, g = s.H, s.H // Hkv
    bias_RSL = torch.zeros(valid_RSL.shape, dtype=K.dtype, device=K.device).masked_fill(~valid_RSL, float("-inf"))
    cos, sin = cos_RSD[:, :, None, None], sin_RSD[:, :, None, None]
    keys, values = [], []

    def attend(i, q, k, v):  # (R, S, 1, heads, D)
        q, k, v = q[:, :, 0].view(R, S, Hkv, g, D), k[:, :, 0], v[:, :, 0]
        scores = torch.cat([torch.matmul(q, K[i].transpose(-1, -2)) * s.scale + bias_RSL[:, :, None, None],
                            (q * k[:, :, :, None]).sum(-1, keepdim=True) * s.scale], -1)
        w = torch.softmax(scores, -1)
        o = torch.matmul(w[..., :-1], V[i]) + w[..., -1:] * v[:, :, :, None]  # (R, S, Hkv, g, D)
        keys.append(k), values.append(v)
        return o.reshape(R, S, 1, H * D)
    h = block.embed(s, tok_RS[..., None])
    for i in range(len(s.layers)):
        h = block.layer(s, i, h, cos, sin, attend)
    return block.logits(s, h[:, :, -1]), torch.stack(keys), torch.stack(values)


_COMPILED = []


def _compiled_decode():
    """``_decode_step`` compiled once per process (fullgraph, slots and cache length dynamic)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_decode_step, fullgraph=True))
    return _COMPILED[0]
