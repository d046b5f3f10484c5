"""The ADM/GLIDE UNet (Dhariwal & Nichol 2021; Nichol et al. 2022) that the decoder and the upsamplers share.

    unet = UNet(UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(8, 4), image_size=16,
                           cond_dim=128, context_dim=128))
    out = unet(x_t, t, cond=c, context=tokens, context_mask=mask)   # (b, 3, 16, 16)

Levels: one per entry of `channel_mult`, each `num_res_blocks` residual blocks wide at `model_channels * mult`,
halving the resolution between levels; a middle block; and a mirrored decoder path with skip connections.
Conditioning:
- the timestep t (b,) (long, or float for continuous levels) is embedded sinusoidally and by an MLP into (b, e);
- an optional vector `cond` (b, cond_dim) is projected and added to it (the decoder's CLIP image embedding, an
  upsampler's noise-augmentation level); every residual block sees the sum by scale-and-shift;
- optional context tokens (b, m, context_dim) are attended to by every attention layer (GLIDE's encoder_kv).
Attention sits at the feature-map sides listed in `attention_resolutions` (none: a pure convolutional UNet, as
the upsamplers use); the middle block attends when the lowest resolution is listed. Extra input channels (an
upsampled low-resolution image concatenated to x_t) are just a larger `in_channels`.
`set_gradient_checkpointing(True)` recomputes each block's activations in the backward instead of storing them
(same gradients, dropout included; less memory, about a third more compute); the trainer's
`gradient_checkpointing` option calls it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from unclip.nn.layers import AttentionBlock, Downsample, ResBlock, Upsample, group_norm, timestep_embedding, zero_module

__all__ = ["UNetConfig", "UNet"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a UNet; the sizes of the paper-scale decoder are in configs/decoder/full-64.yaml."""

    in_channels: int = 3  # channels of the network input (x_t, plus any image concatenated to it)
    out_channels: int = 3  # channels of the output (twice the image's with a learned variance)
    model_channels: int = 64  # width of the first level; level i is model_channels * channel_mult[i] wide
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)  # one entry per resolution level, halving the size each time
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # feature-map sides (at image_size input) with attention
    image_size: int = 64  # the side the attention placement refers to; other sides divisible by 2^(levels-1) run too
    head_channels: int = 64  # channels per attention head
    dropout: float = 0.0  # dropout inside the residual blocks
    scale_shift_norm: bool = True  # condition by norm(h) * (1 + scale) + shift (ADM) instead of adding
    resblock_updown: bool = True  # resample with residual blocks (BigGAN) instead of plain conv / interpolation
    groups: int = 32  # GroupNorm groups (reduced to a divisor of the channel count where needed)
    time_embed_mult: int = 4  # width of the timestep embedding: model_channels * this
    cond_dim: int | None = None  # size of an extra conditioning vector added to the time embedding; None: none
    context_dim: int | None = None  # width of context tokens the attention layers attend to; None: none

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if levels < 1 or self.num_res_blocks < 1 or self.model_channels < 1:
            raise ValueError("a UNet needs at least one level, one residual block per level and positive width")
        if self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{levels - 1} ({levels} levels)")
        sides = {self.image_size // 2**i for i in range(levels)}
        unknown = sorted(set(self.attention_resolutions) - sides)
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} are not feature-map sides of this UNet: {sorted(sides)}")
        widths = [self.model_channels * m for i, m in enumerate(self.channel_mult)
                  if self.image_size // 2**i in self.attention_resolutions]
        if any(w % self.head_channels for w in widths):
            raise ValueError(f"attending level widths {widths} must be multiples of head_channels {self.head_channels}")

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)


class _Block(nn.ModuleList):
    """A sequence of layers, each called with what it needs (ResBlock: emb; AttentionBlock: the context)."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, context, context_mask)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """Noise-prediction UNet: x (b, in_channels, H, W), t (b,) -> (b, out_channels, H, W). See the module doc."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ch, emb_dim = cfg.model_channels, cfg.model_channels * cfg.time_embed_mult
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(cfg.cond_dim, emb_dim) if cfg.cond_dim is not None else None

        def res(c_in: int, c_out: int, resample: str | None = None) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, dropout=cfg.dropout, scale_shift=cfg.scale_shift_norm,
                            resample=resample, groups=cfg.groups)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, cfg.head_channels, context_dim=cfg.context_dim, groups=cfg.groups)

        self.input_blocks = nn.ModuleList([_Block([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        skip_channels, c, side = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(c, ch * mult)]
                c = ch * mult
                if side in cfg.attention_resolutions:
                    layers.append(attn(c))
                self.input_blocks.append(_Block(layers))
                skip_channels.append(c)
            if level < cfg.num_levels - 1:
                down = res(c, c, "down") if cfg.resblock_updown else Downsample(c, conv=True)
                self.input_blocks.append(_Block([down]))
                skip_channels.append(c)
                side //= 2

        middle: list[nn.Module] = [res(c, c)]
        if side in cfg.attention_resolutions:
            middle.append(attn(c))
        self.middle_block = _Block([*middle, res(c, c)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(c + skip_channels.pop(), ch * mult)]
                c = ch * mult
                if side in cfg.attention_resolutions:
                    layers.append(attn(c))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(res(c, c, "up") if cfg.resblock_updown else Upsample(c, conv=True))
                    side *= 2
                self.output_blocks.append(_Block(layers))
        assert not skip_channels, "every skip connection is consumed"
        self.out = nn.Sequential(group_norm(c, cfg.groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(c, cfg.out_channels, 3, padding=1)))
        self.gradient_checkpointing = False  # a training-time switch, not part of the architecture or the config

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every block's activations in the backward pass (torch.utils.checkpoint) while grad is on."""
        self.gradient_checkpointing = enabled

    def _run(self, block: _Block, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, mask, use_reentrant=False)  # RNG (dropout) state is replayed
        return block(h, emb, context, mask)

    def forward(self, x: Tensor, t: Tensor, *, cond: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """x (b, in_channels, H, W), t (b,), cond (b, cond_dim), context (b, m, context_dim), context_mask (b, m)
        bool -> (b, out_channels, H, W). cond is required iff the config has a cond_dim; context is optional."""
        cfg = self.config
        b, _, height, width = x.shape
        assert x.shape[1] == cfg.in_channels, f"expected {cfg.in_channels} input channels, got {x.shape[1]}"
        assert t.shape == (b,), f"t must be (b,) = ({b},), got {tuple(t.shape)}"
        factor = 2 ** (cfg.num_levels - 1)
        assert height % factor == 0 and width % factor == 0, f"H, W must be divisible by {factor}, got {height}x{width}"
        emb = self.time_mlp(timestep_embedding(t, cfg.model_channels).to(x.dtype))  # (b, e)
        if self.cond_proj is not None:
            assert cond is not None and cond.shape == (b, cfg.cond_dim), f"cond must be (b, {cfg.cond_dim})"
            emb = emb + self.cond_proj(cond.to(emb.dtype))
        else:
            assert cond is None, "this UNet has no cond_dim; cond must be None"
        if context is not None:
            assert cfg.context_dim is not None, "this UNet has no context_dim; context must be None"
            assert context.ndim == 3 and context.shape[0] == b and context.shape[2] == cfg.context_dim, (
                f"context must be (b, m, {cfg.context_dim}), got {tuple(context.shape)}")
        skips = []
        # oneDNN's convolutions (CPU) are faster on channels_last activations (measured ~10-15% per UNet step); the
        # numbers are the same within float tolerance. Elsewhere the caller's layout is kept (see TrainConfig).
        h = x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        x_format = torch.channels_last if nhwc else torch.contiguous_format  # the output's: the input's layout
        for block in self.input_blocks:
            h = self._run(block, h, emb, context, context_mask)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context, context_mask)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h).contiguous(memory_format=x_format)  # in x's layout: randn_like(output) draws alike
