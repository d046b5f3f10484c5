"""The diffusion prior: CLIP text embedding -> CLIP image embedding. Built in a later issue."""
