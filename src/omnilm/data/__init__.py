"""Data: reading raw inputs, cleaning and dedup, synthetic corpora, tokenised shards and the batch loader."""
