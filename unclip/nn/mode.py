"""A module's train / eval mode for the length of a block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode within the block; its training mode restored after (also on an exception)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
