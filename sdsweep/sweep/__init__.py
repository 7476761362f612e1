"""Before and around trials: preflight, pruning, resume, early stopping, the Hydra callback, the
memory estimate, and the trial itself (one cell of the matrix, start to end)."""
