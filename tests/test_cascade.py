"""The upsampling cascade (pipeline layer): shapes through two upsamplers, the SHAPES agreement report, its CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_decoder import randomised
from test_upsamplers import tiny_config

from unclip.cli.main import main
from unclip.pipeline.cascade import cascade_agreement, run_cascade
from upsamplers import Upsampler, upsample


def tiny_upsampler(low: int, seed: int, augmentation: str = "blur") -> Upsampler:
    torch.manual_seed(seed)
    return randomised(Upsampler(tiny_config(low, 2 * low, augmentation, sample_steps=2)), seed)


@pytest.fixture(scope="module")
def cascade():
    return [tiny_upsampler(16, 0), tiny_upsampler(32, 1, "bsr")]


def test_cascade_shapes_16_32_64(cascade):
    base = torch.rand(2, 3, 16, 16)
    outputs = run_cascade(base, cascade, generator=torch.Generator().manual_seed(0))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 32), (2, 3, 64, 64)]
    assert all(0 <= o.min() and o.max() <= 1 for o in outputs)
    again = run_cascade(base, cascade, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(outputs, again, strict=True)), "same seed, same cascade"
    # the first stage is exactly `upsample` with the shared generator; per-stage steps and levels are honoured
    g = torch.Generator().manual_seed(3)
    first = upsample(cascade[0], base, steps=1, aug_level=0.5, generator=g)
    staged = run_cascade(base, cascade, steps=[1, 2], aug_levels=[0.5, None],
                         generator=torch.Generator().manual_seed(3))
    assert torch.equal(staged[0], first)
    with pytest.raises(ValueError, match="takes 16px"):
        run_cascade(torch.rand(1, 3, 32, 32), cascade)
    with pytest.raises(ValueError, match="2 upsamplers"):
        run_cascade(base, cascade, steps=[3])


def test_upsamplers_in_the_wrong_order_are_refused_before_any_sampling(cascade, tiny_clip, tmp_path, monkeypatch,
                                                                       capsys):
    """32 -> 64 then 16 -> 32: refused before the first stage runs (minutes at full size)."""
    import unclip.stage as stage_module

    def never(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(stage_module, "sample", never)  # every stage's sampling loop (`run_sampler`)
    message = r"upsampler 2 takes 16px images but upsampler 1 makes 64px ones \(upsamplers go lowest resolution first\)"
    with pytest.raises(ValueError, match=message):
        run_cascade(torch.rand(1, 3, 32, 32), cascade[::-1])
    with pytest.raises(ValueError, match=message):
        cascade_agreement(cascade[::-1], tiny_clip, samples=2)
    for i, up in enumerate(cascade):
        up.save_pretrained(tmp_path / f"up{i}")
    tiny_clip.save_pretrained(tmp_path / "clip")
    assert main(["eval-cascade", "--upsamplers", str(tmp_path / "up1"), str(tmp_path / "up0"),
                 "--clip", str(tmp_path / "clip"), "--samples", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "upsampler 2 takes 16px images but upsampler 1 makes 64px ones" in err


def test_cascade_agreement_report(cascade, tiny_clip):
    report = cascade_agreement(cascade, tiny_clip, samples=4, batch_size=3)
    assert report["samples"] == 4 and report["sizes"] == [16, 32, 64]
    for key in ("agreement", "base_accuracy", "output_accuracy"):
        assert set(report[key]) == {"shape", "fg", "bg", "all"} and all(0 <= v <= 1 for v in report[key].values())
    given = cascade_agreement(cascade, tiny_clip, base_images=torch.rand(3, 3, 16, 16), batch_size=2)
    assert given["samples"] == 3 and "base_accuracy" not in given


def test_cascade_cli(cascade, tiny_clip, tmp_path, capsys):
    for i, up in enumerate(cascade):
        up.save_pretrained(tmp_path / f"up{i}")
    tiny_clip.save_pretrained(tmp_path / "clip")
    out = tmp_path / "report.json"
    assert main(["eval-cascade", "--upsamplers", str(tmp_path / "up0"), str(tmp_path / "up1"),
                 "--clip", str(tmp_path / "clip"), "--samples", "3", "--batch-size", "3", "--device", "cpu",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cascade 16 -> 32 -> 64 on 3 held-out SHAPES images" in printed and "output vs base verdict" in printed
    assert json.loads(out.read_text())["sizes"] == [16, 32, 64]


def test_no_runnable_module_is_imported_by_its_package():
    """`python -m pkg.mod` warns (RuntimeWarning: found in sys.modules ... prior to execution) when importing `pkg`
    already imported `mod`: every module with a `__main__` block must stay out of its packages' imports. The README
    ran `python -m unclip.pipeline.cascade`, which unclip.pipeline imports (through the pipeline)."""
    root = Path(__file__).resolve().parents[1]
    runnable = sorted(".".join(p.relative_to(root).with_suffix("").parts) for p in (root / "unclip").rglob("*.py")
                      if 'if __name__ == "__main__":' in p.read_text())
    assert "unclip.cli.main" in runnable
    code = ("import importlib, sys\n"
            f"for name in {runnable!r}:\n"
            "    importlib.import_module(name.rpartition('.')[0])\n"
            f"print([name for name in {runnable!r} if name in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]", f"imported by their packages, so `python -m` warns: {out.strip()}"
