"""Exponential moving average of a module's trainable weights, kept in fp32 in a separate module.

    ema = EMA(model, decay=0.9999)
    ...after each optimizer step:  ema.update(model)
    ema.model                       # an eval-mode copy holding the averaged weights

Frozen parameters (requires_grad=False) are shared with the source module instead of copied, so a frozen
CLIP inside a decoder costs no extra memory. Buffers are copied from the source at every update. The
effective decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not
dominated by the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..checkpoint import CheckpointError

__all__ = ["EMA"]


class EMA:
    """fp32 shadow copy of `model`'s trainable parameters, updated by `update(model)`."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        frozen = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=frozen)  # frozen params are shared, not copied
        self.param_names = [name for name, p in model.named_parameters() if p.requires_grad]
        self.buffer_names = [name for name, _ in model.named_buffers()]
        own = dict(self.model.named_parameters())
        for name in self.param_names:
            own[name].requires_grad_(False)
            own[name].data = own[name].data.float()
        self.model.eval()

    def current_decay(self) -> float:
        """The decay the next update will use."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards `model`'s (the unwrapped module the EMA was built from)."""
        weight = 1.0 - self.current_decay()
        src_params, own_params = dict(model.named_parameters()), dict(self.model.named_parameters())
        for name in self.param_names:
            own_params[name].lerp_(src_params[name].detach().float(), weight)
        src_buffers, own_buffers = dict(model.named_buffers()), dict(self.model.named_buffers())
        for name in self.buffer_names:
            own_buffers[name].copy_(src_buffers[name])
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged parameters and the buffers, by name (frozen parameters are not included)."""
        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        state = {name: params[name].detach() for name in self.param_names}
        state.update({name: buffers[name].detach() for name in self.buffer_names})
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], *, source: str = "EMA checkpoint") -> None:
        """Restore what `state_dict` returned; the key set must match exactly."""
        expected = set(self.param_names) | set(self.buffer_names)
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise CheckpointError(
                f"the EMA weights in {source} do not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        targets = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for name, value in state.items():
            if targets[name].shape != value.shape:
                raise CheckpointError(
                    f"the EMA weight {name} in {source} has shape {tuple(value.shape)}, "
                    f"the model {tuple(targets[name].shape)}"
                )
            targets[name].copy_(value)
