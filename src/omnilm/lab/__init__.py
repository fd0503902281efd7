"""Labs: small, reproducible studies built on omnilm's data, training and evaluation pieces."""
