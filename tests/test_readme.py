"""The README's Python examples run as written, in order, on the shipped SHAPES pipeline (CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_examples_for_every_stage():
    code = "\n".join(python_blocks())
    for name in ("unclip.generate", "Clip.from_pretrained", "sample_image_embeds", "decode(", "run_cascade"):
        assert name in code, name


@pytest.mark.slow
def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what the examples write (a pipeline directory) lands here
    namespace: dict = {}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {i + 1} failed: {e!r}\n{block}") from e
    assert (tmp_path / "my-pipeline" / "pipeline.json").is_file()
    assert namespace["x128"].shape[-1] == 128 and len(namespace["edits"]) == 5
