"""Network blocks shared by the diffusion stages: the ADM/GLIDE UNet (decoder, upsamplers) and its layers."""

from unclip.nn.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    timestep_embedding,
    zero_module,
)
from unclip.nn.unet import UNet, UNetConfig

__all__ = [
    "AttentionBlock",
    "Downsample",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "Upsample",
    "group_norm",
    "timestep_embedding",
    "zero_module",
]
