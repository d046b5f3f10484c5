"""`unclip serve`: the web demo (a Gradio page: caption in, images out).

    unclip serve                                   # the shipped SHAPES model at http://127.0.0.1:7860
    unclip serve --pipeline runs/pipeline --device cuda --host 0.0.0.0 --port 8080
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CliError, add_device_argument, resolve_device

__all__ = ["add_serve_parser"]


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `serve` sub-command on the `unclip` command's sub-parsers; returns its parser."""
    p = subparsers.add_parser("serve", help="serve the web demo (type a caption, get images)",
                              description="Serve a Gradio page where a caption becomes images, with the sampler, "
                                          "step counts, guidance and seed as knobs. Needs the demo extra: "
                                          'pip install "unclip[demo]".')
    p.add_argument("--pipeline", type=Path, default=None, metavar="DIR",
                   help="pipeline directory (written by UnclipPipeline.save_pretrained; default: the shipped model)")
    add_device_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a temporary public link")
    p.set_defaults(func=_serve)
    return p


def _serve(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be between 1 and 65535, got {args.port}")
    _check_pipeline_dir(args.pipeline)

    from ..checkpoint import CheckpointError
    from ..pipeline.serve import DemoUnavailableError, serve

    print(f"unclip serve: loading {args.pipeline or 'the shipped model'} on {device}; "
          f"the page will be at http://{args.host}:{args.port}")
    try:
        serve(args.pipeline, host=args.host, port=args.port, share=args.share, device=device)
    except (DemoUnavailableError, CheckpointError, ValueError) as e:
        raise CliError(str(e)) from None
    except OSError as e:  # e.g. the port is taken
        raise CliError(f"cannot serve on {args.host}:{args.port}: {e}") from None


def _check_pipeline_dir(path: Path | None) -> None:
    """A clear error, before any model is loaded, when `path` (None: the shipped model) is no pipeline directory."""
    from ..pipeline.pipeline import PIPELINE_FILE

    if path is None:
        from ..pipeline.default import DEFAULT_PIPELINE

        if not (DEFAULT_PIPELINE / PIPELINE_FILE).is_file():
            raise CliError(f"the shipped model is missing from this installation ({DEFAULT_PIPELINE}); pass "
                           "--pipeline DIR with a directory written by UnclipPipeline.save_pretrained")
        return
    if not path.exists():
        raise CliError(f"pipeline directory not found: {path}")
    if not (path / PIPELINE_FILE).is_file():
        raise CliError(f"{path} is not a pipeline directory ({PIPELINE_FILE} is missing); pass a directory written "
                       "by UnclipPipeline.save_pretrained")
