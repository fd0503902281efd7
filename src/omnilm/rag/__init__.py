"""Retrieval-augmented answers: a BM25 index over passages (:mod:`omnilm.rag.index`), the prompt template that
puts the retrieved passages before a question (:mod:`omnilm.rag.prompt`), and chat records rewritten with
retrieved context for training and evaluation (:mod:`omnilm.rag.records`).
"""
