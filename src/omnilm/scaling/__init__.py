"""Scaling laws: Chinchilla's and Kaplan's forms, fitting them to runs, planning compute, IsoFLOP sweeps."""
