"""Train the toy world's models from nothing, with fixed seeds, and write the shipped weights.

    python scripts/train_toy_world.py --out sdsweep/model/toy_weights            everything
    python scripts/train_toy_world.py --out DIR --parts unet measure             some parts again

Parts, in order (each later part reads the earlier parts' weights back from --out, in their
shipped fp16 form, so what is measured is what ships):
  vae      the AutoencoderKL on both styles (L1 + MSE + a small KL); its scaling_factor is
           1 / std of its latents over the UNet's training images, as SD's was chosen
  clip     the toy open_clip model, contrastive on both styles and on VAE reconstructions, each
           picture paired with a caption form true of it (toy_clip.true_specs); a text is a
           positive for every picture in the batch it is true of
  unet     the SDXL UNet on the VAE's latents of PLAIN pictures: epsilon prediction on SDXL's
           noise schedule, conditioned as sdsweep's trials condition it (both encoders'
           penultimate hidden states, the pooled text, time ids 64,64,0,0,64,64); captions get
           random unseen trailing words (", bold style") so that a prompt's unknown suffix -
           ", sdsweep style" among them - leaves its content alone; 10 % zeroed conditioning
           (what StableDiffusionXLPipeline's negative prompt is) and 5 % the empty caption, so
           classifier-free guidance works; min-SNR-5 weighting; the EMA of the weights ships
  measure  the toy CLIP's zero-shot accuracy on fresh renders; the base model's samples, drawn by
           StableDiffusionXLPipeline from a save_pretrained folder, classified by the toy CLIP
  lora     (only when named) a sanity check of the shipped weights: a peft LoRA on the UNet's
           attention, trained on the styled fine-tuning set as sdsweep's trials train (epsilon
           loss, AdamW, batch 2, hflip), for each --lora-runs setting; the fraction of samples the
           toy CLIP calls styled, and their colour/subject accuracy, before and after
Each prints its figures and merges them into --out/manifest.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdsweep.data import toy_world as world
from sdsweep.data.toy_world import ALL_COMBOS, STYLES, Item
from sdsweep.eval import toy_clip
from sdsweep.model import toy

PARTS = ("vae", "clip", "unet", "measure", "lora")
DEFAULT_PARTS = PARTS[:4]  # lora is a sanity check of the shipped weights, not part of them
TIME_IDS = (64, 64, 0, 0, 64, 64)  # original size, crop top-left, target size: a 64 px picture, uncropped
# trailing words the base model sees during training ("a red circle, bold style"): none of them is "sdsweep"
SUFFIX_WORDS = ("bold", "soft", "flat", "simple", "clean", "modern", "classic", "bright", "minimal", "toy",
                "retro", "digital", "vector", "kid", "cute", "plain")
SUFFIXES = ("", ", a picture", ", centered", ", high quality", *(f", {w} style" for w in SUFFIX_WORDS))
# seeds of the renders: disjoint ranges per use (the fine-tuning set uses 0..23)
VAE_SEEDS, UNET_SEEDS, CLIP_SEEDS, TEST_SEEDS = range(1000, 1024), range(2000, 2048), range(3000, 3024), range(9000, 9004)
MEASURE_SAMPLE_SEEDS = (0, 1, 2, 3)


def log(part: str, message: str) -> None:
    print(f"[{part}] {message}", flush=True)


def pixels(items_seeds: list[tuple[Item, int]]) -> torch.Tensor:
    """Renders as float (N, 3, 64, 64) in [-1, 1], the VAE's input range."""
    arrays = np.stack([world.render_array(item, seed) for item, seed in items_seeds])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1


def every_item(styles=STYLES) -> list[Item]:
    return [Item(c, s, st) for st in styles for c, s in ALL_COMBOS]


def update_manifest(out: Path, part: str, figures: dict) -> None:
    path = out / toy.MANIFEST
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest[part] = figures
    manifest["toy_world_version"] = world.TOY_WORLD_VERSION
    for f in out.glob("*.safetensors"):
        f.chmod(0o644)  # safetensors writes 0600: shipped files must be readable by everyone
    manifest["files"] = {f.name: toy.file_sha256(f) for f in sorted(out.glob("*.safetensors"))}
    import diffusers
    import open_clip
    import transformers

    manifest["trained_with"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                "transformers": transformers.__version__, "open_clip": open_clip.__version__,
                                "numpy": np.__version__, "python": platform.python_version()}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def cosine_lr(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


# --- the VAE ------------------------------------------------------------------------------------

def train_vae(out: Path, steps: int, batch: int, lr: float = 2e-3, kl_weight: float = 1e-6) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    data = pixels([(item, seed) for item in every_item() for seed in VAE_SEEDS])
    vae = toy.new_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, lr))
        x = data[torch.randint(0, len(data), (batch,))]
        x = torch.where(torch.rand(batch, 1, 1, 1) < 0.5, x.flip(-1), x)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(y, x) + F.mse_loss(y, x)
        loss = rec + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log("vae", f"step {step} rec {rec.item():.4f} kl {posterior.kl().mean().item():.1f}")
    # SD chose scaling_factor so that the scaled latents have unit std; the UNet trains on these
    vae.eval()
    with torch.no_grad():
        unet_images = pixels([(Item(c, s), seed) for c, s in ALL_COMBOS for seed in UNET_SEEDS[:8]])
        latents = torch.cat([vae.encode(x).latent_dist.sample() for x in unet_images.split(64)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    toy.save_weights(vae, out / "vae.safetensors")
    figures = {"steps": steps, "batch": batch, "lr": lr, "kl_weight": kl_weight, "scaling_factor": scaling,
               "latent_mean": float(latents.mean()), "psnr": vae_psnr(toy.load_weights(toy.new_vae(), out / "vae.safetensors")),
               "seconds": round(time.perf_counter() - start, 1)}
    log("vae", json.dumps(figures))
    return figures


@torch.no_grad()
def vae_psnr(vae) -> dict[str, float]:
    """PSNR (dB, on [0, 1] pixels) of reconstructions of fresh renders, per style."""
    result = {}
    for style in STYLES:
        x = pixels([(item, seed) for item in every_item((style,)) for seed in TEST_SEEDS])
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        mse = F.mse_loss((y + 1) / 2, (x + 1) / 2).item()
        result[style] = round(10 * math.log10(1 / mse), 2)
    return result


# --- the toy CLIP -------------------------------------------------------------------------------

def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> open_clip's input (OpenAI mean/std), what its preprocess makes of a PIL image."""
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def training_token_ids(tokenizer) -> list[int]:
    """Every token a toy CLIP training caption (or zero-shot prompt) contains, with start, end and pad."""
    texts = [spec.text for item in every_item() for spec in toy_clip.true_specs(item)]
    ids = tokenizer(sorted(set(texts)))
    return sorted(set(ids.flatten().tolist()))


def train_clip(out: Path, steps: int, batch: int, lr: float = 1e-3) -> dict:
    start = time.perf_counter()
    torch.manual_seed(1)
    cache = Path(tempfile.mkdtemp(prefix="toy-clip-"))
    model = toy_clip.new_toy_clip(cache)
    import open_clip

    tokenizer = open_clip.get_tokenizer(toy_clip.TOY_CLIP_NAME)
    items = [(item, seed) for item in every_item() for seed in CLIP_SEEDS]
    renders = pixels(items)
    vae = toy.trained_vae(out)
    with torch.no_grad():  # reconstructions look like decoded samples: blur, faint ringing
        recon = torch.cat([vae.decode(vae.encode(x).latent_dist.sample()).sample.clamp(-1, 1) for x in renders.split(64)])
    images = torch.cat([renders, recon])
    labels = items + items
    rng = np.random.RandomState(1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, lr))
        index = torch.from_numpy(rng.randint(0, len(images), batch))
        batch_items = [labels[i][0] for i in index.tolist()]
        specs = [toy_clip.true_specs(it)[rng.randint(0, 8)] for it in batch_items]
        x = images[index]
        x = torch.where(torch.rand(batch, 1, 1, 1) < 0.5, x.flip(-1), x)
        x = x + 0.03 * torch.rand(batch, 1, 1, 1) * torch.randn_like(x)
        image_emb = F.normalize(model.encode_image(clip_normalize(x)), dim=-1)
        text_emb = F.normalize(model.encode_text(tokenizer([s.text for s in specs])), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T
        # multi-positive InfoNCE: text j is a positive for every image it is true of
        positive = torch.tensor([[s.holds_for(it) for s in specs] for it in batch_items], dtype=torch.float32)
        loss = 0.5 * (soft_cross_entropy(logits, positive) + soft_cross_entropy(logits.T, positive.T))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log("clip", f"step {step} loss {loss.item():.4f} scale {model.logit_scale.exp().item():.1f}")
    toy_clip.save_toy_clip(model, out / "toy_clip.safetensors", training_token_ids(tokenizer))
    figures = {"steps": steps, "batch": batch, "lr": lr, "seconds": round(time.perf_counter() - start, 1)}
    log("clip", json.dumps(figures))
    return figures


def soft_cross_entropy(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    target = positive / positive.sum(dim=1, keepdim=True)
    return -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()


# --- the UNet -----------------------------------------------------------------------------------

@torch.no_grad()
def encode_captions(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (N, 77, 64), pooled (N, 32)) as sdsweep's conditioning.encode_text computes them for SDXL."""
    from sdsweep.model.tiny import clip_tokenizers

    encoders = toy.toy_text_encoders()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = clip_tokenizers(Path(tmp))
    hidden, pooled = [], []
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        output = encoder(ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled.append(output[0])
    return torch.cat(hidden, dim=-1), pooled[1]


def train_unet(out: Path, steps: int, batch: int, lr: float = 1e-3, ema_decay: float = 0.999) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.training_utils import compute_snr

    from sdsweep.model.tiny import sd_scheduler

    start = time.perf_counter()
    torch.manual_seed(2)
    vae = toy.trained_vae(out)
    combos = list(ALL_COMBOS)
    items = [(Item(c, s), seed) for c, s in combos for seed in UNET_SEEDS]
    combo_of = torch.tensor([combos.index((item.colour, item.subject)) for item, _ in items])
    with torch.no_grad():
        params = torch.cat([vae.encode(x).latent_dist.parameters for x in pixels(items).split(64)])
    captions = [world.caption(c, s, styled=False) + suffix for c, s in combos for suffix in SUFFIXES] + [""]
    hidden, pooled = encode_captions(captions)
    empty = len(captions) - 1
    scheduler = DDPMScheduler.from_config(sd_scheduler().config)
    unet = toy.new_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-4)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).expand(batch, -1)
    unet.train()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, lr, warmup=200))
        index = torch.randint(0, len(items), (batch,))
        latents = DiagonalGaussianDistribution(params[index]).sample() * vae.config.scaling_factor
        caption_index = combo_of[index] * len(SUFFIXES) + torch.randint(0, len(SUFFIXES), (batch,))
        drop = torch.rand(batch)
        caption_index = torch.where((drop >= 0.10) & (drop < 0.15), torch.tensor(empty), caption_index)
        keep = (drop >= 0.10).float()  # the first 10 %: zeros, StableDiffusionXLPipeline's unconditional input
        cond, cond_pooled = hidden[caption_index] * keep.view(-1, 1, 1), pooled[caption_index] * keep.view(-1, 1)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, cond,
                    added_cond_kwargs={"text_embeds": cond_pooled, "time_ids": time_ids}).sample
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1 - decay)
        if step % 250 == 0 or step == steps - 1:
            log("unet", f"step {step} loss {loss.item():.4f}")
    toy.save_weights(ema, out / "unet.safetensors")
    figures = {"steps": steps, "batch": batch, "lr": lr, "ema_decay": ema_decay, "snr_gamma": 5.0,
               "caption_dropout": {"zeros": 0.10, "empty_caption": 0.05}, "suffixes": list(SUFFIXES),
               "time_ids": list(TIME_IDS), "seconds": round(time.perf_counter() - start, 1)}
    log("unet", json.dumps(figures))
    return figures


# --- measuring ----------------------------------------------------------------------------------

def sample_prompts(pipe, prompts: list[str], seeds, steps: int, guidance: float) -> list:
    images = []
    for prompt in prompts:
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            images.append(pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
                               generator=generator).images[0])
    return images


def measure(out: Path, grid: bool) -> dict:
    from diffusers import StableDiffusionXLPipeline

    start = time.perf_counter()
    cache = Path(tempfile.mkdtemp(prefix="toy-measure-"))
    clip = toy_clip.load_toy_clip(cache, out / "toy_clip.safetensors")
    figures = {"clip_zero_shot": {}}
    for style in STYLES:
        truth = [item for item in every_item((style,)) for _ in TEST_SEEDS]
        renders = [world.render(item, seed) for item in every_item((style,)) for seed in TEST_SEEDS]
        figures["clip_zero_shot"][style] = toy_clip.accuracy(toy_clip.classify(*clip, renders), truth)
    log("measure", "toy CLIP on fresh renders: " + json.dumps(figures["clip_zero_shot"]))
    folder = toy.ensure_toy_model(cache, "sdxl", out)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    settings = [(s, g) for s in (4, 8, 12, 20) for g in (1.0, 2.0, 4.0, 7.0)] if grid else []
    if (toy.SAMPLING_STEPS, toy.GUIDANCE_SCALE) not in settings:
        settings.append((toy.SAMPLING_STEPS, toy.GUIDANCE_SCALE))
    sets = {"in_distribution": list(world.IN_DISTRIBUTION_PROMPTS), "held_out": list(world.HELD_OUT_PROMPTS)}
    sets["plain_captions"] = [p.removesuffix(world.STYLE_SUFFIX) for p in sets["in_distribution"] + sets["held_out"]]
    figures["base_samples"] = {}
    for steps, guidance in settings:
        row = {}
        for name, prompts in sets.items():
            truth = [world.parse_prompt(p.removesuffix(world.STYLE_SUFFIX)) for p in prompts for _ in MEASURE_SAMPLE_SEEDS]
            images = sample_prompts(pipe, prompts, MEASURE_SAMPLE_SEEDS, steps, guidance)
            row[name] = toy_clip.accuracy(toy_clip.classify(*clip, images), truth)
            if (steps, guidance) == (toy.SAMPLING_STEPS, toy.GUIDANCE_SCALE):
                save_grid(images, len(MEASURE_SAMPLE_SEEDS), cache / f"base_{name}.png")
        figures["base_samples"][f"steps={steps} guidance={guidance}"] = row
        log("measure", f"base samples, steps={steps} guidance={guidance}: {json.dumps(row)}")
    figures["sampling"] = {"steps": toy.SAMPLING_STEPS, "guidance_scale": toy.GUIDANCE_SCALE,
                           "seeds": list(MEASURE_SAMPLE_SEEDS)}
    figures["seconds"] = round(time.perf_counter() - start, 1)
    log("measure", f"grids of samples in {cache}; {figures['seconds']} s")
    return figures


# --- the LoRA sanity check ---------------------------------------------------------------------

def lora_patterns(targets: str) -> list[str]:
    """targets=attn|many's UNet patterns, read from the package's conf/targets/<targets>.yaml (what trials use)."""
    from importlib import resources

    from omegaconf import OmegaConf

    return list(OmegaConf.load(resources.files("sdsweep.conf") / "targets" / f"{targets}.yaml").patterns)


def lora_run(out: Path, clip, folder: Path, steps: int, lr: float, targets: str, rank: int) -> dict:
    """Fine-tune a LoRA on the styled set; the toy CLIP's verdict on samples every `steps // 4` steps."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from peft import LoraConfig

    from sdsweep.model.adapters import resolve_targets

    torch.manual_seed(3)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    unet.requires_grad_(False)
    names = resolve_targets(unet, lora_patterns(targets), "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=names))
    items = world.finetune_items()
    x = pixels(items)
    with torch.no_grad():
        params = torch.cat([vae.encode(torch.cat([x, x.flip(-1)])).latent_dist.parameters])
    hidden, pooled = encode_captions([item.caption for item, _ in items] * 2)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=1e-2)  # conf/optimizer/adamw.yaml
    time_ids = torch.tensor([TIME_IDS] * 2, dtype=torch.float32)
    prompts = list(world.IN_DISTRIBUTION_PROMPTS + world.HELD_OUT_PROMPTS)
    truth = [world.parse_prompt(p) for p in prompts for _ in MEASURE_SAMPLE_SEEDS]
    history = {}
    started = time.perf_counter()
    for step in range(steps + 1):
        if step % max(1, steps // 4) == 0 or step == steps:
            unet.eval()
            images = sample_prompts(pipe, prompts, MEASURE_SAMPLE_SEEDS, toy.SAMPLING_STEPS, toy.GUIDANCE_SCALE)
            history[step] = toy_clip.accuracy(toy_clip.classify(*clip, images), truth)
            log("lora", f"{targets} r{rank} lr {lr} step {step}: {json.dumps(history[step])}")
            unet.train()
        if step == steps:
            break
        index = torch.randint(0, len(params), (2,))
        latents = DiagonalGaussianDistribution(params[index]).sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (2,))
        pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden[index],
                    added_cond_kwargs={"text_embeds": pooled[index], "time_ids": time_ids}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
    return {"targets": targets, "rank": rank, "lr": lr, "steps": steps, "batch": 2,
            "train_seconds_with_sampling": round(time.perf_counter() - started, 1),
            "accuracy_by_step": history}  # style: the fraction the toy CLIP calls styled


def lora_check(out: Path, runs: list[str]) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="toy-lora-"))
    clip = toy_clip.load_toy_clip(cache, out / "toy_clip.safetensors")
    folder = toy.ensure_toy_model(cache, "sdxl", out)
    results = []
    for run in runs:  # "targets:rank:lr:steps", e.g. attn:8:1e-3:300
        targets, rank, lr, steps = run.split(":")
        results.append(lora_run(out, clip, folder, int(steps), float(lr), targets, int(rank)))
    return {"runs": results}


def save_grid(images: list, columns: int, path: Path) -> None:
    from PIL import Image

    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (64 * columns, 64 * rows), "white")
    for i, image in enumerate(images):
        grid.paste(image, (64 * (i % columns), 64 * (i // columns)))
    grid.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=toy.WEIGHTS_DIR)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS))
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--clip-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--lora-runs", nargs="+", default=["attn:8:1e-3:300", "attn:8:1e-4:300"],
                        help="lora part: TARGETS:RANK:LR:STEPS per run")
    parser.add_argument("--grid", action="store_true", help="measure a grid of sampling steps x guidance too")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: more than one is far slower on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    if "vae" in args.parts:
        update_manifest(args.out, "vae", train_vae(args.out, args.vae_steps, batch=16))
    if "clip" in args.parts:
        update_manifest(args.out, "clip", train_clip(args.out, args.clip_steps, batch=128))
    if "unet" in args.parts:
        update_manifest(args.out, "unet", train_unet(args.out, args.unet_steps, batch=64))
    if "measure" in args.parts:
        figures = measure(args.out, args.grid)
        chosen = f"steps={toy.SAMPLING_STEPS} guidance={toy.GUIDANCE_SCALE}"
        if args.grid:
            update_manifest(args.out, "sampling_grid", figures["base_samples"])
        figures["base_samples"] = figures["base_samples"][chosen]
        update_manifest(args.out, "measured", figures)
    if "lora" in args.parts:
        update_manifest(args.out, "lora_sanity", lora_check(args.out, args.lora_runs))
    print(f"done in {time.perf_counter() - total:.0f} s; weights in {args.out}", flush=True)


if __name__ == "__main__":
    main()
