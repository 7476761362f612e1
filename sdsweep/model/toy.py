"""The toy base model: the tiny SDXL architecture with weights trained on the toy world.

Unlike tiny.py's random models, this one draws what it is asked for: "a red circle" gives a red
circle on a plain background (sdsweep/data/toy_world.py is its world). The weights ship in
toy_weights/ (written by scripts/train_toy_world.py, described by toy_weights/manifest.json) and
become an ordinary diffusers folder through `save_pretrained`, so every later load is the same
`from_pretrained` that loads SDXL.

What ships and what is regenerated:
  unet.safetensors, vae.safetensors   trained weights, fp16 (upcast to fp32 when loaded)
  the two CLIP text encoders          frozen, never trained: every tensor is drawn from numpy's
                                      legacy RandomState (stable across numpy versions, unlike a
                                      torch.manual_seed init across torch versions), keyed by the
                                      tensor's name, so nothing of them needs to ship
  the tokenizers, the scheduler       tiny.py's: the real CLIP BPE vocabulary, SDXL's noise schedule
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

WEIGHTS_DIR = Path(__file__).with_name("toy_weights")
MANIFEST = "manifest.json"
TEXT_ENCODER_SEEDS = (101, 102)  # CLIP-L's and CLIP-G's stand-ins (numpy RandomState seeds)
TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8
# the resolution and sampling settings the weights were trained and measured for (manifest.json
# repeats the sampling ones with the accuracies measured at them)
RESOLUTION = 64
SAMPLING_STEPS = 8
GUIDANCE_SCALE = 2.0


# --- architectures ------------------------------------------------------------------------------

def text_encoder_config():
    from transformers import CLIPTextConfig

    # tiny.py's text encoders: CLIP's real vocabulary (49408) and context (77), small towers
    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_PROJECTION,
                          hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def vae_config(scaling_factor: float = 1.0) -> dict:
    # Four levels like the real VAE (latents are 1/8 of the side), twice tiny.py's widths: its
    # (8, 16, 16, 16) cannot reconstruct 3-pixel outlines and dots at 64 px
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                norm_num_groups=8, latent_channels=4, sample_size=RESOLUTION, scaling_factor=scaling_factor)


def unet_config() -> dict:
    # tiny.py's SDXL UNet: two CLIP encoders' hidden states concatenated for cross-attention, the
    # "text_time" added embedding of the pooled text and the six micro-conditioning ids
    return dict(sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=(2, 4),
                use_linear_projection=True, transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TEXT_HIDDEN,
                addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
                projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_PROJECTION)


def new_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**vae_config(scaling_factor))


def new_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config())


# --- deterministic text encoders ---------------------------------------------------------------

def _numpy_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The value of parameter `name`: a pure function of (name, shape, seed) through numpy's
    legacy RandomState. Embeddings N(0, 1) (tokens) and N(0, 0.1) (positions): hidden states of
    about unit scale, as a real CLIP's; linear weights N(0, 1/fan_in); norms 1; biases 0."""
    if name.endswith("bias"):
        return torch.zeros(shape)
    if "layer_norm" in name:
        return torch.ones(shape)
    rng = np.random.RandomState([seed, zlib.crc32(name.encode())])
    if "embedding" in name:
        std = 0.1 if "position" in name else 1.0
    else:
        std = 1.0 / np.sqrt(shape[1])
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * np.float32(std))


def numpy_init_(module: torch.nn.Module, seed: int, key_prefix: str = "") -> torch.nn.Module:
    """Overwrite every parameter of `module` with `_numpy_tensor` values (buffers are left alone).

    A tensor's key is its name inside the text transformer with `key_prefix` in front: transformers
    names the same tensor "text_model.x" in one version and "x" in another, and the key must not
    change with it (the first encoder's keys have no prefix, the second's "text_model.": the names
    of transformers 5.23, with which the shipped UNet was trained)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            key = name if name.startswith("text_projection") else key_prefix + name.removeprefix("text_model.")
            param.copy_(_numpy_tensor(key, tuple(param.shape), seed))
    return module


def toy_text_encoders() -> tuple[torch.nn.Module, torch.nn.Module]:
    """SDXL's two text encoders (CLIPTextModel, CLIPTextModelWithProjection), frozen, bit-exact."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    first = numpy_init_(CLIPTextModel(text_encoder_config()), TEXT_ENCODER_SEEDS[0])
    second = numpy_init_(CLIPTextModelWithProjection(text_encoder_config()), TEXT_ENCODER_SEEDS[1], "text_model.")
    return first.eval().requires_grad_(False), second.eval().requires_grad_(False)


# --- the shipped weights ------------------------------------------------------------------------

def read_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict:
    return json.loads((Path(weights_dir) / MANIFEST).read_text())


def weights_digest(weights_dir: Path = WEIGHTS_DIR) -> str:
    """A short hash of the manifest (which holds every weights file's sha256): names the built folder."""
    return hashlib.sha256((Path(weights_dir) / MANIFEST).read_bytes()).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """A module's state dict as fp16 safetensors (the training script's side of `load_weights`)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def load_weights(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load fp16 safetensors into `module` (fp32), every key required on both sides."""
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(path)).items()}
    module.load_state_dict(state, strict=True)
    return module


def trained_vae(weights_dir: Path = WEIGHTS_DIR):
    scaling = read_manifest(weights_dir)["vae"]["scaling_factor"]
    return load_weights(new_vae(scaling), Path(weights_dir) / "vae.safetensors")


def trained_unet(weights_dir: Path = WEIGHTS_DIR):
    return load_weights(new_unet(), Path(weights_dir) / "unet.safetensors")


# --- the diffusers folder -----------------------------------------------------------------------

def build_toy_pipeline(folder: Path, family: str = "sdxl", weights_dir: Path = WEIGHTS_DIR) -> None:
    """The toy `family` pipeline with the shipped weights, `save_pretrained` into `folder`."""
    from sdsweep.model.tiny import sdxl_pipeline

    if family != "sdxl":
        raise ValueError(f"no toy model for family {family!r}: only the tiny SDXL is trained on the toy world")
    text_encoder, text_encoder_2 = toy_text_encoders()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = sdxl_pipeline(Path(tmp), vae=trained_vae(weights_dir), text_encoder=text_encoder,
                             text_encoder_2=text_encoder_2, unet=trained_unet(weights_dir))
        pipe.save_pretrained(folder)


def toy_folder(cache_dir: str | os.PathLike, family: str = "sdxl", weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Where `ensure_toy_model` builds the toy `family` model (built or not)."""
    return Path(cache_dir).expanduser() / f"toy-{family}-{weights_digest(weights_dir)}"


def ensure_toy_model(cache_dir: str | os.PathLike, family: str = "sdxl", weights_dir: Path = WEIGHTS_DIR) -> Path:
    """The folder of the toy `family` model under `cache_dir`, built once (atomically) from the shipped
    weights; its name carries the manifest's hash, so new weights build a new folder."""
    from sdsweep.io import atomic_dir_if_absent

    folder = toy_folder(cache_dir, family, weights_dir)
    if (folder / "model_index.json").exists():
        return folder
    # another trial building it at the same time keeps theirs; the folder follows the umask
    with atomic_dir_if_absent(folder) as tmp:
        build_toy_pipeline(tmp, family, Path(weights_dir))
    return folder
