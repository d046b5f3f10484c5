"""The upsamplers: diffusion super-resolution stages of the cascade (DALL-E 2: 64 -> 256 -> 1024).

    from upsamplers import Upsampler, upsample
    up1 = Upsampler.from_pretrained("runs/upsampler-32-64/model")
    up2 = Upsampler.from_pretrained("runs/upsampler-64-128/model")
    x64 = upsample(up1, x32, generator=torch.Generator().manual_seed(0))     # (b, 3, 64, 64) in [0, 1]
    x128 = upsample(up2, x64, steps=15, aug_level=0.1)                       # (b, 3, 128, 128) in [0, 1]
    report = psnr_vs_bicubic(up1, samples=200)                               # {"bicubic": dB, "model": {...}}

Each is a convolutional UNet (no attention) over the noisy image and the upsampled, corrupted low-resolution
image, told the corruption level; trained on random crops with `train-upsampler`.
"""

from .config import (
    Augmentation,
    TrainUpsamplerConfig,
    UpsamplerConfig,
    UpsamplerDataConfig,
    UpsamplerEvalConfig,
)
from .degradations import bsr_degrade, corrupt, gaussian_blur
from .evaluation import psnr, psnr_vs_bicubic
from .model import KIND, Upsampler, corrupt_and_upsample, upsample_bicubic
from .sampling import upsample
from .training import UpsamplerTrainTask, random_crops, training_crops

__all__ = [
    "KIND",
    "Augmentation",
    "TrainUpsamplerConfig",
    "Upsampler",
    "UpsamplerConfig",
    "UpsamplerDataConfig",
    "UpsamplerEvalConfig",
    "UpsamplerTrainTask",
    "bsr_degrade",
    "corrupt",
    "corrupt_and_upsample",
    "gaussian_blur",
    "psnr",
    "psnr_vs_bicubic",
    "random_crops",
    "training_crops",
    "upsample",
    "upsample_bicubic",
]
