"""The building blocks of the ADM/GLIDE UNet: timestep embedding, residual block, attention, resampling.

    emb = time_mlp(timestep_embedding(t, 128))                  # (b,) -> (b, 128) -> (b, e)
    h = ResBlock(64, 128, e)(h, emb)                            # (b, 64, H, W) -> (b, 128, H, W)
    h = AttentionBlock(128, 32, context_dim=256)(h, ctx, mask)  # self-attention + attention to context tokens

The residual block conditions on the embedding by scale-and-shift of its second normalisation (ADM's
`use_scale_shift_norm`): h = norm(h) * (1 + scale) + shift. The attention block concatenates projected context
tokens in front of its own keys and values (GLIDE's `encoder_kv`), so one softmax covers the image positions
and the context, and runs through `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

__all__ = ["timestep_embedding", "group_norm", "zero_module", "Downsample", "Upsample", "ResBlock", "AttentionBlock"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: t (b,) -> (b, dim), [cos | sin] halves."""
    assert t.ndim == 1, f"t must be (b,), got {tuple(t.shape)}"
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (b, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class _GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation and weight dtypes (as ADM does)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
            # Sampling: the CPU kernel takes bf16 activations with float32 (or bf16) affine parameters and computes in
            # float32 throughout: the numbers of the upcast below (identical on channels_last input, else within one
            # bf16 rounding) without its two full-size copies, about 2x faster. Not in training: its backward is
            # 2-3x slower than the float32 one (torch 2.14, measured).
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels`."""
    return _GroupNorm32(math.gcd(groups, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: a residual branch that starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Halve the size by a stride-2 3x3 conv (`conv`) or 2x2 average pooling: (b, c, H, W) -> (b, o, H/2, W/2)."""

    def __init__(self, channels: int, out_channels: int | None = None, conv: bool = True) -> None:
        super().__init__()
        out_channels = out_channels or channels
        assert conv or out_channels == channels, "average pooling cannot change the channel count"
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour, then a 3x3 conv if `conv`. (b, c, H, W) -> (b, o, 2H, 2W)."""

    def __init__(self, channels: int, out_channels: int | None = None, conv: bool = True) -> None:
        super().__init__()
        out_channels = out_channels or channels
        assert conv or out_channels == channels, "upsampling without a conv cannot change the channel count"
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1) if conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """ADM residual block conditioned on an embedding: (b, c, H, W), (b, e) -> (b, o, H', W').

    `resample` "down"/"up" halves/doubles the size inside the block (BigGAN-style, on both branches).
    With `scale_shift` the embedding gives (scale, shift) applied after the second GroupNorm; otherwise it is
    added to the features. The last conv is zero-initialised, so the block starts as its skip connection.
    """

    def __init__(self, channels: int, out_channels: int, emb_dim: int, *, dropout: float = 0.0,
                 scale_shift: bool = True, resample: str | None = None, groups: int = 32) -> None:
        super().__init__()
        assert resample in (None, "up", "down"), f"resample must be None, 'up' or 'down', got {resample!r}"
        self.scale_shift = scale_shift
        self.in_norm = group_norm(channels, groups)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        if resample == "down":
            self.h_resample, self.x_resample = Downsample(channels, conv=False), Downsample(channels, conv=False)
        elif resample == "up":
            self.h_resample, self.x_resample = Upsample(channels, conv=False), Upsample(channels, conv=False)
        else:
            self.h_resample = self.x_resample = nn.Identity()
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels if scale_shift else out_channels)
        self.out_norm = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self.h_resample(h))
        e = rearrange(self.emb_proj(F.silu(emb)).to(h.dtype), "b c -> b c 1 1")
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_norm(h), 1 + scale)  # norm(h) * (1 + scale) + shift, one pass
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(self.x_resample(x)) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, optionally also attending to context tokens.

    x: (b, c, H, W); context: (b, m, context_dim) or None; context_mask: (b, m) bool, True where a context
    token may be attended to (None: all). The context's keys and values are projected per block and put in
    front of the image's own (GLIDE), so the image positions are always there to attend to and no query row
    is ever fully masked. The output projection is zero-initialised (the block starts as the identity).
    """

    def __init__(self, channels: int, head_channels: int = 64, *, context_dim: int | None = None,
                 groups: int = 32) -> None:
        super().__init__()
        assert channels % head_channels == 0, f"channels {channels} not divisible by head_channels {head_channels}"
        self.heads = channels // head_channels
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim is not None else None
        self.out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        b, c, height, width = x.shape
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        q, k, v = rearrange(self.qkv(tokens), "b n (three heads d) -> three b heads n d", three=3, heads=self.heads)
        mask = None
        if self.context_kv is not None and context is not None:
            assert context.shape[0] == b, f"context batch {context.shape[0]} != {b}"
            ck, cv = rearrange(self.context_kv(context.to(tokens.dtype)), "b m (two heads d) -> two b heads m d",
                               two=2, heads=self.heads)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)  # (b, heads, m + n, d)
            if context_mask is not None:
                assert context_mask.shape == context.shape[:2], f"context_mask must be (b, m) = {context.shape[:2]}"
                own = torch.ones(b, height * width, dtype=torch.bool, device=x.device)
                mask = repeat(torch.cat([context_mask.bool(), own], dim=1), "b k -> b 1 1 k")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, heads, n, d)
        out = self.out(rearrange(out, "b heads n d -> b n (heads d)"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=height, w=width)
