"""Synthetic corpora generated offline: biographies (facts to learn) and arithmetic (answers to check)."""
