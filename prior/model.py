"""The diffusion prior network (DALL-E 2, section 2.1): a decoder-only causal transformer.

    prior = DiffusionPriorNetwork(PriorConfig(embed_dim=128, text_width=128, text_length=24, width=256, depth=4))
    out = prior(x_t, t, text_embed=enc.text_embed, text_states=enc.text_states, text_mask=enc.text_mask)  # (b, d)

The sequence, in this order (one row of width `width` each; the order is the paper's, and it puts everything
that does not change across sampling steps first, so sampling computes the caption prefix once: `encode_prefix`,
`forward_cached` and prior/cache.py):

    [ text_states (l) | text_embed | timestep | x_t | query ]   -> output at the query: the prediction (b, d)

with causal attention, a learned absolute position per slot, and padded text tokens masked out of attention.

Scaling: CLIP embeddings are unit-norm d-vectors; the diffusion runs on x0 = image_embed * scale with
scale = sqrt(d) by default (`PriorConfig.scale`), so x0 has norm sqrt(d) and each coordinate has unit second
moment, the level the noise schedule assumes. The text embedding input is scaled the same way. `x_t` and the
output (x0, eps or v by `objective`) live in that scaled space; `sample_image_embeds` renormalises its samples.

Classifier-free guidance: `cond_drop` (b,) bool replaces a row's text conditioning, both the projected text
tokens and the projected text embedding, by learned null embeddings: `null_text_tokens` (l, width), one
learned row per position, attended to in full (their mask is all True), and `null_text_embed` (width,). The
timestep and x_t are never dropped. Training drops captions with probability `cond_drop_prob`
(`prior.training.prior_loss`); sampling with guidance uses `unclip.diffusion.classifier_free_guidance`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import pack, rearrange, repeat
from torch import Tensor, nn
from x_transformers import Decoder

from unclip.checkpoint import CheckpointError, load_pretrained_dir, load_state_dict_strict, save_pretrained_dir
from unclip.clip import TextEncoding
from unclip.config import config_to_dict, load_config
from unclip.diffusion import Denoiser, NoiseSchedule, make_denoiser, make_schedule, randn, sampler_options
from unclip.nn.layers import timestep_embedding
from unclip.settings import StageSampling
from unclip.stage import CascadeState, Role, SamplingRun, run_sampler

from .cache import PrefixCache, check_cacheable, prefix_cache_from_intermediates, suffix_forward
from .config import PriorConfig
from .guided import prior_model_fn, select_best

__all__ = ["KIND", "DiffusionPriorNetwork", "length_groups"]

KIND = "prior"
NUM_EXTRA_SLOTS = 4  # text_embed, timestep, x_t, query
EPS_MOMENTS = "eps_moments"  # the safetensors key of a calibrated prior's Analytic-DPM moments


class DiffusionPriorNetwork(nn.Module):
    """Predicts the clean (scaled) CLIP image embedding, or eps / v, from x_t (b, d), t (b,) and the caption.

    `clip` records which CLIP the prior was trained against (a directory or open_clip name; informational) and
    `clip_fingerprint` that CLIP's weights (`unclip.data.embeddings.clip_fingerprint`), which assembling a
    pipeline checks; both are saved in config.json. `schedule` is the noise schedule of `config.schedule`, float64
    on the CPU. As a stage of the cascade (`unclip.stage.Stage`) it maps caption encodings to image embeddings.
    The parameters `text_tokens_proj` and `null_text_tokens` act on the per-token text states (their names are the
    checkpoints' keys).
    """

    role: ClassVar[Role] = "prior"
    kind: ClassVar[str] = KIND

    def __init__(self, config: PriorConfig, clip: str | None = None, clip_fingerprint: str | None = None) -> None:
        super().__init__()
        self.config, self.clip, self.clip_fingerprint = config, clip, clip_fingerprint
        self.eps_moments: Tensor | None = None  # (T,) float64 Analytic-DPM moments (prior/analytic.py), if calibrated
        self.schedule: NoiseSchedule = make_schedule(config.schedule.kind, config.schedule.num_timesteps)
        c, w = config, config.width
        self.text_tokens_proj = nn.Linear(c.text_width, w)
        self.text_embed_proj = nn.Linear(c.embed_dim, w)
        self.x_t_proj = nn.Linear(c.embed_dim, w)
        self.time_mlp = nn.Sequential(nn.Linear(w, 4 * w), nn.SiLU(), nn.Linear(4 * w, w))
        self.null_text_tokens = nn.Parameter(torch.randn(c.text_length, w) * 0.02)  # (l, width)
        self.null_text_embed = nn.Parameter(torch.randn(w) * 0.02)  # (width,)
        self.query = nn.Parameter(torch.randn(w) * 0.02)  # (width,) the final learned query
        self.pos_embed = nn.Parameter(torch.randn(c.text_length + NUM_EXTRA_SLOTS, w) * 0.02)  # (n, width)
        self.transformer = Decoder(
            dim=w, depth=c.depth, heads=c.heads, attn_dim_head=c.dim_head, ff_mult=c.ff_mult,
            attn_dropout=c.dropout, ff_dropout=c.dropout,
        )  # fmt: skip
        self.to_out = nn.Linear(w, c.embed_dim)

    @property
    def scale(self) -> float:
        """unit-norm CLIP embedding * scale = diffusion-space x0 (see the module docstring)."""
        return self.config.scale

    @property
    def device(self) -> torch.device:
        return self.query.device

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        text_embed: Tensor,
        text_states: Tensor,
        text_mask: Tensor,
        cond_drop: Tensor | None = None,
    ) -> Tensor:
        """The network's prediction (b, d) in the scaled space (x0, eps or v by `config.objective`).

        x_t: (b, d) noised scaled image embedding; t: (b,) long timesteps; text_embed: (b, d) unit-norm CLIP text
        embedding; text_states: (b, l, w) CLIP per-token encodings; text_mask: (b, l) bool, True at real tokens;
        cond_drop: (b,) bool, True where the null text conditioning replaces the caption (None: all False).
        """
        c = self.config
        b = x_t.shape[0]
        assert x_t.shape == (b, c.embed_dim), f"x_t must be (b, {c.embed_dim}), got {tuple(x_t.shape)}"
        assert t.shape == (b,), f"t must be ({b},), got {tuple(t.shape)}"
        assert text_embed.shape == (b, c.embed_dim), f"text_embed must be ({b}, {c.embed_dim}), got {text_embed.shape}"
        assert text_states.shape == (b, c.text_length, c.text_width), (
            f"text_states must be ({b}, {c.text_length}, {c.text_width}), got {tuple(text_states.shape)}"
        )
        assert text_mask.shape == (b, c.text_length), f"text_mask must be ({b}, {c.text_length}), got {text_mask.shape}"
        prefix, prefix_mask = self._embed_prefix(text_embed, text_states, text_mask, cond_drop)
        seq, _ = pack([prefix, self._embed_suffix(x_t, t)], "b * w")  # (b, l + 4, width)
        mask = torch.cat([prefix_mask, prefix_mask.new_ones(b, NUM_EXTRA_SLOTS - 1)], dim=1)  # (b, l + 4)
        if c.length_buckets == 0:
            return self.to_out(self.transformer(seq, mask=mask)[:, -1])  # the query's output: (b, d)
        groups = length_groups(prefix_mask[:, :-1], c.length_buckets)
        queries = []
        for rows, length in groups:
            keep = torch.cat([torch.arange(length, device=seq.device),
                              torch.arange(c.text_length, seq.shape[1], device=seq.device)])  # (length + 4,)
            h = self.transformer(seq[rows][:, keep], mask=mask[rows][:, keep])  # (k, length + 4, width)
            queries.append(h[:, -1])
        order = torch.cat([rows for rows, _ in groups])  # (b,) the rows in group order
        return self.to_out(torch.cat(queries)[torch.argsort(order)])  # the query's output, in row order: (b, d)

    def _embed_prefix(
        self, text_embed: Tensor, text_states: Tensor, text_mask: Tensor, cond_drop: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The caption prefix [text tokens | text embed] with positions: (b, l + 1, width), and its mask (b, l + 1)."""
        b = text_embed.shape[0]
        tokens = self.text_tokens_proj(text_states)  # (b, l, width)
        embed = self.text_embed_proj(text_embed * self.scale)  # (b, width)
        mask = text_mask.bool()
        if cond_drop is not None:
            drop = cond_drop.bool()
            assert drop.shape == (b,), f"cond_drop must be ({b},), got {tuple(drop.shape)}"
            tokens = torch.where(drop[:, None, None], self.null_text_tokens.to(tokens.dtype), tokens)
            embed = torch.where(drop[:, None], self.null_text_embed.to(embed.dtype), embed)
            mask = mask | drop[:, None]  # the null tokens are attended to in full
        seq, _ = pack([tokens, embed], "b * w")  # (b, l + 1, width)
        n = seq.shape[1]
        return seq + self.pos_embed[:n].to(seq.dtype), torch.cat([mask, mask.new_ones(b, 1)], dim=1)

    def _embed_suffix(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The suffix [timestep | x_t | query] with positions: (b, 3, width)."""
        b, width = x_t.shape[0], self.config.width
        x = self.x_t_proj(x_t)
        time = self.time_mlp(timestep_embedding(t, width).to(x.dtype))  # (b, width)
        query = repeat(self.query, "w -> b w", b=b).to(x.dtype)
        seq, _ = pack([time, x, query], "b * w")  # (b, 3, width)
        return seq + self.pos_embed[-(NUM_EXTRA_SLOTS - 1) :].to(seq.dtype)

    # ----- sampling with a cached caption prefix (prior/cache.py) ------------------------------------------
    def encode_prefix(
        self, text_embed: Tensor, text_states: Tensor, text_mask: Tensor, cond_drop: Tensor | None = None
    ) -> PrefixCache:
        """Every layer's keys and values at the caption prefixes of b captions (cond_drop: as in `forward`; a
        dropped row is the null prefix, whatever its text): one pass, reused by `forward_cached`. Eval only."""
        c, b = self.config, text_embed.shape[0]
        assert text_embed.shape == (b, c.embed_dim), f"text_embed must be (b, {c.embed_dim}), got {text_embed.shape}"
        assert text_states.shape == (b, c.text_length, c.text_width), f"text_states: got {tuple(text_states.shape)}"
        assert text_mask.shape == (b, c.text_length), f"text_mask must be ({b}, {c.text_length}), got {text_mask.shape}"
        assert not self.training, "the prefix cache is for sampling (eval mode)"
        check_cacheable(self.transformer)
        seq, mask = self._embed_prefix(text_embed, text_states, text_mask, cond_drop)
        _, intermediates = self.transformer(seq, mask=mask, return_hiddens=True)
        return prefix_cache_from_intermediates(intermediates, mask)

    def forward_cached(self, x_t: Tensor, t: Tensor, *prefixes: PrefixCache) -> Tensor:
        """`forward` for x_t (n, d) and t (n,) whose rows take their caption from cached prefixes: only the suffix
        [timestep | x_t | query] is run. With one cache of g prefixes the rows are '(g m)' (m rows per prefix);
        with several, the rows split into equal parts, one per cache (`prior.cache.suffix_forward`). Returns (n, d).
        """
        n = x_t.shape[0]
        assert x_t.shape == (n, self.config.embed_dim), f"x_t must be (n, {self.config.embed_dim}), got {x_t.shape}"
        assert t.shape == (n,), f"t must be ({n},), got {tuple(t.shape)}"
        assert prefixes and not self.training, "needs a prefix cache, and eval mode (it is for sampling)"
        return self.to_out(suffix_forward(self.transformer, self._embed_suffix(x_t, t), prefixes))  # (n, d)

    # ----- the stage protocol (unclip.stage) ------------------------------------------------------------
    def default_sampling(self) -> StageSampling:
        """64 steps, as the paper's prior; ancestral DDPM (the paper's Analytic-DPM needs calibrated moments), no
        guidance (on SHAPES, guidance 2 gave the same cosine to the true image embeddings and 4 a lower one)."""
        return StageSampling(sampler="ddpm", steps=64, guidance=1.0)

    def check_sampling(self, spec: StageSampling) -> None:
        """A sampler that needs Analytic-DPM moments (analytic_ddpm) needs a calibrated prior."""
        if sampler_options(spec.sampler).get("moments") and self.eps_moments is None:
            raise ValueError(f"sampler {spec.sampler!r} needs the prior's Analytic-DPM moments, and this prior has "
                             "none: calibrate it (train-prior does it with calibration_samples > 0; "
                             "prior.analytic.calibrate_prior for any prior) or choose another sampler")

    def sampler_options(self) -> dict[str, Any]:
        """The Analytic-DPM moments of a calibrated prior (prior/analytic.py), for `analytic_ddpm`."""
        return {"moments": self.eps_moments}

    def denoiser(self, cond: Mapping[str, Any], spec: StageSampling) -> Denoiser:
        """The prior under guidance `spec.guidance` for cond = {"text": TextEncoding of b captions on the prior's
        device and dtype, "num_samples": n}: a denoiser of rows '(b n)'. With cond["use_cache"] False the whole
        sequence runs at every step instead of reusing the caption prefixes (prior/sampling.py)."""
        model_fn = prior_model_fn(self, cond["text"], cond["num_samples"], spec.guidance, cond.get("use_cache", True))
        return make_denoiser(model_fn, self.schedule, self.config.objective)

    def sample(self, state: CascadeState, spec: StageSampling, run: SamplingRun, *, name: str = "prior",
               x_T: Tensor | None = None, use_cache: bool = True) -> CascadeState:
        """`state.image_embed` (b, d), unit norm: for each of the b captions of `state.text`, the best of
        `run.best_of` samples by dot product with its text embedding (DALL-E 2 draws 2)."""
        text = state.text.to(self.device, next(self.parameters()).dtype)
        candidates = self.sample_candidates(text, spec, run, name=name, x_T=x_T, use_cache=use_cache)
        return state.but(image_embed=select_best(candidates, text.text_embed))

    def sample_candidates(self, text: TextEncoding, spec: StageSampling, run: SamplingRun, *, name: str = "prior",
                          x_T: Tensor | None = None, use_cache: bool = True) -> Tensor:
        """`run.best_of` unit-norm image embeddings per caption of `text`: (b, n, d). x_T: (b * n, d), rows
        '(b n)'; drawn from `run.generator` (n rows from each caption's generator) when None."""
        n, dtype = run.best_of, next(self.parameters()).dtype
        text = text.to(self.device, dtype)
        b, d = text.text_embed.shape
        if x_T is None:
            x_T = randn((b * n, d), generator=run.generator, device=self.device, dtype=dtype)
        cond = {"text": text, "num_samples": n, "use_cache": use_cache}
        # x-transformers returns masked attention in float32: half-precision weights need autocast to meet it
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            x0 = run_sampler(self, name, spec, x_T, cond, run)
        return rearrange(F.normalize(x0.float(), dim=-1), "(b n) d -> b n d", n=n)  # on CLIP's unit sphere

    # ----- checkpoints --------------------------------------------------------------------------------
    def pretrained_config(self) -> dict[str, Any]:
        """What config.json stores: the full PriorConfig and the CLIP it was trained against."""
        return {"model": config_to_dict(self.config), "clip": self.clip, "clip_fingerprint": self.clip_fingerprint}

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None, *,
                        state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write config.json (kind "prior") + model.safetensors atomically; `state_dict` overrides the weights,
        `dtype` casts the stored float weights. Calibrated eps moments are stored beside the weights, as the tensor
        `eps_moments`, always in float64 (1 - Gamma_t near 0 would not survive float16)."""
        state = dict(self.state_dict() if state_dict is None else state_dict)
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        if self.eps_moments is not None:
            state[EPS_MOMENTS] = self.eps_moments.detach().to("cpu", torch.float64)
        return save_pretrained_dir(path, kind=KIND, config=self.pretrained_config(), state_dict=state)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None) -> DiffusionPriorNetwork:
        """Load a directory written by `save_pretrained` (in eval mode) onto `device` in `dtype` (default: the
        module's float32); needs nothing but the directory. The eps moments stay float64."""
        meta, state = load_pretrained_dir(path, kind=KIND)
        cfg = meta["config"]
        prior = cls(load_config(PriorConfig, cfg["model"]), clip=cfg.get("clip"),
                    clip_fingerprint=cfg.get("clip_fingerprint"))
        moments = state.pop(EPS_MOMENTS, None)
        load_state_dict_strict(prior, state, source=path)
        if moments is not None:
            prior.eps_moments = check_eps_moments(moments.double(), prior.config.schedule.num_timesteps, path)
        return prior.to(device=device, dtype=dtype).eval()


def check_eps_moments(moments: Tensor, num_timesteps: int, source: str | Path) -> Tensor:
    """Stored Analytic-DPM moments, checked: one value >= 0 per timestep, or NaN where none was estimated (the
    sampler refuses to walk those), else a CheckpointError."""
    valid = torch.isnan(moments) | (torch.isfinite(moments) & (moments >= 0))
    if moments.shape != (num_timesteps,) or not bool(valid.all()):
        raise CheckpointError(f"{source}: eps_moments must be {num_timesteps} finite values >= 0 or NaN (one per "
                              f"timestep), got shape {tuple(moments.shape)}")
    return moments


def length_groups(mask: Tensor, groups: int) -> list[tuple[Tensor, int]]:
    """Split b rows by caption length into min(groups, b) groups of consecutive lengths: [(rows (k,) long, length)].

    mask: (b, l) bool, True at the tokens a row attends to. A row's length is one past its last True token (0 for
    none), and a group's length is its longest row's: cutting a group's token slots to that length drops only
    masked-out slots, so the causal transformer's output at the later slots is unchanged. Rows are sorted by
    length and cut into equal parts. The number of groups depends on b alone, never on the captions: under FSDP
    every process must call each sharded block equally often. One host read (each group's length).
    """
    b, length = mask.shape
    slots = torch.arange(1, length + 1, device=mask.device)
    lengths = (mask * slots).amax(dim=1)  # (b,) one past the last attended slot
    order = torch.argsort(lengths, stable=True)
    parts = torch.tensor_split(order, min(groups, b))  # all non-empty
    tops = lengths[torch.stack([part[-1] for part in parts])].tolist()  # each part's longest row
    return list(zip(parts, tops, strict=True))
