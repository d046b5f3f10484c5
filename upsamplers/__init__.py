"""Diffusion super-resolution stages of the cascade. Built in a later issue."""
