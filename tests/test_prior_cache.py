"""The prior's caption-prefix cache: cached sampling gives the uncached embeddings, and computes the prefix once."""

import pytest
import torch
from test_prior import D, forward, random_text, tiny_prior
from x_transformers import Decoder

from prior import sample_candidates, sample_image_embeds
from prior.cache import check_cacheable
from unclip.clip import TextEncoding

TOL = dict(atol=1e-5, rtol=1e-5)


def guided_prior():
    prior = tiny_prior(seed=3)
    for param in (prior.null_text_tokens, prior.null_text_embed):  # a null conditioning far from the captions
        param.data.normal_()
    return prior


def test_forward_cached_is_forward_for_captions_and_the_null_prefix():
    prior, b, m = guided_prior(), 3, 4
    text = random_text(b, seed=1)
    assert not text.text_mask.all()  # padded captions
    drop = torch.tensor([False, True, False])
    prefix = prior.encode_prefix(text.text_embed, text.text_states, text.text_mask, cond_drop=drop)
    x_t, t = torch.randn(b * m, D), torch.randint(0, 100, (b * m,))
    rows = lambda x: x.repeat_interleave(m, dim=0)  # noqa: E731  (b, ...) -> (b m, ...)
    repeated = TextEncoding(rows(text.text_embed), rows(text.text_states), rows(text.text_mask))
    expected = forward(prior, x_t, t, repeated, rows(drop))
    torch.testing.assert_close(prior.forward_cached(x_t, t, prefix), expected, **TOL)
    reordered = prefix.select(torch.tensor([2, 0]))  # any order, any subset of prefixes
    order = torch.cat([torch.arange(8, 12), torch.arange(0, 4)])  # the rows of captions 2 and 0
    torch.testing.assert_close(prior.forward_cached(x_t[order], t[order], reordered), expected[order], **TOL)
    # two caches, the rows split in halves: captions 0 and 2 (4 rows each), then all 8 rows under the null prefix
    null = prefix.select(torch.tensor([1]))
    both = prior.forward_cached(torch.cat([x_t[order]] * 2), torch.cat([t[order]] * 2), reordered, null)
    torch.testing.assert_close(both[:8], expected[order], **TOL)
    dropped = forward(prior, x_t[order], t[order], TextEncoding(*(x[order] for x in (repeated.text_embed,
                      repeated.text_states, repeated.text_mask))), torch.ones(8, dtype=torch.bool))
    torch.testing.assert_close(both[8:], dropped, **TOL)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_cached_and_uncached_sampling_give_the_same_embeddings(sampler, guidance_scale):
    prior, text = guided_prior(), random_text(3, seed=2)

    def run(use_cache, fn=sample_candidates, **kwargs):
        return fn(prior, text, steps=6, sampler=sampler, guidance_scale=guidance_scale, progress=False,
                  generator=torch.Generator().manual_seed(5), use_cache=use_cache, **kwargs)

    cached, uncached = run(True, num_samples=2), run(False, num_samples=2)
    assert cached.shape == (3, 2, D) and not torch.equal(cached[:, 0], cached[:, 1])
    torch.testing.assert_close(cached, uncached, **TOL)
    torch.testing.assert_close(run(True, sample_image_embeds, best_of=2), run(False, sample_image_embeds, best_of=2),
                               **TOL)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_the_prefix_is_computed_once_per_sampling_call(monkeypatch, guidance_scale):
    prior, text, steps = guided_prior(), random_text(4), 5
    prefix_calls, full_passes = [], []
    encode_prefix = prior.encode_prefix
    monkeypatch.setattr(prior, "encode_prefix", lambda *a, **k: prefix_calls.append(a[0].shape[0]) or
                        encode_prefix(*a, **k))
    prior.transformer.register_forward_hook(lambda module, args, out: full_passes.append(args[0].shape))
    sample_image_embeds(prior, text, best_of=2, steps=steps, guidance_scale=guidance_scale, progress=False)
    # one prefix pass: the 4 captions, plus the null prefix when guiding; never once per candidate or step
    assert prefix_calls == [4 if guidance_scale == 1.0 else 5]
    assert full_passes == [torch.Size([prefix_calls[0], text.text_mask.shape[1] + 1, prior.config.width])]
    forwards = []
    prior.register_forward_hook(lambda module, args, out: forwards.append(args[0].shape[0]))
    sample_image_embeds(prior, text, best_of=2, steps=steps, guidance_scale=guidance_scale, progress=False,
                        use_cache=False)
    assert len(forwards) == steps and prefix_calls == [prefix_calls[0]]  # uncached: the whole network every step


def test_the_training_forward_is_untouched_and_layers_it_cannot_reproduce_are_refused():
    prior = tiny_prior()
    assert not any("cache" in name for name in prior.state_dict())  # checkpoints unchanged
    prior.train()
    text = random_text(2)
    with pytest.raises(AssertionError, match="eval"):
        prior.encode_prefix(text.text_embed, text.text_states, text.text_mask)
    with pytest.raises(AssertionError, match="plain"):
        check_cacheable(Decoder(dim=32, depth=1, heads=2, attn_dim_head=16, rotary_pos_emb=True))
