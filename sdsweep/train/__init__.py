"""Training one trial's adapter: set-up, the loop, objectives, checkpoints, meters, tracking."""
