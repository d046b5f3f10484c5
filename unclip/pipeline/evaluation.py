"""Evaluating a text-to-image pipeline: SHAPES compositional accuracy, CLIP score, FID and KID.

    report = evaluate_pipeline(pipe, images_per_caption=4, seed=0)     # what `unclip eval` prints
    report = evaluate_pipeline(pipe, judge=Clip.from_pretrained("runs/clip-shapes-tiny/model"))   # a fixed judge
    fid = frechet_distance(real_features, fake_features)              # any (n, k) features
    kid_mean, kid_std = kernel_inception_distance(real_features, fake_features)

Compositional accuracy: for each of the 25 held-out SHAPES triples (never in any training data) the caption
"a {fg} {shape} on a {bg} background" is generated `images_per_caption` times, and an image counts when the judge's
zero-shot classification finds its shape, foreground and background colour all as asked. The judge is the pipeline's
own CLIP unless `judge` gives another (for the shipped pipeline, the SHAPES CLIP it was trained with); give one fixed
judge to compare pipelines built on different CLIPs. The CLIP score uses the judge too.
FID and KID compare generated images with real held-out SHAPES images through a feature extractor: CLIP image
features by default (the judge's own tower), or Inception-v3 via torch-fidelity when its weights are on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..clip import Clip
from ..clip.shapes_judge import ShapesJudge
from ..config import config_to_dict
from ..data.shapes import ATTRIBUTES, caption_for, make_shapes, split_triples
from ..images import pil_to_tensor
from .pipeline import UnclipPipeline, image_generators

__all__ = ["FeatureExtractor", "clip_features", "inception_features", "frechet_distance",
           "kernel_inception_distance", "clip_score", "heldout_prompts", "compositional_accuracy",
           "evaluate_pipeline"]

# images (b, 3, h, w) in [0, 1] -> features (b, k)
FeatureExtractor = Callable[[Tensor], Tensor]


def heldout_prompts() -> list[tuple[str, tuple[int, int, int]]]:
    """The 25 held-out triples as (caption in the canonical template, (shape, fg, bg) indices)."""
    return [(caption_for(*t), t) for t in split_triples("heldout")]


def clip_features(clip: Clip) -> FeatureExtractor:
    """The CLIP's L2-normalised image embeddings (b, d) as features (the "FID with CLIP features" of
    Kynkaanniemi et al. 2023). On SHAPES a SHAPES CLIP is the only feature extractor that knows the data."""
    return lambda images: clip.encode_image(images).float().cpu()


def inception_features(device: str | torch.device = "cpu") -> FeatureExtractor:
    """Inception-v3 pool features (b, 2048) through torch-fidelity (`pip install torch-fidelity`); its weights
    must already be in torch's cache (nothing is downloaded here when offline: a clear error says so)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ImportError("Inception features need torch-fidelity: pip install torch-fidelity") from None
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).to(device).eval()
    except Exception as e:  # a failed download surfaces as various network errors
        raise RuntimeError(f"could not load torch-fidelity's Inception-v3 weights (offline?): {e}") from None

    @torch.no_grad()
    def extract(images: Tensor) -> Tensor:
        x = (images.clamp(0, 1) * 255).round().to(torch.uint8).to(device)
        return net(x)[0].float().cpu()

    return extract


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (len(x) - 1)


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features real (n, k) and fake (m, k) (FID's formula):
    |mu_r - mu_f|^2 + tr(C_r + C_f - 2 (C_r C_f)^(1/2)), the trace of the root from the eigenvalues of
    C_r^(1/2) C_f C_r^(1/2) (symmetric PSD, so no complex square roots)."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (n, k) and (m, k), got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("FID needs at least two samples on each side")
    mu_r, c_r = _mean_cov(real)
    mu_f, c_f = _mean_cov(fake)
    w, v = torch.linalg.eigh(c_r)
    root_r = (v * w.clamp(min=0).sqrt()) @ v.T
    inner = torch.linalg.eigvalsh(root_r @ c_f @ root_r).clamp(min=0)
    return float((mu_r - mu_f).pow(2).sum() + c_r.trace() + c_f.trace() - 2 * inner.sqrt().sum())


def kernel_inception_distance(real: Tensor, fake: Tensor, *, subsets: int = 10, subset_size: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the kernel k(x, y) = (x.y / k + 1)^3, averaged over
    `subsets` random subsets of `subset_size` from each side. Returns (mean, std) over the subsets."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be (n, k) and (m, k), got {tuple(real.shape)} and {tuple(fake.shape)}")
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError("KID needs at least two samples on each side")
    g = torch.Generator().manual_seed(seed)
    k = real.shape[1]
    values = []
    for _ in range(subsets):
        x = real[torch.randperm(len(real), generator=g)[:m]].double()
        y = fake[torch.randperm(len(fake), generator=g)[:m]].double()
        kxx, kyy, kxy = ((a @ b.T / k + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = 1 - torch.eye(m, dtype=torch.float64)
        mmd = (kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean()
        values.append(float(mmd))
    t = torch.tensor(values)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


@torch.no_grad()
def clip_score(clip: Clip, images: Tensor, captions: Sequence[str]) -> float:
    """CLIP score (Hessel et al. 2021): mean over pairs of 100 * max(cos(image, caption), 0)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    image_embed = clip.encode_image(images).float()
    text_embed = clip.encode_text(list(captions)).text_embed.float().to(image_embed.device)
    cos = (image_embed * text_embed).sum(-1)
    return float(100 * cos.clamp(min=0).mean())


@torch.no_grad()
def compositional_accuracy(pipe: UnclipPipeline, images: Tensor, triples: Sequence[tuple[int, int, int]],
                           judge: ShapesJudge | None = None) -> dict[str, Any]:
    """Judge generated images (n, 3, h, w) in [0, 1] against the (shape, fg, bg) triples they were asked for:
    the fraction right per attribute and for all three, and the "all" fraction per caption."""
    judge = judge or ShapesJudge(pipe.clip)
    truth = torch.tensor(list(triples))  # (n, 3)
    right = judge.score(images, truth[:, 0], truth[:, 1], truth[:, 2])
    per_triple: dict[str, list[int]] = {}
    for (s, f, b), ok in zip(triples, right["all"].tolist()):
        key = caption_for(s, f, b)
        per_triple.setdefault(key, []).append(int(ok))
    return {"accuracy": {k: float(v.float().mean()) for k, v in right.items()},
            "per_caption": {k: sum(v) / len(v) for k, v in per_triple.items()}}


@torch.no_grad()
def evaluate_pipeline(pipe: UnclipPipeline, *, images_per_caption: int = 4, seed: int = 0, batch_size: int = 25,
                      real_samples: int = 500, features: FeatureExtractor | None = None, judge: Clip | None = None,
                      progress: bool = True, **settings: Any) -> dict[str, Any]:
    """The full SHAPES report: compositional accuracy on the 25 held-out captions (images_per_caption each), CLIP
    score, and FID / KID of those images against `real_samples` real held-out SHAPES images (features: the judge's
    CLIP image features by default). `judge`: the CLIP that judges (default: the pipeline's own); the report's
    "judge" names it ({"source": "pipeline" or "given", "fingerprint"}). `settings` go to
    `UnclipPipeline.generate_tensors` (steps, guidance, samplers)."""
    if images_per_caption < 1:
        raise ValueError(f"images_per_caption must be >= 1, got {images_per_caption}")
    if real_samples < 2:
        raise ValueError(f"real_samples must be >= 2 (FID and KID need two real images at least), got {real_samples}")
    chosen = pipe.resolve_sampling(**settings)  # a bad setting fails here, before any image is generated
    prompts = heldout_prompts()
    captions = [c for c, _ in prompts for _ in range(images_per_caption)]
    triples = [t for _, t in prompts for _ in range(images_per_caption)]
    generated = []
    generators = image_generators(len(captions), pipe.device, seed)  # one per image: batch_size changes nothing
    bar = tqdm(total=len(captions), desc="generating", unit="img", disable=not progress)
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        images = pipe.generate_tensors(chunk, 1, generator=generators[start:start + batch_size], sampling=chosen)
        generated.append(images.float().cpu())
        bar.update(len(chunk))
    bar.close()
    fake = torch.cat(generated)
    judge_clip = judge if judge is not None else pipe.clip
    report = compositional_accuracy(pipe, fake, triples, ShapesJudge(judge_clip))
    report["judge"] = {"source": "pipeline" if judge is None else "given", "fingerprint": judge_clip.fingerprint()}
    report["clip_score"] = clip_score(judge_clip, fake, captions)
    real_rows = make_shapes(real_samples, split="heldout", seed=seed + 10_000, resolution=fake.shape[-1])
    real = torch.stack([pil_to_tensor(im) for im in real_rows["image"]])
    extract = features or clip_features(judge_clip)
    f_real = torch.cat([extract(real[i:i + 250]) for i in range(0, len(real), 250)])
    f_fake = torch.cat([extract(fake[i:i + 250]) for i in range(0, len(fake), 250)])
    report["fid"] = frechet_distance(f_real, f_fake)
    kid_mean, kid_std = kernel_inception_distance(f_real, f_fake, subset_size=min(100, len(fake)))
    report["kid"] = {"mean": kid_mean, "std": kid_std}
    report["settings"] = {"images_per_caption": images_per_caption, "seed": seed, "real_samples": real_samples,
                          "sampling": config_to_dict(chosen)}
    report["image_size"] = int(fake.shape[-1])
    report["attributes"] = list(ATTRIBUTES)
    return report

