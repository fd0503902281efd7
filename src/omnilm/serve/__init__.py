"""Serving: a continuous-batching generation engine."""
