"""sdsweep: find, by measurement, which way of fine-tuning Stable Diffusion works best."""

__version__ = "0.1.0"
