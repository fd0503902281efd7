"""Training: one loop for every stage (precision, accumulation, logging, checkpoints, distribution)."""
