"""Pseudo-labels: what the E-step writes and the M-step reads.

- :mod:`~discli.pseudo.cache`   the HDF5 cache of labelmaps, confidences and tag probabilities
- :mod:`~discli.pseudo.tags`    tag cleaning rules (``TagRule``), the tag gate, clean-tags tables
- :mod:`~discli.pseudo.stats`   pseudo-labels scored against true labelmaps (``dis score-cache``)
- :mod:`~discli.pseudo.export`  a cache as PNG labelmaps and a tags file a person can look at
"""
