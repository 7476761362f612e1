"""Predicted peak VRAM of full fine-tuning against LoRA, for the cells the studies compare.

    python benchmarks/full_vs_lora.py

The SD3-Medium study (conf/experiment/sd3_medium.yaml) reports "~80 % reduction in peak memory" with
LoRA and an int8 base against full fine-tuning, which "causes out-of-memory errors on a single 24 GB L4".
This prints sdsweep.sweep.estimate's prediction of torch.cuda.max_memory_allocated for those cells
(SD3-Medium's real architecture, 512 px, batch 1, gradient checkpointing, as the study runs them; with
and without T5-XXL) and for SDXL at 1024 px on the 16 GB budget of a T4: the whole trial's peak, the
training step's alone, and the reduction against the full fine-tune. No weights are read and nothing
runs on a GPU: the models are built on the meta device from their configs (sdsweep/model/architectures.py
offline), so it runs anywhere in about a minute.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CELLS = {
    "SD3-Medium (+experiment=sd3_medium)": (
        ["+experiment=sd3_medium", "adapter.rank=16"],
        {"full, bf16": ["adapter=full", "precision=bf16"], "LoRA r16, bf16": ["adapter=lora", "precision=bf16"],
         "LoRA r16, int8": ["adapter=lora", "precision=int8"]}),
    "SD3-Medium without T5 (model.drop_t5=true)": (
        ["+experiment=sd3_medium", "adapter.rank=16", "model.drop_t5=true"],
        {"full, bf16": ["adapter=full", "precision=bf16"], "LoRA r16, int8": ["adapter=lora", "precision=int8"]}),
    "SDXL 1024 px, fp16, checkpointing, AdamW8bit": (
        ["model=sdxl", "precision=fp16", "data.resolution=1024", "train.batch_size=1",
         "train.gradient_checkpointing=true", "optimizer=adamw8bit"],
        {"full": ["adapter=full"], "LoRA r16, attn": ["adapter=lora", "adapter.rank=16"]}),
}


def main() -> None:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from sdsweep.config.store import register_configs
    from sdsweep.sweep.estimate import estimate_peak

    register_configs()
    print(f"{'cell':<52} {'trial peak':>11} {'vs full':>8} {'step peak':>10} {'vs full':>8} {'+context':>9}  peak in")
    for title, (common, cells) in CELLS.items():
        print(title)
        full = full_step = None
        for name, overrides in cells.items():
            GlobalHydra.instance().clear()
            with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
                cfg = compose(config_name="config", overrides=[*common, *overrides])
            e = estimate_peak(cfg)
            step = e.phases["training step"]
            full, full_step = full or e.total_gb, full_step or step
            print(f"  {name:<50} {e.total_gb:>7.2f} GiB {_less(e.total_gb, full):>8} {step:>6.2f} GiB "
                  f"{_less(step, full_step):>8} {e.device_gb:>5.1f} GiB  {e.peak_phase}")


def _less(value: float, full: float) -> str:
    return f"-{100 * (1 - value / full):.0f} %" if value != full else ""


if __name__ == "__main__":
    main()
