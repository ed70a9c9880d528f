"""The Qwen3/Llama transformer block, written once, with its weights stacked over R runs.

What it computes. One block of ``transformers``' ``Qwen3ForCausalLM`` / ``LlamaForCausalLM``, in the same order:

    x = RMSNorm_in(h);  q, k, v = x W_qkv (+ b);  q, k = RMSNorm_q(q), RMSNorm_k(k)  (Qwen3, per head)
    q, k = rotary(q), rotary(k);  h = h + attend(q, k, v) W_o (+ b)
    h = h + (silu(x' W_gate) * (x' W_up)) W_down,  x' = RMSNorm_post(h)

with ``RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)`` computed in float32. Attention is the caller's: the KV-cache
decoder (``opdlab.lm.decoder``) and the packed scorer (``opdlab.lm.packed``) lay rows out differently, so
``layer`` takes an ``attend(i, q, k, v)`` that returns the attention output of layer i, heads flattened.

Runs. ``stack(models)`` gathers the weights of R models of one architecture and size into a ``Stack``: every
weight carries a leading run dimension R, and so does every activation (``h``: ``(R, ..., hidden)``). Run r's
slice of a stacked forward is run r's model alone, to float rounding. The stacked weights are
``torch.stack`` of the models' own parameters (for one model a view, but for the concatenated q/k/v and gate/up
weights), so under autograd the gradient of each run lands on its own model's parameters, exactly (the backward
of a stack is a slice). For R = 1 every product is the ``F.linear`` of the unstacked code, bit for bit; for
R > 1 a product is one ``torch.bmm`` over runs. The copy is made on every stacked forward.

The q/k/v and gate/up projections run as one product each (their weights concatenated when stacked). Tied
embeddings stay tied: the output head is the stacked input embedding. The rotary tables are the first model's
own ``rotary_emb`` (the models' configs must agree, ``stack`` checks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opdlab.errors import UserError

__all__ = ["Layer", "Stack", "stack", "supports", "embed", "rotary", "rms", "linear", "qkv", "mlp_residual",
           "layer", "ARCHS"]

ARCHS = ("Qwen3ForCausalLM", "LlamaForCausalLM")


def supports(model) -> bool:
    """True where ``stack`` reproduces ``model``'s forward: a Qwen3 or Llama causal LM, full attention in every
    layer, SiLU MLP, eager/sdpa attention, on CPU or CUDA."""
    config = getattr(model, "config", None)
    if type(model).__name__ not in ARCHS or config is None:
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (all(t == "full_attention" for t in layer_types) and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "use_sliding_window", False)
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and next(model.parameters()).device.type in ("cpu", "cuda"))


@dataclass(frozen=True)
class Layer:
    """One block's weights, each ``(R, ...)``; a bias or Qwen3's q/k norm is None where the model has none."""

    in_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up_w: torch.Tensor
    gate_up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None


@dataclass(frozen=True)
class Stack:
    """R models' weights with a leading run dimension, and the shape of their attention.

    Attributes:
        embed: ``(R, V, hidden)``; head: ``(R, V, hidden)`` (the same tensor where embeddings are tied);
        norm: the final norm ``(R, hidden)``; layers: one ``Layer`` per block.
        H, Hkv, D: query heads, key/value heads, head width; eps: the norms' epsilon; pad: the embedding's
        padding index (its row gets no gradient from the input side, as in ``nn.Embedding``), or None.
        rotary: the first model's rotary module, ``rotary(x, position_ids) -> (cos, sin)``.
    """

    embed: torch.Tensor
    head: torch.Tensor
    norm: torch.Tensor
    layers: tuple[Layer, ...]
    H: int
    Hkv: int
    D: int
    eps: float
    pad: int | None
    rotary: torch.nn.Module

    @property
    def R(self) -> int:
        return self.embed.shape[0]

    @property
    def scale(self) -> float:
        return self.D ** -0.5


def _shape(model) -> tuple:
    c = model.config
    H = c.num_attention_heads
    att, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    return (type(model).__name__, c.vocab_size, c.hidden_size, len(model.model.layers), H,
            c.num_key_value_heads or H, getattr(c, "head_dim", None) or c.hidden_size // H, c.intermediate_size,
            att.q_proj.bias is not None, att.o_proj.bias is not None, mlp.gate_proj.bias is not None,
            hasattr(att, "q_norm"), c.rms_norm_eps, repr(getattr(c, "rope_parameters", None)),
            getattr(c, "rope_theta", None), model.lm_head.weight is model.model.embed_tokens.weight)


def stack(models) -> Stack:
    """The ``Stack`` of ``models`` (one model or a list), with gradient to their parameters unless built under
    ``torch.no_grad()``. Every model must support the block (``supports``) and share the first one's
    architecture, sizes, biases and rotary settings."""
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise UserError("stack needs at least one model, got none")
    for m in models:
        if not supports(m):
            raise UserError(f"the stacked block supports Qwen3/Llama causal LMs with full attention and SiLU; got "
                            f"{type(m).__name__}")
    shape = _shape(models[0])
    for r, m in enumerate(models[1:], 1):
        if _shape(m) != shape:
            raise UserError(f"model {r} of the stack differs from model 0 in architecture or size "
                            f"({_shape(m)} against {shape}); a stack holds models of one architecture and size")

    def st(get):
        xs = [get(m) for m in models]
        if xs[0] is None:
            return None
        return xs[0][None] if len(xs) == 1 else torch.stack(xs)

    def cat(*gets):
        return st(lambda m: None if gets[0](m) is None else torch.cat([g(m) for g in gets]))

    layers = []
    for i in range(len(models[0].model.layers)):
        def blk(m, i=i):
            return m.model.layers[i]
        layers.append(Layer(
            in_norm=st(lambda m: blk(m).input_layernorm.weight),
            qkv_w=cat(*(lambda m, n=n: getattr(blk(m).self_attn, n).weight for n in ("q_proj", "k_proj", "v_proj"))),
            qkv_b=cat(*(lambda m, n=n: getattr(blk(m).self_attn, n).bias for n in ("q_proj", "k_proj", "v_proj"))),
            q_norm=st(lambda m: blk(m).self_attn.q_norm.weight if hasattr(blk(m).self_attn, "q_norm") else None),
            k_norm=st(lambda m: blk(m).self_attn.k_norm.weight if hasattr(blk(m).self_attn, "k_norm") else None),
            o_w=st(lambda m: blk(m).self_attn.o_proj.weight), o_b=st(lambda m: blk(m).self_attn.o_proj.bias),
            post_norm=st(lambda m: blk(m).post_attention_layernorm.weight),
            gate_up_w=cat(lambda m: blk(m).mlp.gate_proj.weight, lambda m: blk(m).mlp.up_proj.weight),
            gate_up_b=cat(lambda m: blk(m).mlp.gate_proj.bias, lambda m: blk(m).mlp.up_proj.bias),
            down_w=st(lambda m: blk(m).mlp.down_proj.weight), down_b=st(lambda m: blk(m).mlp.down_proj.bias)))
    first, c = models[0], models[0].config
    embed = st(lambda m: m.model.embed_tokens.weight)
    head = embed if shape[-1] else st(lambda m: m.lm_head.weight)
    H = c.num_attention_heads
    return Stack(embed=embed, head=head, norm=st(lambda m: m.model.norm.weight), layers=tuple(layers), H=H,
                 Hkv=c.num_key_value_heads or H, D=getattr(c, "head_dim", None) or c.hidden_size // H,
                 eps=first.model.norm.variance_epsilon, pad=first.model.embed_tokens.padding_idx,
                 rotary=first.model.rotary_emb)


def _per_run(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``w`` (R, *f) viewed to broadcast against ``x`` (R, ..., *f)."""
    return w.view(w.shape[0], *(1,) * (x.dim() - w.dim()), *w.shape[1:])


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``transformers``' RMSNorm of ``x`` (R, ..., n) with each run's weight ``w`` (R, n), in float32."""
    return _per_run(w, x) * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``x W_r^T + b_r`` for each run: ``x`` (R, ..., in), ``w`` (R, out, in), ``b`` (R, out) or None. R = 1 is
    ``F.linear``; R > 1 one ``torch.bmm`` over runs."""
    if w.shape[0] == 1:
        return F.linear(x, w[0], None if b is None else b[0])
    y = torch.bmm(x.reshape(w.shape[0], -1, x.shape[-1]), w.transpose(1, 2))
    if b is not None:  # (in the product's dtype, as F.linear adds it under autocast)
        y = y + b[:, None].to(y.dtype)
    return y.view(*x.shape[:-1], w.shape[1])


def embed(s: Stack, ids: torch.Tensor) -> torch.Tensor:
    """Each run's embedding of its token ids ``ids`` (R, ...): ``(R, ..., hidden)``. As ``nn.Embedding``, the
    padding row gets no gradient from here."""
    if s.R == 1:
        return F.embedding(ids[0], s.embed[0], s.pad)[None]
    V = s.embed.shape[1]
    offset = torch.arange(s.R, device=ids.device).view(s.R, *(1,) * (ids.dim() - 1)) * V
    h = F.embedding(ids + offset, s.embed.flatten(0, 1))
    return h if s.pad is None else torch.where((ids == s.pad)[..., None], h.detach(), h)


def rotary(s: Stack, like: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the model's rotary embedding at positions ``pos`` (any 2-D shape), in ``like``'s dtype."""
    return s.rotary(like, pos)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding ``x cos + rotate_half(x) sin`` with ``rotate_half(x) = (-x2, x1)``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def qkv(s: Stack, i: int, h: torch.Tensor, cos, sin):
    """Queries, keys and values of layer i on ``h`` (R, ..., hidden), shaped (R, ..., heads, D): one product
    with the fused q/k/v weight, Qwen3's per-head norm of q and k, then the rotary embedding (``cos``, ``sin``
    broadcast against (R, ..., heads, D))."""
    w, H, Hkv, D = s.layers[i], s.H, s.Hkv, s.D
    q, k, v = linear(rms(h, w.in_norm, s.eps), w.qkv_w, w.qkv_b).split((H * D, Hkv * D, Hkv * D), -1)
    q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))
    if w.q_norm is not None:  # Qwen3 normalises queries and keys per head
        q, k = rms(q, w.q_norm, s.eps), rms(k, w.k_norm, s.eps)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def mlp_residual(s: Stack, i: int, h: torch.Tensor) -> torch.Tensor:
    """``h`` plus layer i's SwiGLU MLP of its normalised self, gate and up as one fused product."""
    w = s.layers[i]
    gate, up = linear(rms(h, w.post_norm, s.eps), w.gate_up_w, w.gate_up_b).chunk(2, -1)
    return h + linear(F.silu(gate) * up, w.down_w, w.down_b)


def layer(s: Stack, i: int, h: torch.Tensor, cos, sin, attend) -> torch.Tensor:
    """Block i on ``h`` (R, ..., hidden). ``attend(i, q, k, v)`` gets the rotated queries, keys and values
    (R, ..., heads, D) and returns the attention output (R, ..., H * D)."""
    w = s.layers[i]
    q, k, v = qkv(s, i, h, cos, sin)
    h = h + linear(attend(i, q, k, v), w.o_w, w.o_b)
    return mlp_residual(s, i, h)


def logits(s: Stack, h: torch.Tensor) -> torch.Tensor:
    """Each run's output head after the final norm: ``h`` (R, ..., hidden) -> (R, ..., V)."""
    return linear(rms(h, s.norm, s.eps), s.head, None)
