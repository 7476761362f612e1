"""The base model: loading a family, tiny models built in code, reference architectures, adapters
(peft), the base kept loaded between trials, and text conditioning."""
