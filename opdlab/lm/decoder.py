"""A lean decode path for sampling: the same transformer as the ``transformers`` model, with a preallocated
(static) KV cache and none of the per-call machinery.

Why. At the sizes the embedded tasks train (hidden 96-256, 4-6 layers), one decoded token costs far less in
matrix products than the ``transformers`` forward spends around them: building the causal mask, growing a
``DynamicCache``, dispatching through attention interfaces and output classes. ``KVDecoder`` reads the model's
own weights (no copy, so it always decodes the current parameters) and runs only the arithmetic of a
Qwen3/Llama block, in the same order as ``transformers`` does it, so its logits agree with the model's to
float rounding and the sampler draws the same tokens from the same generator state (tested in
``tests/test_decoder.py``).

Layout. The cache holds ``(B, H_kv, L_max, D)`` keys and values per layer, L_max = P + max_new_tokens. Column j
of the cache is column j of ``Rollout.full()``: a left-padded prompt then the completion. ``valid_BL`` marks the
columns a query may attend to (real prompt tokens and every completion column written so far); a padded
prompt column attends to itself only, so that no softmax is empty.

Compiled step. ``KVDecoder(..., compiled=True)`` runs each decode step (batches of two rows or more) through one
``torch.compile``d function instead: the same arithmetic with the per-token Python and op dispatch fused away.
So that one graph serves every token, it attends over the whole cache (columns not yet written masked like
padding) plus the new key, and returns the new keys and values, which are written into the cache outside it
(an in-place cache write inside the compiled function costs a copy of the cache per token). The batch and cache
length are dynamic dimensions, so dropping finished rows and a new prompt length compile nothing new; a new
model size or device does (about 10-15 s on 2 CPU cores, less where inductor's on-disk cache already holds it);
a last single row decodes eagerly (a size-1 dimension would be compiled apart). Logits agree with the eager
step to float rounding, so the sampler draws the same tokens unless a draw falls within that rounding of a
boundary (none did in the tests, ``tests/test_decoder.py``, nor in any benchmark).

Supported: ``transformers``' ``Qwen3ForCausalLM`` and ``LlamaForCausalLM`` (grouped-query attention, optional
biases, any rotary type the model's own ``rotary_emb`` computes) without sliding windows. ``supports(model)``
says whether a model qualifies; ``sampling.sample`` falls back to the ``transformers`` forward otherwise.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

__all__ = ["KVDecoder", "supports"]

_ARCHS = ("Qwen3ForCausalLM", "LlamaForCausalLM")


def supports(model) -> bool:
    """True where ``KVDecoder`` reproduces ``model``'s forward: a Qwen3 or Llama causal LM, full attention in
    every layer, SiLU MLP, eager/sdpa attention, on CPU or CUDA."""
    config = getattr(model, "config", None)
    if type(model).__name__ not in _ARCHS or config is None:
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (all(t == "full_attention" for t in layer_types) and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "use_sliding_window", False)
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and next(model.parameters()).device.type in ("cpu", "cuda"))


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """``transformers``' RMSNorm, ``w * (x / sqrt(mean(x^2) + eps))`` computed in float32, as one fused op."""
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], None, norm.variance_epsilon).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding ``x cos + rotate_half(x) sin`` with ``rotate_half(x) = (-x2, x1)``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _qkv(layer, h: torch.Tensor, fused_qkv, H: int, Hkv: int, D: int, cos, sin):
    """Queries, keys and values of ``layer`` on hidden states ``h`` (..., hidden), shaped (..., heads, D): one
    product with the fused q/k/v weight, Qwen3's per-head norm of q and k, then the rotary embedding (``cos``,
    ``sin`` broadcast against (..., heads, D))."""
    att = layer.self_attn
    q, k, v = F.linear(_rms(h, layer.input_layernorm), *fused_qkv).split((H * D, Hkv * D, Hkv * D), -1)
    q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))
    if hasattr(att, "q_norm"):  # Qwen3 normalises queries and keys per head
        q, k = _rms(q, att.q_norm), _rms(k, att.k_norm)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _mlp_residual(layer, h: torch.Tensor, fused_gate_up) -> torch.Tensor:
    """``h`` plus ``layer``'s SwiGLU MLP of its normalised self, gate and up as one fused product."""
    gate, up = F.linear(_rms(h, layer.post_attention_layernorm), *fused_gate_up).chunk(2, -1)
    return h + layer.mlp.down_proj(F.silu(gate) * up)


def _fused(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linear maps of the same input: a single matrix product per block."""
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return weight, bias


class KVDecoder:
    """Prefill a batch of left-padded prompts, then decode one token per call, with a static KV cache.

    ``prefill(ids_BP, attention_BP)`` returns the logits of the next token after each prompt (B, V);
    ``step(tok_R)`` appends one token to each of the R rows still decoded and returns the logits after it (R, V);
    ``keep(rows)`` drops the other rows (finished sequences cost nothing afterwards). ``rows`` is the index of
    the decoded rows in the original batch. Positions count real tokens only (``cumsum(attention) - 1``), as
    ``sampling.positions`` does.

    The q/k/v and gate/up projections of each block run as one matrix product each (their weights concatenated
    once per decoder, so a decoder sees the parameters of the moment it was built). ``compiled=True`` runs
    ``step`` through one ``torch.compile``d function (see the module doc).
    """

    def __init__(self, model, batch: int, max_len: int, compiled: bool = False):
        if not supports(model):
            raise ValueError(f"KVDecoder supports Qwen3/Llama causal LMs with full attention; got "
                             f"{type(model).__name__}")
        self.model, self.inner, c = model, model.model, model.config
        self.H = c.num_attention_heads
        self.Hkv = c.num_key_value_heads or self.H
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.H
        self.scale = self.D ** -0.5
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        with torch.no_grad():
            self.qkv = [_fused(b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj) for b in self.inner.layers]
            self.gate_up = [_fused(b.mlp.gate_proj, b.mlp.up_proj) for b in self.inner.layers]
        shape = (len(self.inner.layers), batch, self.Hkv, max_len, self.D)
        self.K = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.V = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.valid_BL = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
        self.B, self.L, self.n, self.compiled = batch, max_len, 0, compiled
        self.rows = torch.arange(batch, device=self.device)
        self.pos_B = torch.zeros(batch, dtype=torch.long, device=self.device)
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.inner.rotary_emb(probe, torch.arange(max_len, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # (L, D): the model's own rotary module at positions 0..L-1

    def _block(self, i: int, h: torch.Tensor, cos, sin, attend) -> torch.Tensor:
        """Block i on hidden states ``h`` (R, S, hidden) written at cache columns n-S..n-1."""
        layer, R, S = self.inner.layers[i], h.shape[0], h.shape[1]
        q, k, v = _qkv(layer, h, self.qkv[i], self.H, self.Hkv, self.D, cos, sin)
        self.K[i, :, :, self.n - S:self.n] = k.transpose(1, 2)
        self.V[i, :, :, self.n - S:self.n] = v.transpose(1, 2)
        o = attend(q.transpose(1, 2), self.K[i, :, :, :self.n], self.V[i, :, :, :self.n])
        h = h + layer.self_attn.o_proj(o.transpose(1, 2).reshape(R, S, self.H * self.D))
        return _mlp_residual(layer, h, self.gate_up[i])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(_rms(h[:, -1], self.inner.norm))

    @torch.no_grad()
    def prefill(self, ids_BP: torch.Tensor, attention_BP: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the token after each left-padded prompt."""
        B, P = ids_BP.shape
        if B != self.B or P >= self.L:
            raise ValueError(f"prefill of {B} x {P} tokens does not fit a decoder for {self.B} rows of "
                             f"{self.L} columns")
        real = attention_BP.bool()
        self.valid_BL[:, :P] = real
        pos_BP = (attention_BP.long().cumsum(-1) - 1).clamp_min(0)
        self.pos_B, self.n = pos_BP[:, -1], P
        idx = torch.arange(P, device=self.device)
        # query i sees real keys j <= i; a padded query sees itself, so that no softmax is empty
        mask = (idx[None, :] <= idx[:, None])[None] & (real[:, None, :] | (idx[None, :] == idx[:, None])[None])
        cos, sin = self.cos[pos_BP][:, :, None], self.sin[pos_BP][:, :, None]  # (B, P, 1, D)

        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale,
                                                  enable_gqa=self.Hkv != self.H)
        h = self.inner.embed_tokens(ids_BP)
        for i in range(len(self.inner.layers)):
            h = self._block(i, h, cos, sin, attend)
        return self._logits(h)

    @torch.no_grad()
    def step(self, tok_R: torch.Tensor) -> torch.Tensor:
        """Append ``tok_R`` to each decoded row; logits (R, V) of the token after it."""
        if self.n >= self.L:
            raise ValueError(f"the decoder's {self.L} columns are full")
        R, H, Hkv = len(self.rows), self.H, self.Hkv
        if self.compiled and R >= 2:  # size-1 dimensions would be specialised: a one-row tail runs eagerly
            return self._compiled_step(tok_R)
        self.valid_BL[:, self.n] = True
        self.pos_B, self.n = self.pos_B + 1, self.n + 1
        cos, sin = self.cos[self.pos_B][:, None, None], self.sin[self.pos_B][:, None, None]
        # one query per row: (R*H, 1, D) against (R*H, n, D) in two batched products, padding as -inf
        bias = torch.zeros(R, 1, self.n, dtype=self.dtype, device=self.device).masked_fill_(
            ~self.valid_BL[:, None, :self.n], float("-inf")).repeat_interleave(H, 0)

        def attend(q, k, v):
            if Hkv != H:
                k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            k, v = k.reshape(R * H, self.n, self.D), v.reshape(R * H, self.n, self.D)
            w = torch.softmax(torch.baddbmm(bias, q.reshape(R * H, 1, self.D), k.transpose(1, 2), alpha=self.scale), -1)
            return torch.bmm(w, v).view(R, H, 1, self.D)
        h = self.inner.embed_tokens(tok_R[:, None])
        for i in range(len(self.inner.layers)):
            h = self._block(i, h, cos, sin, attend)
        return self._logits(h)

    def _compiled_step(self, tok_R: torch.Tensor) -> torch.Tensor:
        """``step`` through ``_decode_step``: the cache is read whole, the new column written here. Where the
        process already holds as many compiled versions as torch allows (one per model size and device), it warns
        and this decoder steps eagerly from then on."""
        col, pos_B = self.n, self.pos_B + 1
        args = (tok_R, self.cos[pos_B], self.sin[pos_B], self.K, self.V, self.valid_BL)
        for x, dims in zip(args, ((0,), (0,), (0,), (1, 3), (1, 3), (0, 1))):  # rows and columns vary
            torch._dynamo.mark_dynamic(x, dims)
        try:
            logits, k_new, v_new = _compiled_decode()(self.model, self.qkv, self.gate_up, *args, self.H, self.scale)
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
        self.K[:, :, :, col], self.V[:, :, :, col] = k_new, v_new
        self.valid_BL[:, col], self.n, self.pos_B = True, col + 1, pos_B
        return logits

    def keep(self, keep_R: torch.Tensor) -> None:
        """Keep only the decoded rows where ``keep_R`` (a bool over the current rows) is true."""
        idx = torch.nonzero(keep_R).flatten()
        self.K, self.V = self.K[:, idx], self.V[:, idx]
        self.valid_BL, self.pos_B, self.rows = self.valid_BL[idx], self.pos_B[idx], self.rows[idx]


def _decode_step(model, qkv, gate_up, tok_R, cos_RD, sin_RD, K, V, valid_RL, H: int, scale: float):
    """One decode step of every layer, for ``torch.compile``: logits (R, V) after ``tok_R`` and the new keys and
    values (layers, R, H_kv, D). Each query attends to the cache columns ``valid_RL`` marks (K, V: (layers, R,
    H_kv, L, D)) and to its own new key, as one softmax over the L + 1 scores; grouped-query heads are grouped
    (H = g H_kv), not repeated."""
    inner = model.model
    R, Hkv, D = K.shape[1], K.shape[2], K.shape[4]
    g = H // Hkv
    bias_RL = torch.zeros(valid_RL.shape, dtype=K.dtype, device=K.device).masked_fill(~valid_RL, float("-inf"))
    cos, sin = cos_RD[:, None, None], sin_RD[:, None, None]
    h = inner.embed_tokens(tok_R[:, None])
    keys, values = [], []
    for i, layer in enumerate(inner.layers):
        q, k, v = _qkv(layer, h, qkv[i], H, Hkv, D, cos, sin)  # (R, 1, heads, D)
        q, k, v = q[:, 0].view(R, Hkv, g, D), k[:, 0], v[:, 0]
        scores = torch.cat([torch.matmul(q, K[i].transpose(-1, -2)) * scale + bias_RL[:, None, None],
                            (q * k[:, :, None]).sum(-1, keepdim=True) * scale], -1)
        w = torch.softmax(scores, -1)
        o = torch.matmul(w[..., :-1], V[i]) + w[..., -1:] * v[:, :, None]  # (R, Hkv, g, D)
        h = h + layer.self_attn.o_proj(o.reshape(R, 1, H * D))
        h = _mlp_residual(layer, h, gate_up[i])
        keys.append(k), values.append(v)
    return model.lm_head(_rms(h[:, -1], inner.norm)), torch.stack(keys), torch.stack(values)


_COMPILED = []


def _compiled_decode():
    """``_decode_step`` compiled once per process (fullgraph, batch and cache length dynamic)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_decode_step, fullgraph=True))
    return _COMPILED[0]
