"""Knowledge-acquisition lab: how a language model learns facts from synthetic biographies.

Analysis: ``baseline`` gives the attribute loss of a predictor that knows only the marginal distribution of
values, ``phases`` finds the loss plateau at that baseline and the step where knowledge emerges, ``scaling``
fits how the plateau length grows with the number of people.

Experiments: ``config`` (settings and model scales), ``experiment`` (corpora, probes, training runs),
``plots`` and ``report``; one module per study: ``dynamics``, ``plateau_scaling``, ``imbalance``,
``forgetting``, ``hallucination``, ``patching`` (run them with ``omnilm lab knowledge --study NAME``).
"""
