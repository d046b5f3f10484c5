"""Shared by the benchmark scripts: write a result JSON and replace one `## Section` of BENCHMARKS.md.

    write_result("sampling_steps", data)                         # benchmarks/results/sampling_steps.json
    write_section("Few-step sampling", markdown_body)            # the section, replaced in place or appended
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery number below was written by the script named in its section, with the command shown.\n"


def machine() -> str:
    """One line naming the machine: CPU count and model or the GPU, torch version."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cpu = platform.processor() or platform.machine()
    return f"{gpu or f'{torch.get_num_threads()} CPU threads ({cpu})'}, torch {torch.__version__}"


def command() -> str:
    """The command line that is running (for the report)."""
    return " ".join(["python", *sys.argv])


def write_result(name: str, data: dict[str, Any]) -> Path:
    """benchmarks/results/NAME.json with the data, the command and the machine."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"command": command(), "machine": machine(), **data}, indent=2) + "\n")
    return path


def write_section(title: str, body: str) -> None:
    """Replace the `## title` section of BENCHMARKS.md with `body` (appended when absent)."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    heading = f"## {title}\n"
    block = f"{heading}\n{body.strip()}\n"
    if heading in text:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        end = len(text) if nxt < 0 else nxt + 1
        text = text[:start] + block + ("\n" + text[end:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    BENCHMARKS_MD.write_text(text)
