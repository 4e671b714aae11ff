"""Text conditioning: prompt files, and prompts -> the teacher's condition dict.

Embeddings come from the teacher pipeline's own ``encode_prompt`` (its tokenizers, text encoders, clip-skip
and padding rules), so a student sees exactly what the exported pipeline will feed it. Each prompt is
encoded once and cached; the unconditional (negative) embedding is computed once per run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FastdiffError, read_text


def read_prompts(path: str | Path, what: str = "--prompts") -> list[str]:
    """One prompt per line (blank lines skipped), or a JSONL file of {"prompt": ...} (or {"text": ...}) objects."""
    path = Path(path)
    if not path.is_file():
        raise FastdiffError(f"{what} {path}: no such file")
    lines = [line.strip() for line in read_text(path, what).splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            rows = [json.loads(line) for line in lines]
            lines = [str(r["prompt"] if "prompt" in r else r["text"]) for r in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise FastdiffError(f"{what} {path}: each JSONL line needs a \"prompt\" or \"text\" field ({exc})") from None
    if not lines:
        raise FastdiffError(f"{what} {path}: the file has no prompts")
    return lines


def pipeline_family(pipe) -> str:
    """How a pipeline's ``encode_prompt`` is called and what it returns: sd, sdxl, sd3, pixart, sana or flux."""
    name = type(pipe).__name__
    if name == "SanaPipeline":  # not Sana Sprint / PAG / ControlNet: other calls, other inputs
        return "sana"
    if name == "FluxPipeline":  # not Fill / Kontext / Control: those take images too
        return "flux"
    if "PixArt" in name:
        return "pixart"
    if "XL" in name:
        return "sdxl"
    if "StableDiffusion3" in name:
        return "sd3"
    if "StableDiffusion" in name or "LatentConsistency" in name:
        return "sd"
    raise FastdiffError(f"{name}: fastdiff encodes prompts for StableDiffusion, SDXL, SD3, PixArt, Flux and Sana "
                        "pipelines; this pipeline's text conditioning is not supported")


class PromptEncoder:
    """Prompts -> condition dict (``encoder_hidden_states`` and, per family, pooled embeddings / SDXL time ids),
    with the ``uncond_*`` entries classifier-free guidance needs.

    Args:
        pipe: the teacher's diffusers pipeline (tokenizers and text encoders loaded).
        negative_prompt: the unconditional prompt; None = the pipeline's default (empty, or zeros where the
            pipeline zeroes an empty prompt, as SDXL does).
        device: where the embeddings are returned.
    """

    def __init__(self, pipe, negative_prompt: str | None = None, device=None, max_cached: int = 10_000):
        self.pipe = pipe
        self.max_cached = max_cached  # SD1.5 embeddings are 236 kB a prompt: large prompt sets are encoded per batch
        self.family = pipeline_family(pipe)
        self.negative_prompt = negative_prompt
        self.device = torch.device(device or "cpu")
        self.cache: dict[str, dict] = {}
        self.negative: dict | None = None

    def _encode(self, prompts: list[str]) -> tuple[dict, dict]:
        """(positive, negative) condition dicts for a list of prompts, straight from the pipeline."""
        pipe, neg = self.pipe, None if self.negative_prompt is None else [self.negative_prompt] * len(prompts)
        kw = dict(device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=neg)
        if self.family == "sd":
            pos, negative = pipe.encode_prompt(prompts, **kw)
            return {"encoder_hidden_states": pos}, {"encoder_hidden_states": negative}
        if self.family == "pixart":
            # As PixArt's __call__ does by default: captions cleaned when bs4 and ftfy are installed (else it warns).
            pos, mask, negative, neg_mask = pipe.encode_prompt(prompts, negative_prompt=self.negative_prompt or "",
                                                               clean_caption=True, **{k: v for k, v in kw.items()
                                                                                      if k != "negative_prompt"})
            added = self._pixart_micro_conditions(len(prompts), pos.dtype)
            return ({"encoder_hidden_states": pos, "encoder_attention_mask": mask, "added_cond_kwargs": added},
                    {"encoder_hidden_states": negative, "encoder_attention_mask": neg_mask, "added_cond_kwargs": added})
        if self.family == "sana":  # Gemma2 with the complex human instruction, as SanaPipeline.__call__ encodes
            from .sana import prompt_kwargs

            pos, mask, negative, neg_mask = pipe.encode_prompt(prompts, negative_prompt=self.negative_prompt or "",
                                                               **prompt_kwargs(pipe), **{k: v for k, v in kw.items()
                                                                                         if k != "negative_prompt"})
            return ({"encoder_hidden_states": pos, "encoder_attention_mask": mask},
                    {"encoder_hidden_states": negative, "encoder_attention_mask": neg_mask})
        if self.family == "flux":  # T5 sequence + CLIP pooled; the negative (true CFG) encoded as FluxPipeline does
            pos, pooled, _ = pipe.encode_prompt(prompts, device=self.device)
            neg = [self.negative_prompt or ""] * len(prompts)
            negative, neg_pooled, _ = pipe.encode_prompt(neg, device=self.device)
            return ({"encoder_hidden_states": pos, "pooled_projections": pooled},
                    {"encoder_hidden_states": negative, "pooled_projections": neg_pooled})
        if self.family == "sd3":
            pos, negative, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, **kw)
            return ({"encoder_hidden_states": pos, "pooled_projections": pooled},
                    {"encoder_hidden_states": negative, "pooled_projections": neg_pooled})
        pos, negative, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, **kw)
        ids = self._sdxl_time_ids(pos.dtype).expand(len(prompts), -1)
        return ({"encoder_hidden_states": pos, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}},
                {"encoder_hidden_states": negative, "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": ids}})

    def _sdxl_time_ids(self, dtype) -> torch.Tensor:
        """The pipeline's default added time ids: original size = target size = the default image size, no crop."""
        pipe = self.pipe
        size = pipe.default_sample_size * pipe.vae_scale_factor
        proj = (pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None
                else pipe.unet.config.projection_class_embeddings_input_dim)
        ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=dtype, text_encoder_projection_dim=proj)
        return ids.to(self.device)

    def _pixart_micro_conditions(self, n: int, dtype) -> dict:
        """PixArt's resolution / aspect-ratio inputs at the default image size (used by 1024-px models only)."""
        pipe = self.pipe
        if pipe.transformer.config.sample_size != 128:
            return {"resolution": None, "aspect_ratio": None}
        size = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        res = torch.tensor([size, size], dtype=dtype, device=self.device).repeat(n, 1)
        return {"resolution": res, "aspect_ratio": torch.ones(n, 1, dtype=dtype, device=self.device)}

    @torch.no_grad()
    def _encode_rows(self, prompts: list[str]) -> list[dict]:
        """Per-prompt rows straight from the pipeline (and the negative, the first time)."""
        pos, neg = self._encode(prompts)
        if self.negative is None:
            self.negative = _rows(neg, 0)
        return [_rows(pos, j) for j in range(len(prompts))]

    def encode_all(self, prompts: list[str], batch_size: int = 64) -> None:
        """Fill the cache for every distinct prompt (after this the text encoders can be moved off the device)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            self.cache.update(zip(chunk, self._encode_rows(chunk)))

    def __call__(self, prompts: list[str]) -> dict:
        """The condition of a batch of prompts: cached rows stacked, plus the negative as ``uncond_*``.
        Prompts the cache has no room for are encoded for this batch only."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        fresh = {}
        if len(self.cache) + len(missing) <= self.max_cached:
            self.encode_all(missing)
        elif missing:
            fresh = dict(zip(missing, self._encode_rows(missing)))
        cond = _stack([self.cache[p] if p in self.cache else fresh[p] for p in prompts])
        cond.update({"uncond_" + k: v for k, v in _repeat(self.negative, len(prompts)).items()})
        return cond


def _rows(cond: dict, j: int) -> dict:
    return {k: _rows(v, j) if isinstance(v, dict) else None if v is None else v[j].detach() for k, v in cond.items()}


def _stack(rows: list[dict]) -> dict:
    """Rows back into a batch; None entries (PixArt's unused micro-conditions) stay None."""
    return {k: _stack([r[k] for r in rows]) if isinstance(v, dict) else
            None if v is None else torch.stack([r[k] for r in rows]) for k, v in rows[0].items()}


def _repeat(row: dict, n: int) -> dict:
    """One row as a batch of n without copying it (a broadcast view)."""
    return {k: _repeat(v, n) if isinstance(v, dict) else None if v is None else v.expand(n, *v.shape)
            for k, v in row.items()}


class PromptSampler:
    """Random training prompts, drawn with their own torch.Generator (checkpointed with the run)."""

    def __init__(self, prompts: list[str], seed: int = 0):
        self.prompts = prompts
        self.rng = torch.Generator().manual_seed(seed + 2)

    def batch(self, n: int) -> list[str]:
        idx = torch.randint(len(self.prompts), (n,), generator=self.rng)
        return [self.prompts[i] for i in idx.tolist()]
