"""What every `train-*` script shares: arguments, config loading with overrides, the Trainer run.

A stage's script is a few lines:

    def main(argv=None):
        return training_main("train-prior", __doc__, TrainPriorConfig, PriorTrainTask, argv, after=evaluate)

Its config dataclass must have a `train: TrainConfig` field; `make_task(cfg)` builds the TrainTask;
`after(cfg, output_dir)` runs on the main process once training is done (an evaluation, a report).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, write_json_atomic
from ..config import ConfigError, UnknownKeyError, load_config, replace_config
from ..data.image_text import DataError
from .common import CliError, check_writable, parse_assignment, positive_int

__all__ = ["training_main", "parse_overrides", "build_training_parser", "write_eval", "EVALUATION_FILES"]

# what the scripts' `after` hooks write about the trained model; a --no-resume run deletes the replaced run's
EVALUATION_FILES = ("eval.json", "eval-[0-9]*-[0-9]*.json", "zero_shot.json")  # eval-<time>.json: write_eval's


def write_eval(out: Path, report: dict[str, Any]) -> Path:
    """Write OUTPUT_DIR/eval.json (the report should name its sampler settings); an earlier one, e.g. from another
    sampler on the same finished run, is kept beside it as eval-<the time it was written>.json."""
    path = out / "eval.json"
    if path.is_file():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        kept, n = out / f"eval-{stamp}.json", 1
        while kept.exists():
            kept, n = out / f"eval-{stamp}-{n}.json", n + 1
        path.replace(kept)
        print(f"the previous evaluation is kept as {kept}")
    write_json_atomic(path, report)
    return path


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """`["train.lr=1e-3", "data.source=./folder"]` -> {"train.lr": 0.001, ...}; values read as YAML."""
    return dict(parse_assignment(item, "train.lr=1e-3") for item in items)


def build_training_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config", type=Path, help="YAML config (see configs/)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where checkpoints, logs and the final model go (default: runs/<stage>-<config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                   help="fine-tune: a fresh run starts from the weights of this model directory of the same stage\n"
                        "(OUTPUT_DIR/model of a run, or a pipeline's stage sub-directory); optimizer and step start\n"
                        "anew; a run with a checkpoint resumes from it instead (as --set train.init_from=DIR)")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch: delete this output directory's training checkpoints and evaluation "
                        f"files ({', '.join(EVALUATION_FILES)}) first")
    p.add_argument("--export-step", type=positive_int, default=None, metavar="STEP",
                   help="do not train: export the run's checkpoint of STEP (its EMA weights when it has them) as a\n"
                        "model directory, to evaluate or assemble an intermediate model")
    p.add_argument("--export-to", type=Path, default=None, metavar="DIR",
                   help="where --export-step writes the model (default: OUTPUT_DIR/model-step-STEP)")
    return p


def _script_configs() -> list[tuple[str, type]]:
    """(script, config class) of every training script (imported here: the CLI sits above the stages)."""
    from decoder import TrainDecoderConfig
    from prior import TrainPriorConfig
    from upsamplers import TrainUpsamplerConfig

    from ..clip.training import TrainClipConfig

    return [("train-clip", TrainClipConfig), ("train-prior", TrainPriorConfig), ("train-decoder", TrainDecoderConfig),
            ("train-upsampler", TrainUpsamplerConfig)]


def _other_script(path: Path, prog: str) -> str | None:
    """Another training script whose config the file at `path` is (None: no other script's). Only asked when the
    file itself has keys `prog`'s config does not know: a file that loads is this script's, whatever a --set got
    wrong, and one that lacks a key is an incomplete one."""
    for script, other in _script_configs():
        if script != prog:
            try:
                load_config(other, path)
            except (ConfigError, OSError, ValueError, TypeError):
                continue
            return script
    return None


def training_main(prog: str, description: str | None, config_cls: type, make_task: Callable[[Any], Any],
                  argv: Sequence[str] | None = None,
                  after: Callable[[Any, Path], None] | None = None) -> int:
    """Parse arguments, load the config, train (resuming by default), then run `after` on the main process."""
    args = build_training_parser(prog, description).parse_args(argv)
    try:
        from ..train import Trainer, end_process

        if args.export_to is not None and args.export_step is None:
            raise CliError("--export-to needs --export-step")
        try:
            loaded = load_config(config_cls, args.config)
        except UnknownKeyError:  # keys this script does not know: perhaps another script's file
            script = _other_script(args.config, prog)
            if script is None:
                raise
            hint = f"run `{script} {args.config}`"
            raise CliError(f"{args.config} is a {script} config, not a {prog} one: {hint}") from None
        overrides = parse_overrides(args.overrides)
        if args.init_from is not None:
            overrides["train.init_from"] = str(args.init_from)
        cfg = replace_config(loaded, overrides)
        out = args.output_dir or Path("runs") / f"{prog.removeprefix('train-')}-{args.config.stem}"
        check_writable(out, directory=True)  # before the task loads its data and models
        trainer = Trainer(make_task(cfg), cfg.train, out)
        if args.export_step is not None:
            dest = trainer.export_checkpoint(args.export_step, args.export_to or out / f"model-step-{args.export_step}")
            print(f"exported step {args.export_step} of {out} to {dest}")
            return 0
        result = trainer.train(resume=not args.no_resume, stale_outputs=EVALUATION_FILES)
        if trainer.accelerator.is_main_process:
            if result.losses:
                print(f"trained to step {result.step}; final loss {result.losses[-1]:.4f}; model in {out / 'model'}")
            else:
                print(f"nothing to train: already at step {result.step}; model in {out / 'model'}")
            if after is not None:
                after(cfg, out)
        if trainer.accelerator.num_processes > 1:
            end_process(0)
    except (CliError, ConfigError, CheckpointError, DataError) as e:  # bad input: its message says it all
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
