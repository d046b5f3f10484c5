"""Shared fixtures: tiny, randomly initialised open_clip models that build in a fraction of a second."""

from __future__ import annotations

import pytest
import torch

TINY_ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 2},
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _single_threaded_torch():
    """The suite's models are tiny: one thread is faster than two, and stays fast when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_arch() -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in TINY_ARCH.items()}


@pytest.fixture(scope="session")
def tiny_clip(tiny_arch):
    from unclip.clip import Clip

    torch.manual_seed(0)
    return Clip.from_architecture(tiny_arch, model_name="tiny-test")
