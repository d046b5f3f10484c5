"""The decoder: CLIP image embedding (+ optional caption tokens) -> image, the cascade's base stage.

    from decoder import Decoder, decode, image_variations
    decoder = Decoder.from_pretrained("runs/decoder-shapes-tiny/model")
    images = decode(decoder, clip.encode_image(pil_images), guidance_scale=3.0)     # (b, 3, s, s) in [0, 1]
    variations = image_variations(decoder, clip, pil_images, n=4, eta=1.0)         # (b, 4, 3, s, s)
"""

from .config import DecoderConfig, DecoderDataConfig, DecoderEvalConfig, TrainDecoderConfig
from .evaluation import reconstruction_accuracy
from .model import KIND, Decoder
from .sampling import decode
from .training import DecoderTrainTask
from .variations import image_variations

__all__ = [
    "KIND",
    "Decoder",
    "DecoderConfig",
    "DecoderDataConfig",
    "DecoderEvalConfig",
    "DecoderTrainTask",
    "TrainDecoderConfig",
    "decode",
    "image_variations",
    "reconstruction_accuracy",
]
