"""Judging a trial: sampling (validation images too), the scorer and its metrics, the base model's
reference images. `python -m sdsweep.eval TRIAL_DIR` re-scores a finished trial."""
