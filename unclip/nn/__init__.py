"""Network blocks shared by the diffusion stages: the ADM/GLIDE UNet (decoder, upsamplers) and its layers, and
`eval_mode`."""

from unclip.nn.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_module,
)
from unclip.nn.mode import eval_mode
from unclip.nn.unet import UNet, UNetConfig

__all__ = [
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "Upsample",
    "eval_mode",
    "group_norm",
    "timestep_embedding",
    "zero_module",
]
