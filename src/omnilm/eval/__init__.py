"""Evaluation: losses, bits per byte, attribute accuracy, plots and reports."""
