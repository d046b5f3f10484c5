"""Which device to run on: one answer for the library and the command line.

    resolve_device(None)       # CUDA when available, else the CPU (also "auto")
    resolve_device("cuda:1")   # torch.device("cuda:1"), or a ValueError saying why it cannot be had
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """None or "auto": CUDA when available, else the CPU; otherwise the device `name` names. A name torch does not
    know, a CUDA device on a machine without CUDA, and a CUDA index past the last device are ValueErrors."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(name)!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r} requested but CUDA is not available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(name)!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                             "exist")
    return device
