"""sdsweep: find, by measurement, which way of fine-tuning Stable Diffusion works best."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns on every import, on CPUs with AVX512-BF16, that it could not
# download an optional 4-bit CPU kernel from the hub: sdsweep never runs 4-bit layers on a CPU
# (precision=nf4 needs CUDA and is pruned elsewhere), so the line only alarms users of a CPU run
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
