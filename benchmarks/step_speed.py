"""SDXL LoRA training steps: FLOPs, it/s, peak VRAM and model-FLOPs utilisation.

    python benchmarks/step_speed.py                  # 512 and 1024 px, checkpointing off and on
    python benchmarks/step_speed.py --cap-gb 16      # under a T4's 16 GB (default)
    python benchmarks/step_speed.py --peak-tflops 65 # the GPU's dense half-precision peak, if not known
    python benchmarks/step_speed.py --compile        # the same with train.compile=true (inductor)

FLOPs of one step are counted by torch's FlopCounterMode on the meta device (no weights, no GPU):
forward and backward of SDXL's real UNet with a LoRA adapter, recomputation included when
gradient checkpointing is on, and what the VAE and text encoders would add to each step without
the feature cache (as in diffusers' train_text_to_image_lora_sdxl.py / DreamBooth-LoRA scripts). On a CUDA GPU the steps then run for real (benchmarks/sdxl_random.py,
placed as the trainer places them) under `torch.cuda.set_per_process_memory_fraction(cap)`, and
MFU = FLOPs per step x steps per second / the GPU's peak. Without CUDA: FLOPs only.
"""

from __future__ import annotations

import argparse
import time

import torch
from sdxl_random import SdxlTrainer, cap_memory, compose_cfg

PEAK_TFLOPS = {"T4": 65, "A10": 125, "L4": 121, "A100": 312, "H100": 989, "H200": 989, "4090": 165}


def step_flops(cfg) -> tuple[float, float, dict[str, float]]:
    """(forward, whole step, the whole step's FLOPs by kind of op) of the UNet with its adapter, counted
    on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdsweep.model import adapters
    from sdsweep.model.architectures import family_components, instantiate

    cls, config = family_components("sdxl")["unet"]
    with torch.device("meta"):
        unet = instantiate(cls, config).requires_grad_(False)
    adapters.attach(unet, cfg.adapter, list(cfg.targets.patterns), "unet")
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    side, b = cfg.data.resolution // 8, cfg.train.batch_size
    args = (torch.randn(b, 4, side, side, device="meta"), torch.zeros(b, device="meta"),
            torch.randn(b, 77, 2048, device="meta"))
    added = {"text_embeds": torch.randn(b, 1280, device="meta"), "time_ids": torch.randn(b, 6, device="meta")}
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            unet(*args, added_cond_kwargs=added)
    with FlopCounterMode(display=False) as whole:
        unet(*args, added_cond_kwargs=added).sample.float().pow(2).mean().backward()
    by_op: dict[str, float] = {}
    for op, flops in whole.get_flop_counts()["Global"].items():
        kind = op_kind(str(op))
        by_op[kind] = by_op.get(kind, 0) + flops
    return forward.get_total_flops(), whole.get_total_flops(), by_op


def op_kind(op: str) -> str:
    """Convolutions (and their backward); mm/addmm: the linear layers (projections, feed-forward, LoRA);
    bmm and SDPA: attention's q.k and weights.v (on the meta device SDPA runs as its math decomposition)."""
    if "convolution" in op:
        return "convolutions"
    name = op.split(".")[-1]
    if "scaled_dot_product" in op or name in ("bmm", "baddbmm"):
        return "attention (q.k, weights.v)"
    if name in ("mm", "addmm"):
        return "linear layers"
    return op


def encoder_flops(resolution: int, batch: int) -> float:
    """FLOPs a step spends outside the UNet when nothing is cached, as diffusers' SDXL LoRA script
    runs it: the VAE encodes the batch and both text encoders encode its captions (77 tokens)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdsweep.model.architectures import family_components, instantiate

    with torch.device("meta"):
        parts = {name: instantiate(cls, config) for name, (cls, config) in family_components("sdxl").items()
                 if name != "unet"}
    ids = torch.zeros(batch, 77, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        parts["vae"].encode(torch.randn(batch, 3, resolution, resolution, device="meta"))
        parts["text_encoder"](ids, output_hidden_states=True)
        parts["text_encoder_2"](ids, output_hidden_states=True)
    return counter.get_total_flops()


def gpu_peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def measure(cfg, steps: int, warmup: int) -> tuple[float, float]:
    """(steps per second, peak GiB allocated) of real training steps on the GPU."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = SdxlTrainer(cfg, torch.device("cuda"))
    for _ in range(warmup):
        trainer.step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    torch.cuda.synchronize()
    rate = steps / (time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del trainer
    torch.cuda.empty_cache()
    return rate, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="*", default=[512, 1024])
    parser.add_argument("--precision", default="fp16" if not torch.cuda.is_available()
                        or torch.cuda.get_device_capability() < (8, 0) else "bf16")
    parser.add_argument("--optimizer", default="adamw8bit")
    parser.add_argument("--cap-gb", type=float, default=16.0, help="GPU memory cap (a T4: 16)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--compile", action="store_true", help="train.compile=true: torch.compile the UNet")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    peak = None
    if cuda:
        peak = gpu_peak_tflops(args.peak_tflops)
        print(f"{cap_memory(args.cap_gb)}, peak {peak} TFLOPS")
    else:
        print("no CUDA GPU here: FLOPs only")
    print(f"{'res':>5} {'ckpt':>5} {'fwd TFLOP':>9} {'step TFLOP':>10} {'uncached +':>10}"
          + (f" {'it/s':>6} {'s/step':>7} {'peak GiB':>8} {'MFU':>6}" if cuda else ""))
    shares: dict[int, dict[str, float]] = {}
    for res in args.resolutions:
        encoders = encoder_flops(res, 1)
        for ckpt in (False, True):
            cfg = compose_cfg(f"precision={args.precision}", f"optimizer={args.optimizer}", f"data.resolution={res}",
                              f"train.gradient_checkpointing={ckpt}", f"train.compile={args.compile}")
            forward, step, by_op = step_flops(cfg)
            if not ckpt:
                shares[res] = {kind: flops / step for kind, flops in by_op.items()}
            # "uncached +": what running the VAE and text encoders every step would add to it
            line = f"{res:>5} {str(ckpt):>5} {forward / 1e12:>9.2f} {step / 1e12:>10.2f} {encoders / step:>10.0%}"
            if cuda:
                try:
                    rate, gib = measure(cfg, args.steps, args.warmup)
                    mfu = f"{step * rate / (peak * 1e12):6.1%}" if peak else "     ?"
                    line += f" {rate:>6.2f} {1 / rate:>7.2f} {gib:>8.2f} {mfu}"
                except torch.cuda.OutOfMemoryError:
                    line += f"  out of memory under {args.cap_gb:g} GiB"
                    torch.cuda.empty_cache()
            print(line, flush=True)
    for res, kinds in shares.items():
        print(f"{res} px, a step's FLOPs by kind of op (forward and backward, no checkpointing): "
              + ", ".join(f"{kind} {share:.0%}" for kind, share in sorted(kinds.items(), key=lambda kv: -kv[1])))
    print("uncached +: the FLOPs of the VAE encoding and both text encoders, which diffusers' SDXL LoRA script "
          "runs every step and sdsweep's feature cache runs once per image, as a share of the UNet step")
    print(f"SDXL UNet (2.57 B parameters, random weights), LoRA rank 16 on attention, batch 1, "
          f"{args.precision}, {args.optimizer}" + (", torch.compile (warm-up steps include compiling)" if args.compile else ""))


if __name__ == "__main__":
    main()
