"""The diffusion prior: tensor shapes, CFG dropout, padding, training signal, save/load, best-of-N sampling."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from prior import (
    DiffusionPriorNetwork,
    PriorConfig,
    TrainPriorConfig,
    draw_cond_drop,
    length_groups,
    prior_loss,
    sample_candidates,
    sample_image_embeds,
    select_best,
)
from unclip.clip import TextEncoding
from unclip.config import load_config
from unclip.nn.layers import timestep_embedding

ROOT = Path(__file__).resolve().parents[1]
D, W, L = 32, 48, 16  # the tiny_clip fixture's embed_dim, text width and context length


def tiny_config(**overrides) -> PriorConfig:
    base = dict(embed_dim=D, text_width=W, text_length=L, width=64, depth=2, heads=2, dim_head=32,
                schedule={"kind": "cosine", "num_timesteps": 100})
    return load_config(PriorConfig, {**base, **overrides})


def tiny_prior(seed: int = 0, **overrides) -> DiffusionPriorNetwork:
    torch.manual_seed(seed)
    return DiffusionPriorNetwork(tiny_config(**overrides)).eval()


def random_text(b: int, seed: int = 0) -> TextEncoding:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(L)[None, :] < torch.randint(3, L + 1, (b, 1), generator=g)  # (b, l), real tokens first
    return TextEncoding(F.normalize(torch.randn(b, D, generator=g), dim=-1), torch.randn(b, L, W, generator=g), mask)


def forward(prior, x_t, t, text, cond_drop=None):
    return prior(x_t, t, text_embed=text.text_embed, text_states=text.text_states, text_mask=text.text_mask,
                 cond_drop=cond_drop)


# ----- configs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "prior").glob("*.yaml")), ids=lambda p: p.name)
def test_every_prior_config_loads(path):
    cfg = load_config(TrainPriorConfig, path)
    assert cfg.model.objective == "x0" and cfg.model.cond_drop_prob == 0.1
    assert cfg.eval.best_of == 2 and cfg.eval.steps == 64 and 1.0 in cfg.eval.guidance_scales


def test_full_scale_config_matches_vit_l_14():
    cfg = load_config(TrainPriorConfig, ROOT / "configs" / "prior" / "vit-l-14.yaml").model
    assert (cfg.embed_dim, cfg.text_width, cfg.text_length) == (768, 768, 77)
    assert cfg.width * cfg.width * 12 * cfg.depth > 1e9  # the paper's ~1B-parameter order of magnitude


def test_config_is_strict_and_scale_is_sqrt_d():
    from unclip.config import ConfigError

    with pytest.raises(ConfigError, match="objective"):
        tiny_config(objective="x_0")
    with pytest.raises(ConfigError, match="cond_drop_prob"):
        tiny_config(cond_drop_prob=1.5)
    assert tiny_config().scale == pytest.approx(D**0.5) and tiny_config(embed_scale=2.0).scale == 2.0


# ----- shapes ----------------------------------------------------------------------------------------------
def test_shapes_of_every_tensor():
    prior, b = tiny_prior(), 3
    assert timestep_embedding(torch.tensor([0, 5, 99]), 64).shape == (b, 64)
    assert timestep_embedding(torch.tensor([0, 5, 99]), 7).shape == (b, 7)
    text = random_text(b)
    out = forward(prior, torch.randn(b, D), torch.tensor([0, 50, 99]), text, torch.tensor([True, False, False]))
    assert out.shape == (b, D) and out.dtype == torch.float32 and torch.isfinite(out).all()
    candidates = sample_candidates(prior, text, 4, steps=3, progress=False)
    assert candidates.shape == (b, 4, D)
    torch.testing.assert_close(candidates.norm(dim=-1), torch.ones(b, 4))
    embeds = sample_image_embeds(prior, text, steps=3, progress=False)
    assert embeds.shape == (b, D)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(b))


def test_wrong_shapes_are_refused():
    prior, text = tiny_prior(), random_text(2)
    with pytest.raises(AssertionError, match="x_t"):
        forward(prior, torch.randn(2, D + 1), torch.zeros(2, dtype=torch.long), text)
    short = TextEncoding(text.text_embed, text.text_states[:, :-1], text.text_mask[:, :-1])
    with pytest.raises(AssertionError, match="text_states"):
        forward(prior, torch.randn(2, D), torch.zeros(2, dtype=torch.long), short)


@pytest.mark.parametrize("length_buckets", [0, 4])
def test_padded_text_states_are_not_attended_to(length_buckets):
    prior, text = tiny_prior(length_buckets=length_buckets), random_text(4)
    x_t, t = torch.randn(4, D), torch.tensor([3, 30, 60, 90])
    noisy = text.text_states.masked_fill(~text.text_mask[..., None], 0) + 100 * (~text.text_mask[..., None])
    changed = TextEncoding(text.text_embed, noisy, text.text_mask)
    torch.testing.assert_close(forward(prior, x_t, t, changed), forward(prior, x_t, t, text))


def test_length_groups_cover_every_row_once_at_its_length():
    lengths = torch.tensor([5, 0, 16, 3, 3, 9, 16, 12, 1, 7])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    mask[2, 4] = False  # a hole: the row still needs all 16 slots
    groups = length_groups(mask, 3)
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(10))
    assert [n for _, n in groups] == sorted(n for _, n in groups)  # ascending
    for r, n in groups:
        assert lengths[r].max().item() == n
    assert [n for _, n in length_groups(mask, 1)] == [16]
    # as many groups as asked (at most b), whatever the lengths: FSDP needs the same calls on every process
    assert len(length_groups(mask, 50)) == 10
    assert len(length_groups(torch.ones(6, L, dtype=torch.bool), 4)) == 4


@pytest.mark.parametrize("buckets", [1, 3, 8])
def test_length_buckets_give_the_full_length_outputs_and_gradients(buckets):
    text, b = random_text(8, seed=3), 8
    x_t, t, drop = torch.randn(b, D), torch.randint(0, 100, (b,)), torch.arange(b) % 4 == 0
    outs, grads = [], []
    for n in (0, buckets):
        prior = tiny_prior(length_buckets=n).train()
        out = forward(prior, x_t, t, text, drop)
        out.square().mean().backward()
        outs.append(out)
        grads.append({k: p.grad for k, p in prior.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and "null_text_tokens" in grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-4, msg=k)


def test_length_buckets_under_bf16_autocast():
    text, b = random_text(8, seed=4), 8
    x_t, t = torch.randn(b, D), torch.randint(0, 100, (b,))
    outs = []
    for n in (0, 4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(forward(tiny_prior(length_buckets=n).train(), x_t, t, text))
    assert outs[1].dtype == outs[0].dtype
    torch.testing.assert_close(outs[1].float(), outs[0].float(), atol=0.05, rtol=0.05)


# ----- classifier-free guidance ----------------------------------------------------------------------------
def test_dropped_rows_ignore_the_text_but_see_x_t():
    prior, b = tiny_prior(), 4
    x_t, t, drop = torch.randn(b, D), torch.full((b,), 40), torch.tensor([True, False, True, False])
    out = forward(prior, x_t, t, random_text(b, seed=1), drop)
    other = forward(prior, x_t, t, random_text(b, seed=2), drop)
    torch.testing.assert_close(out[drop], other[drop])  # the null conditioning replaced the captions
    assert (out[~drop] - other[~drop]).abs().max() > 1e-3  # kept captions still matter
    torch.testing.assert_close(out[~drop], forward(prior, x_t, t, random_text(b, seed=1))[~drop])
    moved = forward(prior, x_t + 1, t, random_text(b, seed=1), drop)
    assert (moved[drop] - out[drop]).abs().max() > 1e-3  # x_t is never dropped


def test_training_drops_captions_at_the_configured_rate():
    prior = tiny_prior()
    prior.train()
    seen = []
    hook = prior.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["cond_drop"]), with_kwargs=True)
    b, calls = 1000, 8
    image_embed, text = F.normalize(torch.randn(b, D), dim=-1), random_text(b)
    torch.manual_seed(0)
    for _ in range(calls):
        _, metrics = prior_loss(prior, image_embed, text.text_embed, text.text_states, text.text_mask)
    hook.remove()
    rate = torch.cat(seen).float().mean().item()
    assert len(seen) == calls and abs(rate - 0.1) < 0.015, rate  # 8000 draws: sd of the rate ~0.0034
    assert 0.0 <= metrics["cond_drop"] <= 0.2
    assert draw_cond_drop(10_000, 0.0).sum() == 0


def test_guidance_scale_one_is_the_plain_model_and_others_differ():
    prior, text = tiny_prior(), random_text(2)
    for param in (prior.null_text_tokens, prior.null_text_embed):  # make the null conditioning distinct
        param.data.normal_()

    def run(scale):
        return sample_image_embeds(prior, text, guidance_scale=scale, steps=4, best_of=1, progress=False,
                                   generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(run(1.0), run(1.0))
    assert (run(3.0) - run(1.0)).abs().max() > 1e-4


# ----- training signal -------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["x0", "eps", "v"])
def test_a_tiny_prior_learns_a_few_pairs(objective):
    from unclip.diffusion import denoised_from_output, diffusion_loss, q_sample

    prior = tiny_prior(objective=objective)
    g = torch.Generator().manual_seed(4)
    text = random_text(8, seed=3)
    image_embed = F.normalize(text.text_embed + 0.5 * torch.randn(8, D, generator=g), dim=-1)
    x0 = (image_embed * prior.scale).repeat(8, 1)  # a fixed held-in probe: 8 timesteps x 8 pairs
    t, noise = torch.arange(8).repeat_interleave(8) * 12 + 5, torch.randn(64, D, generator=g)
    x_t, probe_text = q_sample(prior.schedule, x0, t, noise), random_text(8, seed=3)
    probe_text = TextEncoding(*(x.repeat(8, *[1] * (x.ndim - 1)) for x in (text.text_embed, text.text_states,
                                                                            text.text_mask)))

    def probe_loss() -> tuple[float, float]:  # (the objective's loss, the x0 MSE)
        with torch.no_grad():
            out = forward(prior.eval(), x_t, t, probe_text)
        x0_pred = denoised_from_output(out, x_t, t, prior.schedule, objective).x0
        loss = diffusion_loss(out, x0, x_t, t, noise, prior.schedule, objective).mean().item()
        return loss, F.mse_loss(x0_pred, x0).item()

    before = probe_loss()
    opt = torch.optim.AdamW(prior.train().parameters(), lr=2e-3)
    torch.manual_seed(0)
    for _ in range(100):
        loss, metrics = prior_loss(prior, image_embed, text.text_embed, text.text_states, text.text_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = probe_loss()
    assert after[0] < {"x0": 0.1, "v": 0.7, "eps": 0.9}[objective] * before[0], (before, after)
    assert -1.0 <= metrics["x0_cos"] <= 1.0


# ----- save / load and sampling ----------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_samples(tmp_path):
    prior, text = tiny_prior(seed=5), random_text(3)
    prior.clip = "runs/clip-shapes-tiny/model"
    prior.save_pretrained(tmp_path / "prior")
    loaded = DiffusionPriorNetwork.from_pretrained(tmp_path / "prior")
    assert loaded.config == prior.config and loaded.clip == prior.clip and not loaded.training
    for sampler in ("ddim", "dpmpp_2m"):
        a, b = (sample_image_embeds(p, text, steps=5, sampler=sampler, guidance_scale=2.0, progress=False,
                                    generator=torch.Generator().manual_seed(7)) for p in (prior, loaded))
        assert torch.equal(a, b)


def test_checkpoint_dtypes_and_eps_moments_stay_float64(tmp_path):
    """from_pretrained casts to the asked dtype; save_pretrained(dtype=) stores the weights in it, and they load back
    as float32; the Analytic-DPM moments are stored and loaded as float64 whatever the weights' dtype."""
    prior, text = tiny_prior(seed=2), random_text(2)
    moments = torch.linspace(1.0, 2.0, 100, dtype=torch.float64) + 1e-12  # digits that float32 would lose
    prior.eps_moments = moments
    prior.save_pretrained(tmp_path / "fp32")
    bf16 = DiffusionPriorNetwork.from_pretrained(tmp_path / "fp32", device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and not bf16.training
    assert bf16.eps_moments.dtype == torch.float64 and torch.equal(bf16.eps_moments, moments)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as a pipeline loaded in bfloat16 samples
        embeds = sample_image_embeds(bf16, text, steps=2, progress=False, generator=torch.Generator().manual_seed(0))
    assert embeds.dtype == torch.float32 and embeds.shape == (2, D)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(2))
    prior.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    stored = load_file(str(tmp_path / "fp16" / "model.safetensors"))
    assert stored.keys() == {*prior.state_dict(), "eps_moments"}
    assert stored["eps_moments"].dtype == torch.float64 and torch.equal(stored["eps_moments"], moments)
    assert {v.dtype for k, v in stored.items() if k != "eps_moments" and v.is_floating_point()} == {torch.float16}
    assert next(prior.parameters()).dtype == torch.float32, "saving does not cast the module"
    loaded = DiffusionPriorNetwork.from_pretrained(tmp_path / "fp16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.eps_moments.dtype == torch.float64 and torch.equal(loaded.eps_moments, moments)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, prior.state_dict()[name].half().float()), name


@pytest.mark.xfail(strict=True, raises=RuntimeError, reason="x_transformers' Attention zeroes masked rows with "
                   "einx.where(mask, out, 0.), which promotes a bfloat16 output to float32")
def test_a_bfloat16_prior_runs_without_autocast():
    prior, text = tiny_prior().to(torch.bfloat16), random_text(2).to(dtype=torch.bfloat16)
    out = forward(prior, torch.randn(2, D, dtype=torch.bfloat16), torch.tensor([1, 50]), text)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_loading_another_kind_or_architecture_is_refused(tmp_path):
    from unclip.checkpoint import CheckpointError, save_pretrained_dir

    tiny_prior().save_pretrained(tmp_path / "prior")
    save_pretrained_dir(tmp_path / "other", kind="clip", config={}, state_dict={})
    with pytest.raises(CheckpointError, match="not a 'prior'"):
        DiffusionPriorNetwork.from_pretrained(tmp_path / "other")
    wider = DiffusionPriorNetwork(tiny_config(width=96))
    wider.save_pretrained(tmp_path / "prior", state_dict=tiny_prior().state_dict())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        DiffusionPriorNetwork.from_pretrained(tmp_path / "prior")


def test_select_best_picks_the_highest_dot_product():
    text_embed = F.normalize(torch.randn(5, D), dim=-1)
    candidates = F.normalize(torch.randn(5, 3, D), dim=-1)
    best = select_best(candidates, text_embed)
    scores = torch.einsum("bnd,bd->bn", candidates, text_embed)
    for i in range(5):
        assert torch.equal(best[i], candidates[i, scores[i].argmax()])
        assert (best[i] @ text_embed[i]) >= scores[i].max() - 1e-6
    aligned = candidates.clone()
    aligned[:, 1] = text_embed  # the text embedding itself always wins
    assert torch.equal(select_best(aligned, text_embed), text_embed)


def test_best_of_n_samples_keep_the_candidate_closest_to_the_text():
    prior, text = tiny_prior(), random_text(4)
    kwargs = dict(steps=4, progress=False)
    candidates = sample_candidates(prior, text, 3, generator=torch.Generator().manual_seed(1), **kwargs)
    best = sample_image_embeds(prior, text, best_of=3, generator=torch.Generator().manual_seed(1), **kwargs)
    assert not torch.equal(candidates[:, 0], candidates[:, 1])  # independent draws per caption
    scores = torch.einsum("bnd,bd->bn", candidates, text.text_embed)
    torch.testing.assert_close(best, candidates[torch.arange(4), scores.argmax(dim=1)])


# ----- Analytic-DPM ------------------------------------------------------------------------------------------
def test_analytic_sampling_needs_calibrated_moments_which_are_saved_with_the_prior(tmp_path):
    """DALL-E 2's prior sampler: the moments come from `calibrate_prior`, travel in model.safetensors (kept at full
    precision when a pipeline stores float16), and a prior without them says how to get them."""
    from prior.analytic import calibrate_prior
    from unclip.checkpoint import CheckpointError

    prior, text = tiny_prior(), random_text(3)
    with pytest.raises(ValueError, match="needs the prior's Analytic-DPM moments, and this prior has none"):
        sample_image_embeds(prior, text, best_of=2, steps=4, sampler="analytic_ddpm", progress=False)
    calibration = random_text(10, seed=1)
    moments = calibrate_prior(prior, calibration, F.normalize(torch.randn(10, D), dim=-1), batch_size=4,
                              generator=torch.Generator().manual_seed(0), progress=False)
    assert moments.shape == (100,) and moments.dtype == torch.float64 and bool((moments > 0).all())
    assert prior.eps_moments is moments and not prior.training
    prior.save_pretrained(tmp_path / "p")
    loaded = DiffusionPriorNetwork.from_pretrained(tmp_path / "p")
    torch.testing.assert_close(loaded.eps_moments, moments, rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    embeds = sample_image_embeds(loaded, text, best_of=2, steps=4, sampler="analytic_ddpm", generator=g,
                                 progress=False)
    assert embeds.shape == (3, D) and torch.allclose(embeds.norm(dim=-1), torch.ones(3))
    assert moments[:50].min() > 1  # an untrained prior's x0 says nothing: Gamma >= 1, DDPM's variances
    g = torch.Generator().manual_seed(3)
    ddpm = sample_image_embeds(loaded, text, best_of=2, steps=4, sampler="ddpm", generator=g, progress=False)
    loaded.eps_moments = torch.full_like(moments, 0.5)  # one that knows something: larger variances
    g = torch.Generator().manual_seed(3)
    wider = sample_image_embeds(loaded, text, best_of=2, steps=4, sampler="analytic_ddpm", generator=g,
                                progress=False)
    assert not torch.allclose(wider, ddpm, atol=1e-3)  # the same noise, other variances

    state = load_file(str(tmp_path / "p" / "model.safetensors"))
    save_file({**state, "eps_moments": moments[:50]}, str(tmp_path / "p" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"eps_moments must be 100 finite values >= 0 or NaN .*got shape \(50,"):
        DiffusionPriorNetwork.from_pretrained(tmp_path / "p")
    partial = moments.clone()
    partial[::2] = float("nan")  # estimated at some timesteps only (eps_moments(timesteps=...)): loads
    save_file({**state, "eps_moments": partial}, str(tmp_path / "p" / "model.safetensors"))
    assert torch.isnan(DiffusionPriorNetwork.from_pretrained(tmp_path / "p").eps_moments).sum() == 50
