"""Tiny models of the real architectures, built in code with random weights.

They are saved as ordinary diffusers pipeline folders (`save_pretrained`) and then loaded
by `models.load_components` through exactly the `from_pretrained` calls that load SDXL,
SD1.5 or SD3 for a user, so the tests cover the real loading path without a network.

The CLIP tokenizers are real CLIP BPE tokenizers: the vocabulary and merges come from the
`bpe_simple_vocab_16e6.txt.gz` that ships inside open_clip_torch (the file OpenAI's CLIP
tokenizer is built from), so captions are tokenized exactly as SDXL's tokenizers would.
SD3's T5 tokenizer is a small unigram vocabulary of our own (words, then single characters,
so any caption tokenizes) in the same T5Tokenizer class the real one loads as.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

TINY_VERSION = 1  # bump when an architecture below changes, so cached folders are rebuilt
TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8
T5_DIM = 64  # SD3's joint attention width: the T5 width, >= the two CLIP widths together

_T5_WORDS = (
    "a an the of on in at by to with and or is are for from this that photo picture painting drawing "
    "illustration portrait person people man woman girl boy child face eyes hair hand house home building "
    "lake river sea sky cloud sun moon star tree forest flower grass mountain road city street car cat dog "
    "bird horse circle square triangle shape red blue green yellow orange purple pink black white grey brown "
    "dotted paper background style art anime cartoon sitting standing holding wearing looking big small "
    "dark light bright old young sdsweep"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (as in open_clip.tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (49408 tokens) and BPE merges, from open_clip's packaged file."""
    import importlib.util

    # the package's folder without importing it (open_clip imports timm and torchvision: 3 s)
    path = Path(importlib.util.find_spec("open_clip").origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def save_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write a transformers CLIPTokenizer folder built from the real CLIP BPE files."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
        tok.save_pretrained(folder)


def _text_encoder(seed: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_PROJECTION,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def _vae(seed: int, **family_config):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four levels like the real VAE, so latents are 1/8 of the image side as in SD/SDXL/SD3.
    config = dict(latent_channels=4, scaling_factor=0.13025) | family_config
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
        **config,
    )


def _unet(seed: int, family: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    if family == "sdxl":
        # SDXL's conditioning: two text encoders' hidden states concatenated, plus the
        # "text_time" added embedding of the pooled text and six micro-conditioning ids.
        return UNet2DConditionModel(
            **common,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=2 * TEXT_HIDDEN,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_PROJECTION,
        )
    return UNet2DConditionModel(**common, attention_head_dim=8, cross_attention_dim=TEXT_HIDDEN)


def save_t5_tokenizer(folder: Path) -> None:
    """A tiny T5 (unigram) tokenizer: common words, then single characters as the fallback."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.;:!?'\"-()"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -5.0) for w in _T5_WORDS]
    vocab += [(c, -10.0) for c in chars] + [("\u2581" + c, -10.0) for c in chars]
    T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512).save_pretrained(folder)


def _t5_encoder(seed: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    # T5 v1.1 (gated-GELU), the variant SD3's T5-XXL is
    config = T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      use_cache=False, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config)


def _sd3_vae(seed: int):
    # SD3's VAE: 16 latent channels, a shift as well as a scale, no quant convolutions
    return _vae(seed, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False)


def _sd3_transformer(seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_DIM,
        caption_projection_dim=32,  # = heads x head_dim, as in SD3
        pooled_projection_dim=2 * TEXT_PROJECTION,  # CLIP-L and CLIP-G pooled, concatenated
        pos_embed_max_size=16,  # up to 16x16 patches: 256 px with buckets
    )


def _sd3_pipeline(tmp: Path, seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5Tokenizer

    tokenizer, tokenizer_2 = clip_tokenizers(tmp)
    save_t5_tokenizer(tmp / "tok3")
    tokenizer_3 = T5Tokenizer.from_pretrained(tmp / "tok3")
    return StableDiffusion3Pipeline(
        transformer=_sd3_transformer(seed + 3),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD3 Medium's
        vae=_sd3_vae(seed),
        text_encoder=_text_encoder(seed + 1, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(seed + 2, with_projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(seed + 4, len(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )


def sd_scheduler():
    from diffusers import EulerDiscreteScheduler

    # SDXL's and SD1.5's training noise schedule ("scaled_linear", epsilon prediction)
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def clip_tokenizers(tmp: Path) -> tuple:
    """The CLIP-L and CLIP-G tokenizers (SD1.5 uses the first; SDXL and SD3 both), built in `tmp` from
    the real BPE vocabulary. CLIP-G pads with "!", as SDXL's and SD3's second tokenizer does."""
    from transformers import CLIPTokenizer

    save_clip_tokenizer(tmp / "tok")
    save_clip_tokenizer(tmp / "tok2", pad_token="!")
    return CLIPTokenizer.from_pretrained(tmp / "tok"), CLIPTokenizer.from_pretrained(tmp / "tok2")


def sdxl_pipeline(tmp: Path, **modules):
    """An SDXL pipeline over `modules` (vae, text_encoder, text_encoder_2, unet) with SDXL's two CLIP
    tokenizers (built in `tmp`) and its training noise schedule."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = clip_tokenizers(tmp)
    return StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=sd_scheduler(),
                                     **modules)


def build_tiny_pipeline(folder: Path, family: str, seed: int = 0) -> None:
    """Build a tiny `family` pipeline with random weights and `save_pretrained` it."""
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        if family == "sdxl":
            pipe = sdxl_pipeline(Path(tmp), vae=_vae(seed), text_encoder=_text_encoder(seed + 1, with_projection=False),
                                 text_encoder_2=_text_encoder(seed + 2, with_projection=True),
                                 unet=_unet(seed + 3, "sdxl"))
        elif family == "sd3":
            pipe = _sd3_pipeline(Path(tmp), seed)
        elif family == "sd15":
            pipe = StableDiffusionPipeline(
                vae=_vae(seed),
                text_encoder=_text_encoder(seed + 1, with_projection=False),
                tokenizer=clip_tokenizers(Path(tmp))[0],
                unet=_unet(seed + 3, "sd15"),
                scheduler=sd_scheduler(),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            raise ValueError(f"no tiny model for family {family!r}")
        pipe.save_pretrained(folder)


def tiny_folder(cache_dir: str | os.PathLike, family: str, seed: int = 0) -> Path:
    """Where `ensure_tiny_model` builds the tiny `family` model (built or not)."""
    return Path(cache_dir).expanduser() / f"tiny-{family}-v{TINY_VERSION}-seed{seed}"


def ensure_tiny_model(cache_dir: str | os.PathLike, family: str, seed: int = 0) -> Path:
    """Return the folder of the tiny `family` model, building it once (atomically) if needed."""
    folder = tiny_folder(cache_dir, family, seed)
    if (folder / "model_index.json").exists():
        return folder
    from sdsweep.io import atomic_dir_if_absent

    # another trial building it at the same time keeps theirs; the folder follows the umask
    with atomic_dir_if_absent(folder) as tmp:
        build_tiny_pipeline(tmp, family, seed)
    return folder
