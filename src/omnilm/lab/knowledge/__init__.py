"""Knowledge-acquisition lab: how a language model learns facts from synthetic biographies.

``baseline`` gives the attribute loss of a predictor that knows only the marginal distribution of values,
``phases`` finds the loss plateau at that baseline and the step where knowledge emerges, and ``scaling``
fits how the plateau length grows with the number of people.
"""
