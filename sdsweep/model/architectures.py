"""The real architectures' configs (SDXL base, SD1.5, SD3 Medium), as plain dicts.

What `config.json` of each component of the hub models says, so that the memory estimator
(`sdsweep/estimate.py`) can size a real model offline, when the hub id is neither reachable
nor in the Hugging Face cache, and so that `benchmarks/estimate_vs_measured.py` can build a
random-weight SDXL on a GPU without downloading anything. Parameter counts these give
(checked in tests/test_estimate.py): SDXL UNet 2,567,463,684; CLIP-L 123,060,480;
OpenCLIP bigG text + projection 694,659,840; SDXL VAE 83,653,863.

Each family maps a component name (as in a diffusers pipeline folder) to (class name, config).
"""

from __future__ import annotations

from copy import deepcopy

_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
_CLIP = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
CLIP_L = dict(_CLIP, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(_CLIP, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32,
)
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
              use_cache=False, pad_token_id=0, eos_token_id=1)

FAMILIES: dict[str, dict[str, tuple[str, dict]]] = {
    "sdxl": {
        "unet": ("UNet2DConditionModel", SDXL_UNET),
        "vae": ("AutoencoderKL", dict(_VAE, sample_size=1024, scaling_factor=0.13025)),
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_BIGG),
    },
    "sd15": {
        "unet": ("UNet2DConditionModel", SD15_UNET),
        "vae": ("AutoencoderKL", dict(_VAE, sample_size=512, scaling_factor=0.18215)),
        "text_encoder": ("CLIPTextModel", CLIP_L),
    },
    "sd3": {
        "transformer": ("SD3Transformer2DModel", SD3_MEDIUM_TRANSFORMER),
        "vae": ("AutoencoderKL", dict(_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305,
                                      shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)),
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_BIGG),
        "text_encoder_3": ("T5EncoderModel", T5_XXL),
    },
}

# hub ids whose architecture is one of the above (fine-tunes of them share it too, but are not listed)
KNOWN_HUB_IDS = {
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-3-medium-diffusers": "sd3",
}


def family_components(family: str) -> dict[str, tuple[str, dict]]:
    """{component: (class name, config dict)} of the reference model of `family` (a copy)."""
    return deepcopy(FAMILIES[family])


def instantiate(class_name: str, config: dict):
    """A module of `class_name` (a diffusers or transformers class) built from `config`, on the
    current default device: wrap in `torch.device("meta")` for a weightless one."""
    import diffusers
    import transformers

    if hasattr(diffusers, class_name):
        return getattr(diffusers, class_name).from_config(config)
    cls = getattr(transformers, class_name)
    config_cls = transformers.T5Config if class_name.startswith("T5") else transformers.CLIPTextConfig
    return cls(config_cls(**config))
