"""The web demo end to end: a tiny pipeline served by Gradio, driven by Debian's headless Chromium through selenium
(chromium + chromium-driver from apt; nothing is downloaded at test time); and `unclip serve`'s clear errors."""

import argparse
import socket
from pathlib import Path

import pytest

from unclip.cli.common import CliError
from unclip.cli.serve import add_serve_parser
from unclip.data.shapes import caption_for, split_triples

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CAPTION = "a red cross on a blue background"  # a held-out SHAPES triple


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def pipeline_dir(tiny_pipeline, tmp_path):
    return tiny_pipeline.save_pretrained(tmp_path / "pipe")


@pytest.fixture()
def served(pipeline_dir):
    """The demo of the saved tiny pipeline, listening on a free localhost port (Gradio's own server thread)."""
    from unclip.pipeline.default import load_pipeline
    from unclip.pipeline.serve import CSS, build_demo

    demo = build_demo(load_pipeline(pipeline_dir, device="cpu"))
    port = _free_port()
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
                                                   quiet=True, css=CSS)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture()
def browser():
    """Debian's chromium, headless, driven by Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMEDRIVER.exists(), f"{CHROMEDRIVER} is missing: apt-get install chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Debian's chromium is not installed ({CHROMIUM}); "
                    "CI installs it: apt-get install chromium chromium-driver")
def test_caption_to_images_in_a_browser(served, browser):
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)

    def click_generate() -> None:
        """Click the button as a user would once Gradio's status overlay (shown while it settles) has gone."""
        def clicked(d) -> bool:
            try:
                d.find_element(By.CSS_SELECTOR, "#unclip-generate").click()
            except ElementClickInterceptedException:
                return False
            return True

        wait.until(clicked)

    browser.get(served)
    caption = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#unclip-caption textarea, #unclip-caption input"))
    click_generate()  # no caption yet: a clear error on the page
    wait.until(lambda d: "type a caption first" in d.find_element(By.TAG_NAME, "body").text)
    caption.send_keys(CAPTION)
    count = browser.find_element(By.CSS_SELECTOR, "#unclip-num-images input[type=number]")
    count.send_keys(Keys.CONTROL, "a")
    count.send_keys("3", Keys.TAB)
    click_generate()

    def loaded_images(d):
        sizes = d.execute_script(
            "return Array.from(document.querySelectorAll('#unclip-gallery img'))"
            ".map(im => [im.complete, im.naturalWidth, im.naturalHeight]);")
        return sizes if len(sizes) == 3 and all(ok and w > 0 and h > 0 for ok, w, h in sizes) else False

    try:
        sizes = wait.until(loaded_images)
    except Exception:
        pytest.fail("the gallery never showed 3 loaded images; page text:\n" + browser.find_element(By.TAG_NAME,
                                                                                                      "body").text)
    assert all(w == h == 8 for _, w, h in sizes), sizes  # the tiny pipeline makes 8 px images
    assert CAPTION in browser.find_element(By.CSS_SELECTOR, "#unclip-gallery").get_attribute("innerHTML")


def test_each_upsampler_has_its_own_steps_slider_and_its_value_reaches_generation(tiny_clip, monkeypatch):
    """The page's generate function, called through Gradio (no server, no browser) on an 8 -> 16 -> 32 px pipeline:
    every knob starts at the pipeline's own setting and reaches generation as one sampling override."""
    import gradio as gr
    from conftest import build_tiny_pipeline

    from unclip.diffusion import SAMPLERS
    from unclip.pipeline.serve import build_demo

    pipe = build_tiny_pipeline(tiny_clip, upsampler_sides=(16, 32))
    pipe.sampling = pipe.resolve_sampling({"upsampler.steps": [2, 3], "prior.steps": 5, "decoder.guidance": 2.5})
    demo = build_demo(pipe)
    sliders = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    assert sliders["upsampler 8->16 steps"].value == 2 and sliders["upsampler 16->32 steps"].value == 3
    assert not any("upsampler steps" in label for label in sliders), "the single shared slider should be gone"
    assert sliders["prior steps"].value == 5 and sliders["decoder steps"].value == pipe.sampling.of("decoder").steps
    assert sliders["decoder guidance scale"].value == 2.5
    (dropdown,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown)]
    assert [value for _, value in dropdown.choices] == list(SAMPLERS) and dropdown.value == "ddim"

    calls = []
    generate = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda *a, **kw: calls.append(kw) or generate(*a, **kw))
    gallery = demo(CAPTION, 1, 0, "ddpm", 2, 3, 3.0, 4, 1, api_name="generate")
    assert calls[0]["sampling"] == {"sampler": "ddpm", "prior.steps": 2, "decoder.steps": 3, "decoder.guidance": 3.0,
                                    "upsampler.steps": [4, 1]}
    assert len(gallery) == 1


def test_stages_with_their_own_samplers_keep_them_unless_one_is_chosen(tiny_clip, monkeypatch):
    import gradio as gr
    from conftest import build_tiny_pipeline

    from unclip.pipeline.serve import EACH_STAGES_OWN, build_demo

    pipe = build_tiny_pipeline(tiny_clip)
    pipe.sampling = pipe.resolve_sampling({"prior.sampler": "ddpm"})  # the decoder's: ddim
    (dropdown,) = [b for b in build_demo(pipe).blocks.values() if isinstance(b, gr.Dropdown)]
    assert dropdown.value == EACH_STAGES_OWN and dropdown.choices[0][1] == EACH_STAGES_OWN
    calls = []
    monkeypatch.setattr(pipe, "generate", lambda *a, **kw: calls.append(kw) or [])
    build_demo(pipe)(CAPTION, 1, 0, EACH_STAGES_OWN, 2, 2, 3.0, api_name="generate")
    assert "sampler" not in calls[0]["sampling"]


def test_a_pipeline_without_a_prior_builds_and_says_it_cannot_caption(tiny_clip):
    """No prior: the page builds with the prior's knob hidden, and generating is a clear error on the page."""
    import gradio as gr
    from conftest import build_tiny_pipeline

    from unclip.pipeline.pipeline import UnclipPipeline
    from unclip.pipeline.serve import build_demo

    full = build_tiny_pipeline(tiny_clip, upsampler_sides=(16,))
    pipe = UnclipPipeline(full.clip, [full.decoder, *full.upsamplers])
    demo = build_demo(pipe)
    sliders = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    assert not sliders["prior steps"].visible and sliders["upsampler 8->16 steps"].visible
    with pytest.raises(gr.Error, match="no prior"):
        demo(CAPTION, 1, 0, "ddim", 2, 2, 3.0, 2, api_name="generate")


def test_example_captions_include_heldout_triples():
    from unclip.pipeline.serve import example_captions

    heldout = {caption_for(*t) for t in split_triples("heldout")}
    examples = example_captions()
    assert CAPTION in examples and len(heldout & set(examples)) >= 3
    assert set(examples) - heldout, "examples should also show captions the models were trained on"


def _run_serve(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="unclip")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *argv])
    args.func(args)


def test_serve_errors_clearly_for_a_missing_pipeline(tmp_path):
    with pytest.raises(CliError, match="pipeline directory not found: .*nowhere"):
        _run_serve("--pipeline", str(tmp_path / "nowhere"), "--device", "cpu")
    with pytest.raises(CliError, match="not a pipeline directory"):
        _run_serve("--pipeline", str(tmp_path), "--device", "cpu")


def test_serve_errors_clearly_for_a_missing_cuda(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CliError, match="CUDA is not available"):
        _run_serve("--pipeline", str(tmp_path), "--device", "cuda")


def test_a_missing_gradio_says_how_to_install_it(monkeypatch):
    import sys

    from unclip.pipeline.serve import DemoUnavailableError, import_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail
    with pytest.raises(DemoUnavailableError, match=r'pip install "unclip\[demo\]"'):
        import_gradio()
