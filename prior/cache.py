"""The caption-prefix cache for sampling the prior: the caption's keys and values are computed once.

The prior's sequence is [text tokens | text embed | timestep | x_t | query] under causal attention, so every
layer's keys and values at the prefix [text tokens | text embed] depend on the caption alone: they are the same at
every diffusion step, for every best-of-N candidate, and, for the null (unconditional) prefix, for every caption.

    prefix = prior.encode_prefix(text_embed, text_states, text_mask)   # one pass over g prefixes
    out = prior.forward_cached(x_t, t, prefix)                         # x_t (g * m, d): m rows per prefix
    out = prior.forward_cached(x_t, t, prefix, null)                   # 2 * g * m rows: then all on `null`

`encode_prefix` runs the prior's own x-transformers Decoder over the prefix (its `return_hiddens` intermediates
carry every attention layer's keys and values). `suffix_forward` then runs only the 3 suffix positions through
the same layers, attending to [cached prefix | suffix]; the m rows of a prefix share its keys and values without
copying them (`prefix_attention`). Eval only: dropout is not applied on this path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor
from x_transformers import Decoder
from x_transformers.x_transformers import Attention, FeedForward, LayerIntermediates, Residual

__all__ = ["PrefixCache", "prefix_cache_from_intermediates", "prefix_attention", "suffix_forward", "check_cacheable"]


@dataclass(frozen=True, eq=False)
class PrefixCache:
    """Every attention layer's keys and values at g caption prefixes [text tokens | text embed]."""

    keys: tuple[Tensor, ...]  # one (g, h, p, dh) per attention layer; p = text_length + 1
    values: tuple[Tensor, ...]  # one (g, h, p, dh) per attention layer
    mask: Tensor  # (g, p) bool, True where the key may be attended to (padded text tokens are False)

    def __len__(self) -> int:
        return self.mask.shape[0]

    def select(self, index: Tensor) -> PrefixCache:
        """The prefixes at `index` (k,) long, in that order (repeats allowed): a cache of k prefixes."""
        return PrefixCache(tuple(k[index] for k in self.keys), tuple(v[index] for v in self.values), self.mask[index])


def prefix_cache_from_intermediates(intermediates: LayerIntermediates, mask: Tensor) -> PrefixCache:
    """The cache from an x-transformers pass over the prefix with `return_hiddens=True` (mask: (g, p) bool)."""
    kvs = [inter.cached_kv for inter in intermediates.attn_intermediates if inter.layer_type == "a"]
    assert kvs and all(kv is not None for kv in kvs), "the pass returned no cached keys and values"
    # contiguous once here, so that every step's batched matmuls read them in place
    return PrefixCache(tuple(k.contiguous() for k, _ in kvs), tuple(v.contiguous() for _, v in kvs), mask)


def check_cacheable(transformer: Decoder) -> None:
    """Refuse a Decoder whose layers `suffix_forward` does not reproduce: it covers x-transformers' plain pre-norm
    Decoder (LayerNorm, multi-head attention without extras, feed-forward, plain residuals, final norm)."""
    t = transformer
    assert t.layer_types == ("a", "f") * (len(t.layer_types) // 2), f"layer types {t.layer_types}"
    plain = (t.rel_pos, t.rotary_pos_emb, t.polar_pos_emb) == (None, None, None) and not (
        t.need_condition or t.add_value_residual or t.residual_attn or t.softclamp_output
    ) and t.num_residual_streams == 1  # fmt: skip
    assert plain, "the prefix cache supports the plain Decoder only"
    for (pre_norm, post_branch_norm, post_main_norm), block, residual in t.layers:
        assert pre_norm is not None and post_branch_norm is None and post_main_norm is None, "pre-norm layers only"
        assert type(residual) is Residual and residual.residual_scale is None and residual.scale_residual_constant == 1
        assert isinstance(block, FeedForward | Attention)
        if isinstance(block, Attention):
            extras = (block.qk_norm, block.num_mem_kv, block.head_scale, block.laser, block.use_latent_kv,
                      block.use_latent_q, block.orthog_projected_values, block.orthog_projected_values_per_head)
            modules = (block.to_v_gate, block.to_output_gate, block.to_v_head_gate, block.hybrid_module,
                       block.data_dependent_alibi, block.rel_proj_pos_bias, block.q_rmsnorm, block.k_rmsnorm,
                       block.value_rmsnorm)
            assert not any(extras) and all(m is None for m in modules), "plain multi-head attention only"
            assert block.kv_heads == block.heads and block.attend.scale is not None


def prefix_attention(
    attn: Attention, x: Tensor, key: Tensor, value: Tensor, mask: Tensor, queries: int | None = None
) -> Tensor:
    """`attn` (an x-transformers Attention) for suffix positions x (g * m, s, width), rows '(g m)', attending
    causally to their own s suffix positions after their group's cached prefix: key, value (g, h, p, dh), mask
    (g, p). The softmax runs over [prefix | suffix] keys at once; the prefix is shared by the m rows, not copied.
    queries: only the last `queries` positions query (all s are keys). Returns (g * m, queries or s, width)."""
    g, h, p, _ = key.shape
    n, s, _ = x.shape
    m, r = n // g, s if queries is None else queries
    q = rearrange(attn.to_q(x[:, s - r :]), "(g m) s (h d) -> g h m s d", g=g, h=h)
    k, v = (rearrange(proj(x), "(g m) s (h d) -> g h m s d", g=g, h=h) for proj in (attn.to_k, attn.to_v))
    # matmul against the (g, h, p, d) cache and its transposed view: batched over (g, h) without copying the cache
    scores_prefix = (q.reshape(g, h, m * r, -1) @ key.transpose(-1, -2)).view(g, h, m, r, p)
    scores_suffix = q @ k.transpose(-1, -2)  # (g, h, m, r, s)
    neg = -torch.finfo(scores_prefix.dtype).max
    scores_prefix = scores_prefix.masked_fill(~mask[:, None, None, None, :], neg)
    causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)[s - r :]  # (r, s): True after the query
    scores_suffix = scores_suffix.masked_fill(causal, neg)
    scores = torch.cat([scores_prefix, scores_suffix], dim=-1) * attn.attend.scale  # (g, h, m, r, p + s)
    weights = scores.softmax(dim=-1)
    out = (weights[..., :p].reshape(g, h, m * r, p) @ value).view(g, h, m, r, -1) + weights[..., p:] @ v
    return attn.to_out(rearrange(out, "g h m s d -> (g m) s (h d)"))


def suffix_forward(transformer: Decoder, x: Tensor, prefixes: Sequence[PrefixCache]) -> Tensor:
    """The Decoder's output at the last suffix position (n, width), final norm applied, for the suffix positions
    x (n, s, width), as if each row's full sequence had been run. The n rows split into len(prefixes) equal
    parts, part j into len(prefixes[j]) groups of consecutive rows, group i taking prefix i of prefixes[j]
    (e.g. b captions' prefixes with n rows each, then the null prefix alone for the next b * n rows). The last
    layers (from the last attention on) compute the last position only: earlier ones are only its keys there."""
    parts = len(prefixes)
    assert x.shape[0] % parts == 0 and all((x.shape[0] // parts) % len(p) == 0 for p in prefixes), (
        f"{x.shape[0]} rows do not split into the prefix groups {[len(p) for p in prefixes]}"
    )
    layers = list(transformer.layers)
    last_attn = max(i for i, (_, block, _) in enumerate(layers) if isinstance(block, Attention))
    layer = 0
    for i, ((pre_norm, _, _), block, residual) in enumerate(layers):
        normed = pre_norm(x)
        if isinstance(block, Attention):
            queries = 1 if i == last_attn else None
            out = torch.cat([
                prefix_attention(block, rows, p.keys[layer], p.values[layer], p.mask, queries)
                for rows, p in zip(normed.chunk(parts), prefixes, strict=True)
            ])  # fmt: skip
            x, layer = x[:, -out.shape[1] :], layer + 1
        else:
            out = block(normed)
        x = residual(out, x)
    assert all(layer == len(p.keys) for p in prefixes), f"the Decoder has {layer} attention layers, not the cache's"
    return transformer.final_norm(x[:, -1])
