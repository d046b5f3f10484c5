"""Zero-shot classification: prompt ensembles computed as in the CLIP paper, probabilities, accuracy."""

import pytest
import torch
import torch.nn.functional as F

from unclip.clip import classify, zero_shot_accuracy, zero_shot_classifier
from unclip.clip.shapes_judge import ShapesJudge, attribute_prompts
from unclip.data import CAPTION_TEMPLATES, COLORS, SHAPES, make_shapes


def test_classifier_is_the_normalised_mean_of_prompt_embeddings(tiny_clip):
    templates = ("a {}.", "a photo of a {}.", "art of the {}")
    head = zero_shot_classifier(tiny_clip, ["cat", "dog"], templates)
    assert head.shape == (tiny_clip.embed_dim, 2)
    for k, name in enumerate(["cat", "dog"]):
        embeds = tiny_clip.encode_text([t.format(name) for t in templates]).text_embed
        torch.testing.assert_close(head[:, k], F.normalize(embeds.mean(0), dim=0))


def test_probabilities_follow_scaled_cosine_similarity(tiny_clip):
    images = make_shapes(3)["image"]
    head = zero_shot_classifier(tiny_clip, ["circle", "square", "cross"])
    probs = classify(tiny_clip, images, classifier=head)
    assert probs.shape == (3, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    logits = tiny_clip.model.logit_scale.exp() * tiny_clip.encode_image(images) @ head
    torch.testing.assert_close(probs, logits.softmax(-1))


def test_accuracy_counts_argmax_hits(tiny_clip):
    images = make_shapes(5)["image"]
    names = ["circle", "square", "triangle"]
    pred = classify(tiny_clip, images, names).argmax(-1).tolist()
    labels = [pred[0], (pred[1] + 1) % 3, pred[2], pred[3], (pred[4] + 1) % 3]
    assert zero_shot_accuracy(tiny_clip, zip(images, labels), names, batch_size=2) == pytest.approx(3 / 5)


def test_bad_arguments(tiny_clip):
    with pytest.raises(ValueError, match="duplicate"):
        zero_shot_classifier(tiny_clip, ["a", "a"])
    with pytest.raises(ValueError, match="exactly one"):
        classify(tiny_clip, make_shapes(1)["image"])
    with pytest.raises(ValueError, match="no labelled samples"):
        zero_shot_accuracy(tiny_clip, [], ["a", "b"])


def test_shapes_prompts_marginalise_the_other_attributes():
    prompts = attribute_prompts("fg", "red")
    assert len(prompts) == len(CAPTION_TEMPLATES) * len(SHAPES) * (len(COLORS) - 1)
    assert "a red circle on a blue background" in prompts
    assert not any("on a red background" in p for p in prompts)
    with pytest.raises(ValueError, match="unknown SHAPES attribute"):
        attribute_prompts("size", "big")


def test_judge_scores_per_attribute(tiny_clip):
    rows = make_shapes(4, split="heldout")
    judge = ShapesJudge(tiny_clip)
    pred = judge.predict(rows["image"])
    right = judge.score(rows["image"], rows["shape"], rows["fg"], rows["bg"])
    assert torch.equal(right["shape"], pred["shape"] == torch.tensor(rows["shape"]))
    assert torch.equal(right["all"], right["shape"] & right["fg"] & right["bg"])


def test_templates_and_class_names_are_checked_before_encoding(tiny_clip):
    """A template without exactly one "{}" would give every class the same prompt (equal probabilities) or fail
    inside str.format; a class named twice would get two identical columns. Each is a ValueError naming it."""
    for template, found in (("no placeholder", "none"), ("a {} {} thing", "{}, {}"), ("a {name}", "{name}")):
        with pytest.raises(ValueError, match=r"must contain exactly one \{\} for the class name \(found: "
                                             + found.replace("{", r"\{").replace("}", r"\}")):
            zero_shot_classifier(tiny_clip, ["cat", "dog"], ("a photo of a {}.", template))
    with pytest.raises(ValueError, match="not a format string"):
        classify(tiny_clip, make_shapes(1)["image"], ["cat", "dog"], templates=["a {} of {"])
    with pytest.raises(ValueError, match=r"duplicate class names: 'circle' \(each class must be named once\)"):
        classify(tiny_clip, make_shapes(1)["image"], ["circle", "square", "circle"])
    with pytest.raises(ValueError, match="class name #1 is empty"):
        zero_shot_classifier(tiny_clip, ["cat", " "])
    positional = zero_shot_classifier(tiny_clip, ["cat", "dog"], ["{0}, a kind of {0}.", "a photo of a {0}."])
    spelled_out = zero_shot_classifier(tiny_clip, ["cat", "dog"],
                                       lambda c: [f"{c}, a kind of {c}.", f"a photo of a {c}."])
    torch.testing.assert_close(positional, spelled_out)  # str.format's positional form is fine too
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_classifier(tiny_clip, ["cat", "dog"], ["a {} and a {0}"])  # mixed numbering: str.format fails
    single = zero_shot_classifier(tiny_clip, ["cat", "dog"], "a photo of a {}.")  # one template string, not its chars
    torch.testing.assert_close(single, zero_shot_classifier(tiny_clip, ["cat", "dog"], ["a photo of a {}."]))


def test_class_names_the_tokenizer_reads_alike_are_refused(tiny_clip):
    """open_clip's tokenizer lowercases and collapses whitespace: "Cat" and "cat  " would get one embedding, two
    identical columns, and the image's probability split between them."""
    tokens, _ = tiny_clip.tokenize(["a photo of a Cat.", "a photo of a cat."])
    assert torch.equal(tokens[0], tokens[1])  # the premise: this tokenizer lowercases
    for names, pair in ((["Cat", "dog", "cat"], "'Cat' and 'cat'"), (["cat", "big  dog", "big dog"],
                                                                     "'big  dog' and 'big dog'")):
        with pytest.raises(ValueError, match=f"class names {pair} give the same tokens"):
            zero_shot_classifier(tiny_clip, names)
    head = zero_shot_classifier(tiny_clip, ["Cat", "dog"])  # distinct classes in any case are fine
    assert head.shape[1] == 2
