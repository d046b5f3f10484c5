"""Zero-shot classification with prompt ensembles (Radford et al. 2021, section 3.1.4).

Each class is embedded as the normalised mean of its prompts' normalised text embeddings; an image is
classified by the softmax of CLIP's scaled cosine similarities to those class embeddings.

    head = zero_shot_classifier(clip, ["cat", "dog"])          # (d, k)
    probs = classify(clip, images, classifier=head)            # (b, k)
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .model import Clip

__all__ = ["DEFAULT_TEMPLATES", "Templates", "check_class_names", "check_templates", "zero_shot_classifier", "classify",
           "zero_shot_accuracy"]

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a close-up photo of a {}.",
    "a good photo of the {}.",
    "a bright photo of a {}.",
    "an image of a {}.",
)

# Format strings with one "{}" for the class name, or a function from a class name to its prompts.
Templates = Sequence[str] | Callable[[str], Sequence[str]]


def check_class_names(class_names: Sequence[str]) -> list[str]:
    """`class_names` as a list; none, an empty name or a name given twice is a ValueError naming it."""
    if isinstance(class_names, str):
        raise ValueError(f"class names must be a list of strings, got the string {class_names!r}")
    names = list(class_names)
    if not names:
        raise ValueError("no class names given")
    empty = [i for i, name in enumerate(names) if not str(name).strip()]
    if empty:
        raise ValueError(f"class name #{empty[0]} is empty")
    twice = [name for name, n in Counter(names).items() if n > 1]
    if twice:
        raise ValueError(f"duplicate class names: {', '.join(map(repr, twice))} (each class must be named once)")
    return names


def check_templates(templates: Templates) -> Templates:
    """`templates` checked: a function, or format strings (a single one is taken as a list of one) each with exactly
    one "{}" for the class name, or "{0}" as often as wanted; anything else is a ValueError naming the template."""
    if callable(templates):
        return templates
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise ValueError("no prompt templates given")
    for template in templates:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as e:
            raise ValueError(f"prompt template {template!r} is not a format string ({e}); "
                             "write {} where the class name goes") from None
        if not fields or set(fields) not in ({""}, {"0"}) or (fields.count("") > 1):
            found = ", ".join("{" + name + "}" for name in fields) or "none"
            raise ValueError(f"prompt template {template!r} must contain exactly one {{}} for the class name "
                             f"(found: {found}; or use {{0}}, as often as wanted)")
    return templates


def _prompts(name: str, templates: Templates) -> list[str]:
    prompts = list(templates(name)) if callable(templates) else [t.format(name) for t in templates]
    if not prompts:
        raise ValueError(f"no prompts for class {name!r}")
    return prompts


def _check_tokens_differ(clip: Clip, class_names: list[str], prompts_per_class: list[list[str]]) -> None:
    """Two classes whose prompts this CLIP's tokenizer reads as the same tokens would get one embedding: a
    ValueError naming them (open_clip's tokenizer lowercases and collapses whitespace, and truncates long prompts)."""
    seen: dict[bytes, str] = {}
    for name, prompts in zip(class_names, prompts_per_class, strict=True):
        tokens, _ = clip.tokenize(prompts)
        key = tokens.numpy().tobytes() + bytes(str(tokens.shape), "ascii")
        if key in seen:
            raise ValueError(f"class names {seen[key]!r} and {name!r} give the same tokens to this CLIP's tokenizer "
                             "(it may lowercase, normalise spaces or truncate), so they cannot be told apart: "
                             "name each class once")
        seen[key] = name


@torch.no_grad()
def zero_shot_classifier(clip: Clip, class_names: Sequence[str], templates: Templates = DEFAULT_TEMPLATES,
                         batch_size: int = 512) -> torch.Tensor:
    """Class embeddings (d, k): for each class the renormalised mean of its prompts' text embeddings.

    Class names must be non-empty and distinct, also as tokens, and each template string must hold exactly one "{}"
    (ValueError)."""
    class_names, templates = check_class_names(class_names), check_templates(templates)
    prompts_per_class = [_prompts(name, templates) for name in class_names]
    _check_tokens_differ(clip, class_names, prompts_per_class)
    columns = []
    for prompts in prompts_per_class:
        embeds = torch.cat([clip.encode_text(prompts[i:i + batch_size]).text_embed
                            for i in range(0, len(prompts), batch_size)])
        columns.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def classify(clip: Clip, images: Sequence[Image.Image] | torch.Tensor, class_names: Sequence[str] | None = None,
             *, classifier: torch.Tensor | None = None, templates: Templates = DEFAULT_TEMPLATES) -> torch.Tensor:
    """Class probabilities (b, k) for PIL images or a (b, 3, h, w) tensor in [0, 1].

    Give either `class_names` (prompts built from `templates`) or a ready `classifier` (d, k).
    """
    if (classifier is None) == (class_names is None):
        raise ValueError("give exactly one of class_names or classifier")
    if classifier is None:
        classifier = zero_shot_classifier(clip, class_names, templates)
    image_embed = clip.encode_image(images)  # (b, d)
    logits = clip.model.logit_scale.exp().float() * image_embed @ classifier.to(image_embed)
    return logits.softmax(dim=-1)


@torch.no_grad()
def zero_shot_accuracy(clip: Clip, samples: Iterable[tuple[Any, int]], class_names: Sequence[str] | None = None,
                       *, classifier: torch.Tensor | None = None, templates: Templates = DEFAULT_TEMPLATES,
                       batch_size: int = 256) -> float:
    """Top-1 accuracy over `(image, label)` pairs, the image a PIL image or a (3, h, w) tensor in [0, 1]."""
    if classifier is None:
        if class_names is None:
            raise ValueError("give class_names or classifier")
        classifier = zero_shot_classifier(clip, class_names, templates)
    correct = total = 0
    batch: list[Any] = []
    labels: list[int] = []

    def flush() -> int:
        images = torch.stack(batch) if isinstance(batch[0], torch.Tensor) else batch
        pred = classify(clip, images, classifier=classifier).argmax(dim=-1).cpu()
        return int((pred == torch.tensor(labels)).sum())

    for image, label in samples:
        batch.append(image)
        labels.append(int(label))
        if len(batch) == batch_size:
            correct, total = correct + flush(), total + len(batch)
            batch, labels = [], []
    if batch:
        correct, total = correct + flush(), total + len(batch)
    if total == 0:
        raise ValueError("no labelled samples to score")
    return correct / total
