"""The decoder: CLIP image embedding -> 64x64 image (the cascade's base stage). Built in a later issue."""
