"""Run diffusers' train_text_to_image_lora_sdxl.py with one sdsweep cell's adapter on the UNet
(`benchmarks/vs_reference.py --matched`), so that the per-cell script trains what that cell trains:

    SDSWEEP_MATCH='{"use_dora": true, "patterns": [".*attn[12][.](to_q|to_k|to_v|to_out[.]0)"]}' \
        python benchmarks/reference_shim.py PATH/train_text_to_image_lora_sdxl.py --rank 8 ...

The script builds its UNet adapter as `LoraConfig(target_modules=["to_k", "to_q", "to_v", "to_out.0"])`
and has no option for DoRA or other layers. This runs the script unchanged, with peft's LoraConfig
replaced, for the script only, by one that turns that config into the cell's: `use_dora` and the
targets group's patterns (full-matched against module names, as sdsweep matches them). Everything
else (data, VAE and text encoding every step, optimizer, saving) is the script's own.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

import peft

SCRIPT_UNET_TARGETS = {"to_k", "to_q", "to_v", "to_out.0"}


def matched_config_class(match: dict) -> type:
    """peft's LoraConfig, but a config made with the script's UNet targets becomes the cell's adapter."""

    class MatchedLoraConfig(peft.LoraConfig):
        def __post_init__(self):
            if set(self.target_modules or ()) == SCRIPT_UNET_TARGETS:  # the UNet's; text encoders' stay
                # peft full-matches a string against each module name, as sdsweep's patterns are matched
                self.target_modules = "|".join(f"(?:{p})" for p in match["patterns"])
                self.use_dora = bool(match["use_dora"])
            super().__post_init__()

    return MatchedLoraConfig


def main() -> None:
    peft.LoraConfig = matched_config_class(json.loads(os.environ["SDSWEEP_MATCH"]))
    sys.argv = sys.argv[1:]  # the script's own command line
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
