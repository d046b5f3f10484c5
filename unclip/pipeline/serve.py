"""The web demo: a Gradio page where a caption becomes images, with the main sampling knobs.

    demo = build_demo(load_pipeline("runs/pipeline"))   # a gradio.Blocks; demo.launch() serves it
    serve(None, host="127.0.0.1", port=7860)             # the shipped model, blocking until Ctrl-C

Gradio is an optional dependency (`pip install "unclip[demo]"`); it is imported only when a demo is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..clip import CaptionError
from ..data.shapes import caption_for, split_triples
from ..diffusion import SAMPLERS
from .default import load_pipeline
from .pipeline import UnclipPipeline

if TYPE_CHECKING:
    import gradio

__all__ = ["DemoUnavailableError", "build_demo", "example_captions", "import_gradio", "serve"]

TITLE = "unCLIP: text to image"
# SHAPES images are tiny: show them large and with sharp pixels.
CSS = "#unclip-gallery img { image-rendering: pixelated; }"
# Held-out (shape, fg, bg) triples shown as examples: a red cross on blue, a yellow cross on red, a blue triangle
# on green (the combinations a ViT CLIP got wrong; see the README).
HELDOUT_EXAMPLES = [(3, 0, 2), (3, 3, 0), (2, 2, 1)]
EACH_STAGES_OWN = "each stage's own"  # the sampler choice that keeps the pipeline's sampler of every stage


class DemoUnavailableError(ImportError):
    """The demo's optional dependency (gradio) is not installed."""


def import_gradio() -> Any:
    """The `gradio` module, or a `DemoUnavailableError` that says how to install it."""
    try:
        import gradio
    except ImportError as e:
        raise DemoUnavailableError(f'the web demo needs gradio ({e}); install it with: pip install "unclip[demo]"') \
            from None
    return gradio


def example_captions() -> list[str]:
    """Captions for the page's examples: SHAPES training triples, then held-out ones the models never saw."""
    seen = [caption_for(*t) for t in split_triples("train")[::50]]
    return seen + [caption_for(*t) for t in HELDOUT_EXAMPLES]


def build_demo(pipeline: UnclipPipeline) -> gradio.Blocks:
    """The demo page for `pipeline`: a caption, the number of images, seed, sampler, prior / decoder steps, decoder
    guidance and one steps slider per upsampler; a Generate button; a gallery of the results. Every knob starts at
    the pipeline's own setting (`pipeline.sampling`); a pipeline without a prior shows no prior knob, and its page
    says that it cannot turn captions into images. Generation shows a progress bar per diffusion stage."""
    gr = import_gradio()
    s = pipeline.sampling
    has_prior = pipeline.prior is not None
    ups = [(name, stage) for name, stage in pipeline.named_stages() if stage.role == "upsampler"]
    samplers = {spec.sampler for spec in s.stages.values()}
    # the sampler of every stage; where the stages' own differ, the first choice keeps each stage's own
    sampler_choices = list(SAMPLERS) if len(samplers) == 1 else [EACH_STAGES_OWN, *SAMPLERS]
    sampler_default = samplers.pop() if len(samplers) == 1 else EACH_STAGES_OWN
    guidance = s.of("decoder").guidance
    track_tqdm = gr.Progress(track_tqdm=True)  # Gradio injects a live progress bar for a parameter defaulting to this

    # `progress` sits before the per-upsampler step counts: Gradio injects it only into a positional parameter.
    def generate(caption: str, num_images: float, seed: float | None, sampler: str, prior_steps: float,
                 decoder_steps: float, decoder_guidance: float, progress: Any = track_tqdm,
                 *upsampler_steps: float) -> list:
        if not caption or not caption.strip():
            raise gr.Error("type a caption first, e.g. 'a red circle on a blue background'")
        knobs = {"decoder.steps": int(decoder_steps), "decoder.guidance": float(decoder_guidance)}
        if sampler != EACH_STAGES_OWN:
            knobs["sampler"] = sampler
        if has_prior:
            knobs["prior.steps"] = int(prior_steps)
        if ups:
            knobs["upsampler.steps"] = [int(n) for n in upsampler_steps]
        try:
            images = pipeline.generate(
                [caption.strip()], int(num_images), seed=None if seed is None or seed < 0 else int(seed),
                sampling=knobs, progress=True,  # tqdm bars, which gr.Progress(track_tqdm=True) mirrors on the page
            )
        except (CaptionError, ValueError) as e:
            raise gr.Error(str(e)) from None
        return [(im, f"{caption.strip()} #{i + 1}") for i, im in enumerate(images)]

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        chain = "Caption → CLIP text embedding → diffusion prior → decoder" if has_prior else \
            ("This pipeline has no prior, so it cannot turn captions into images (it decodes given image embeddings: "
             "unclip vary, interpolate, text-diff). Image embedding → decoder")
        gr.Markdown(f"## {TITLE}\n{chain} ({pipeline.decoder.config.image_size} px) → {len(ups)} upsampler(s) → "
                    f"{pipeline.image_size} px images. Try a held-out SHAPES caption: the models never saw it.")
        with gr.Row():
            with gr.Column(scale=1):
                caption = gr.Textbox(label="caption", placeholder="a red circle on a blue background", lines=1,
                                     elem_id="unclip-caption")
                num_images = gr.Slider(1, 16, value=4, step=1, label="number of images", elem_id="unclip-num-images")
                seed = gr.Number(value=0, precision=0, label="seed (-1: random)")
                button = gr.Button("Generate", variant="primary", elem_id="unclip-generate")
                with gr.Accordion("sampling", open=True):
                    sampler = gr.Dropdown(sampler_choices, value=sampler_default, label="sampler",
                                          info="every stage's")
                    prior_steps = gr.Slider(1, max(256, s.of("prior").steps) if has_prior else 256,
                                            value=s.of("prior").steps if has_prior else 1, step=1,
                                            label="prior steps", visible=has_prior)
                    decoder_steps = gr.Slider(1, max(250, s.of("decoder").steps), value=s.of("decoder").steps,
                                              step=1, label="decoder steps")
                    decoder_guidance = gr.Slider(min(1.0, guidance), max(10.0, guidance), value=guidance, step=0.5,
                                                 label="decoder guidance scale")
                    upsampler_steps = [
                        gr.Slider(1, max(100, s.of(name).steps), value=s.of(name).steps, step=1,
                                  label=f"upsampler {up.config.low_res_size}->{up.config.image_size} steps")
                        for name, up in ups
                    ]
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="images", columns=4, object_fit="contain", height="auto",
                                     format="png", elem_id="unclip-gallery")
        inputs = [caption, num_images, seed, sampler, prior_steps, decoder_steps, decoder_guidance, *upsampler_steps]
        gr.Examples([[c] for c in example_captions()], inputs=[caption], label="SHAPES captions (the last three "
                    "are held out of training)")
        button.click(generate, inputs=inputs, outputs=gallery)
        caption.submit(generate, inputs=inputs, outputs=gallery)
    return demo


def serve(pipeline_dir: str | Path | None, host: str = "127.0.0.1", port: int = 7860, share: bool = False, *,
          device: str | torch.device | None = None) -> None:
    """Load a pipeline directory (None: the shipped model) on `device` and serve its demo at http://host:port
    until interrupted. `share=True` also asks Gradio for a public link (needs internet)."""
    import_gradio()  # fail before the (slower) model load when gradio is missing
    demo = build_demo(load_pipeline(pipeline_dir, device=device))
    demo.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=share, css=CSS)
