"""Training objectives: each turns a batch into a loss; the trainer does the rest."""
