"""The shared ADM/GLIDE UNet (unclip.nn): shapes, conditioning paths, attention masking, config checks."""

import math

import pytest
import torch

from unclip.nn import AttentionBlock, ResBlock, UNet, UNetConfig, timestep_embedding


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised output layers weights, so that every input reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


def _small(**kw) -> UNetConfig:
    base = dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), image_size=8,
                head_channels=16, groups=8)
    return UNetConfig(**{**base, **kw})


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 10]), 6)
    assert emb.shape == (2, 6)
    assert torch.allclose(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    freqs = [math.exp(-math.log(10_000) * i / 3) for i in range(3)]
    expected = [math.cos(10 * f) for f in freqs] + [math.sin(10 * f) for f in freqs]
    assert torch.allclose(emb[1], torch.tensor(expected), atol=1e-5)
    assert timestep_embedding(torch.tensor([0.5, 3.0]), 7).shape == (2, 7)  # odd widths pad, fractional t work


@pytest.mark.parametrize(
    ("kw", "side", "batch"),
    [
        (dict(), 8, 1),
        (dict(channel_mult=(1, 2, 2), attention_resolutions=(8, 4), image_size=16), 16, 3),
        (dict(channel_mult=(1, 2, 2), attention_resolutions=(), image_size=32, in_channels=6, out_channels=6), 32, 2),
        (dict(resblock_updown=False, scale_shift_norm=False), 8, 2),
    ],
)
def test_output_shapes(kw, side, batch):
    cfg = _small(**kw)
    unet = UNet(cfg)
    x = torch.randn(batch, cfg.in_channels, side, side)
    out = unet(x, torch.randint(0, 1000, (batch,)))
    assert out.shape == (batch, cfg.out_channels, side, side)
    assert torch.all(out == 0), "the output conv is zero-initialised"


def test_runs_at_other_sides_and_counts_attention():
    unet = UNet(_small(channel_mult=(1, 2, 2), attention_resolutions=(8, 4), image_size=16))
    assert unet(torch.randn(2, 3, 32, 32), torch.tensor([1, 2])).shape == (2, 3, 32, 32)  # crops / larger inputs
    attention = [m for m in unet.modules() if isinstance(m, AttentionBlock)]
    assert len(attention) == 1 + 1 + 1 + 2 + 2  # down 8, down 4, middle, up 4 (x2), up 8 (x2)
    no_attention = UNet(_small(attention_resolutions=()))
    assert not [m for m in no_attention.modules() if isinstance(m, AttentionBlock)]
    assert len([m for m in no_attention.modules() if isinstance(m, ResBlock)]) == 1 + 1 + 1 + 2 + 2 + 1 + 2


def test_conditioning_reaches_the_output():
    torch.manual_seed(0)
    unet = _randomise(UNet(_small(cond_dim=5, context_dim=7)))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    cond, context = torch.randn(2, 5), torch.randn(2, 3, 7)
    base = unet(x, t, cond=cond, context=context)
    assert not torch.allclose(base, unet(x, t + 1, cond=cond, context=context))
    assert not torch.allclose(base, unet(x, t, cond=cond + 1, context=context))
    assert not torch.allclose(base, unet(x, t, cond=cond, context=context + 1))
    assert not torch.allclose(base, unet(x, t, cond=cond))  # no context: self-attention only
    # rows are independent
    assert torch.allclose(base[:1], unet(x[:1], t[:1], cond=cond[:1], context=context[:1]), atol=1e-5)


def test_masked_context_tokens_are_ignored():
    torch.manual_seed(0)
    unet = _randomise(UNet(_small(cond_dim=None, context_dim=4)))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    context = torch.randn(2, 5, 4)
    mask = torch.tensor([[True, True, False, False, False], [True, False, True, False, True]])
    out = unet(x, t, context=context, context_mask=mask)
    changed = torch.where(mask[..., None], context, torch.randn_like(context))
    assert torch.allclose(out, unet(x, t, context=changed, context_mask=mask), atol=1e-5)
    assert torch.allclose(out[:1], unet(x[:1], t[:1], context=context[:1, :2]), atol=1e-5)  # same as dropping them


def test_config_is_checked():
    with pytest.raises(ValueError, match="attention_resolutions"):
        _small(attention_resolutions=(3,))
    with pytest.raises(ValueError, match="divisible"):
        _small(image_size=9)
    with pytest.raises(ValueError, match="head_channels"):
        _small(model_channels=20, head_channels=16)
    unet = UNet(_small(cond_dim=4))
    with pytest.raises(AssertionError, match="cond"):
        unet(torch.randn(1, 3, 8, 8), torch.tensor([0]))


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_group_norm_of_bf16_activations_is_computed_in_float32(memory_format):
    """ADM's GroupNorm32: bf16 activations are normalised with float32 statistics, in training and in sampling (the
    CPU fast path, no_grad): the upcast computation's numbers (identical on channels_last, else within one bf16
    step)."""
    from unclip.nn.layers import group_norm

    g = torch.Generator().manual_seed(0)
    norm = group_norm(64, 32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    x = (torch.randn(4, 64, 8, 8, generator=g) * 30 + 100).to(torch.bfloat16)  # large mean: bf16 stats would fail
    x = x.contiguous(memory_format=memory_format)
    upstream = torch.randn(4, 64, 8, 8, generator=g).to(torch.bfloat16)
    outputs = []
    for module in (True, False):  # the layer, then the upcast reference
        xi = x.clone().requires_grad_()
        norm.zero_grad()
        y = norm(xi) if module else torch.nn.functional.group_norm(
            xi.float(), 32, norm.weight, norm.bias, norm.eps).to(torch.bfloat16)
        y.backward(upstream)
        outputs.append((y.float(), xi.grad.float(), norm.weight.grad.clone(), norm.bias.grad.clone()))
        with torch.no_grad():  # sampling: the fast path, against the reference's y
            outputs[-1] += (norm(x).float() if module else y.float(),)
    exact = memory_format == torch.channels_last
    for got, want in zip(*outputs):
        scale = want.abs().max()
        assert (got - want).abs().max() <= (0 if exact else 2**-7 * scale + 1e-4)
