"""Judge SHAPES images with a CLIP: zero-shot shape, foreground and background colour.

Every later evaluation (the decoder's reconstructions, the cascade, the pipeline's compositional
accuracy) asks the SHAPES CLIP what an image shows. Each attribute is classified zero-shot with a prompt
ensemble that marginalises the other two attributes: the class "red" for the foreground is embedded as
the mean over every caption template, every shape and every other background colour of
"a red {shape} on a {bg} background" (and likewise for the others), in the spirit of CLIP's prompt
ensembling.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from PIL import Image

from ..data.shapes import ATTRIBUTES, CAPTION_TEMPLATES, COLORS, SHAPES, make_shapes
from .model import Clip
from .zero_shot import classify, zero_shot_classifier

__all__ = ["ATTRIBUTE_CLASSES", "attribute_prompts", "ShapesJudge", "evaluate_shapes", "verdict_agreement"]

ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "fg": COLORS, "bg": COLORS}


def attribute_prompts(attribute: str, value: str) -> list[str]:
    """All captions whose `attribute` is `value`, over every template and every valid other attribute."""
    if attribute not in ATTRIBUTE_CLASSES:
        raise ValueError(f"unknown SHAPES attribute {attribute!r}; one of {ATTRIBUTES}")
    prompts = []
    for template, shape, fg, bg in itertools.product(CAPTION_TEMPLATES, SHAPES, COLORS, COLORS):
        scene = {"shape": shape, "fg": fg, "bg": bg}
        if scene[attribute] == value and fg != bg:
            prompts.append(template.format(**scene))
    return prompts


class ShapesJudge:
    """Zero-shot SHAPES attribute classifier built once from a CLIP (three heads of size (d, k))."""

    def __init__(self, clip: Clip) -> None:
        self.clip = clip
        self.heads = {
            attr: zero_shot_classifier(clip, names, lambda v, a=attr: attribute_prompts(a, v))
            for attr, names in ATTRIBUTE_CLASSES.items()
        }

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted class indices (b,) for each attribute of PIL images or a (b, 3, h, w) tensor in [0, 1]."""
        return {attr: classify(self.clip, images, classifier=head).argmax(dim=-1).cpu()
                for attr, head in self.heads.items()}

    @torch.no_grad()
    def predict_batched(self, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        """`predict` over images (n, 3, h, w) in [0, 1], `batch_size` at a time: class indices (n,) per attribute."""
        parts = [self.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in ATTRIBUTES}

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image] | torch.Tensor, shape: Sequence[int], fg: Sequence[int],
              bg: Sequence[int]) -> dict[str, torch.Tensor]:
        """Per-image correctness (b,) bool for each attribute, plus "all" (every attribute right)."""
        pred = self.predict(images)
        truth = {"shape": torch.as_tensor(shape), "fg": torch.as_tensor(fg), "bg": torch.as_tensor(bg)}
        right = {attr: pred[attr] == truth[attr] for attr in ATTRIBUTES}
        right["all"] = right["shape"] & right["fg"] & right["bg"]
        return right


def verdict_agreement(pred: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of rows where pred equals reference ((n,) class indices per attribute), per attribute and for
    all three at once ("all"): accuracy when reference holds the true attributes, agreement when it holds verdicts."""
    same = {k: pred[k].cpu() == torch.as_tensor(reference[k]).cpu() for k in ATTRIBUTES}
    same["all"] = same["shape"] & same["fg"] & same["bg"]
    return {k: float(v.float().mean()) for k, v in same.items()}


@torch.no_grad()
def evaluate_shapes(clip: Clip, *, split: str = "heldout", num_samples: int = 500, seed: int = 1234,
                    batch_size: int = 250, judge: ShapesJudge | None = None) -> dict[str, float]:
    """Zero-shot accuracy of each attribute (and of all three at once) on freshly drawn SHAPES images."""
    judge = judge or ShapesJudge(clip)
    data = make_shapes(num_samples, split=split, seed=seed)
    totals = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    for start in range(0, num_samples, batch_size):
        rows = data[start:start + batch_size]
        right = judge.score(rows["image"], rows["shape"], rows["fg"], rows["bg"])
        for key in totals:
            totals[key] += int(right[key].sum())
    return {key: count / num_samples for key, count in totals.items()}
