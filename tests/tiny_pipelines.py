"""Tiny text-to-image and latent pipelines built in code (no hub): random weights, real diffusers classes.

The tokenizer is a character-level CLIP BPE (no merges) written locally; text encoders, VAE and denoisers
use the smallest shapes diffusers' own tests use, so a distillation step runs in about a second on a CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

LATENT = 8  # latent size; the VAE's two blocks make images of 16 x 16


def tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in bytes_to_unicode().values():
        vocab.setdefault(c, len(vocab))
    for c in bytes_to_unicode().values():
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def text_encoder(projection: bool = False, hidden: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=514, max_position_embeddings=16,
                         projection_dim=hidden, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def vae(latent_channels: int = 4, seed: int = 0, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=2 * LATENT, **extra).eval()


def _save(pipe, path: Path) -> Path:
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def safety_checker(seed: int = 0):
    """A tiny StableDiffusionSafetyChecker and its CLIPImageProcessor (32 x 32 crops). Its concept thresholds start at
    the weights' 1, above any cosine similarity, so it flags nothing and images pass through unchanged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1)
    cfg = CLIPConfig(text_config=dict(small, vocab_size=514, max_position_embeddings=16, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(small, image_size=32, patch_size=8), projection_dim=32)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return StableDiffusionSafetyChecker(cfg).eval(), processor


def sd_pipeline(path: Path, prediction_type: str = "epsilon", with_safety_checker: bool = False) -> Path:
    """A StableDiffusionPipeline folder: UNet2DConditionModel, AutoencoderKL, CLIP text model, DDPM schedule (and,
    ``with_safety_checker``, a tiny safety checker and its feature extractor)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=LATENT, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    checker, extractor = safety_checker() if with_safety_checker else (None, None)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae(), text_encoder=text_encoder(), tokenizer=tokenizer(),
                                   scheduler=scheduler, safety_checker=checker, feature_extractor=extractor,
                                   requires_safety_checker=with_safety_checker)
    return _save(pipe, path)


def sdxl_pipeline(path: Path) -> Path:
    """A StableDiffusionXLPipeline folder: two CLIP encoders (the second with projection), text-time embeddings."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=LATENT, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                                norm_num_groups=8)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae(), text_encoder=text_encoder(seed=1), tokenizer=tokenizer(),
                                     text_encoder_2=text_encoder(True, seed=2), tokenizer_2=tokenizer(),
                                     scheduler=scheduler)
    return _save(pipe, path)


def sd3_pipeline(path: Path) -> Path:
    """A StableDiffusion3Pipeline folder (flow matching): SD3Transformer2DModel, two CLIP encoders, no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=LATENT, patch_size=1, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
    encoders = dict(text_encoder=text_encoder(True, seed=1), tokenizer=tokenizer(),
                    text_encoder_2=text_encoder(True, seed=2), tokenizer_2=tokenizer(), text_encoder_3=None, tokenizer_3=None)
    return _save(StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                          vae=vae(shift_factor=0.0609, scaling_factor=1.5035), **encoders), path)


def t5_tokenizer():
    """A character-level T5 (Unigram) tokenizer built locally: no sentencepiece file, no hub."""
    from transformers import T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -2.0) for c in letters]
    return T5Tokenizer(vocab=vocab + [("\u2581" + c, -1.0) for c in letters], extra_ids=0)


def pixart_pipeline(path: Path) -> Path:
    """A PixArtAlphaPipeline folder: PixArtTransformer2DModel (learned sigma), a tiny T5 encoder, DDPM schedule."""
    from diffusers import DDPMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(sample_size=LATENT, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=32, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    text = T5EncoderModel(T5Config(vocab_size=75, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    return _save(PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=text, vae=vae(), transformer=transformer,
                                     scheduler=scheduler), path)


def dit_pipeline(path: Path) -> Path:
    """A DiTPipeline folder: class-conditional DiTTransformer2DModel (learned sigma), AutoencoderKL, DDPM."""
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(sample_size=LATENT, patch_size=2, in_channels=4, out_channels=8,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                        num_embeds_ada_norm=10, norm_num_groups=8)
    pipe = DiTPipeline(transformer=transformer, vae=vae(), scheduler=DDPMScheduler())
    return _save(pipe, path)


def caption_folder(path: Path, n: int = 8, size: int = 2 * LATENT) -> Path:
    """An image folder with captions in metadata.jsonl (the Hugging Face imagefolder layout)."""
    import json

    import numpy as np
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size + 4, size, 3), dtype=np.uint8)).save(path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"picture number {i}"})
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompts_file(path: Path, n: int = 6) -> Path:
    path.write_text("".join(f"a {c} shoe on a table\n" for c in ("red", "blue", "green", "black", "white", "tiny")[:n]))
    return path


SANA_LATENT = 8  # Sana's latent size here: not one of its resolution bins (16, 32, 64, 128), images of 32 x 32


def gemma_tokenizer():
    """A Gemma tokenizer built locally (no hub): characters with byte fallback, plus one token per word of Sana's
    complex human instruction (BPE merges that grow "\u2581w", "\u2581wo", ... to the word). The instruction goes
    before every prompt: character by character it is ~1,060 tokens and Gemma2's eager attention over them ~0.3 s
    per batch on one core; by words it is ~240."""
    import inspect
    import re

    from diffusers import SanaPipeline
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in ["\u2581"] + [chr(i) for i in range(33, 127)] + [f"<0x{b:02X}>" for b in range(256)]:
        vocab.setdefault(c, len(vocab))
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    merges = []
    for word in dict.fromkeys(re.findall(r"[A-Za-z]+", " ".join(instruction))):
        piece = "\u2581"
        for c in word:
            if piece + c not in vocab:
                merges.append((piece, c))
                vocab[piece + c] = len(vocab)
            piece += c
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)  # as Gemma's own: <bos> first


def gemma_encoder(vocab_size: int, hidden: int = 16, seed: int = 0):
    """A two-layer Gemma2 model (the decoder Sana reads its last hidden states from)."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager")
    return Gemma2Model(cfg).eval()


def dc_autoencoder(seed: int = 0):
    """A tiny AutoencoderDC (deep-compression autoencoder): three stages, images 4x the latent size, no shift."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                         encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                         encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                         encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                         downsample_block_type="conv", upsample_block_type="interpolate",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()


def sana_pipeline(path: Path, scheduler: str = "dpm") -> Path:
    """A SanaPipeline folder: SanaTransformer2DModel, AutoencoderDC, a tiny Gemma2 encoder, and the flow scheduler
    real Sana folders ship (DPMSolverMultistepScheduler with flow_prediction, flow sigmas, flow_shift 3) or ("euler")
    FlowMatchEulerDiscreteScheduler."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    tok = gemma_tokenizer()
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4,
                                         num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                         cross_attention_dim=8, caption_channels=16, sample_size=SANA_LATENT,
                                         patch_size=1)
    if scheduler == "dpm":
        sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = SanaPipeline(tokenizer=tok, text_encoder=gemma_encoder(len(tok)), vae=dc_autoencoder(),
                        transformer=transformer, scheduler=sched)
    return _save(pipe, path)


def flux_pipeline(path: Path, guidance_embeds: bool = True) -> Path:
    """A FluxPipeline folder: FluxTransformer2DModel on 2x2-packed latents (4 channels -> 16 packed), CLIP (pooled)
    and T5 encoders, FLUX.1's dynamically shifted flow schedule; ``guidance_embeds``: a guidance-distilled teacher
    (FLUX.1-dev style). The VAE's sample_size (16) is the image size fastdiff trains at (FLUX.1's VAE says 1024)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8))
    text = T5EncoderModel(T5Config(vocab_size=75, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    # FLUX.1-dev's scheduler config: the shift follows the image's token count (mu from calculate_shift).
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return _save(FluxPipeline(transformer=transformer, scheduler=scheduler, text_encoder=text_encoder(seed=1),
                              tokenizer=tokenizer(), text_encoder_2=text, tokenizer_2=t5_tokenizer(),
                              vae=vae(shift_factor=0.1159, scaling_factor=0.3611)), path)
