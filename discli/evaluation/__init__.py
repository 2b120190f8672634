"""Scores: confusion matrices and mIoU, tag precision/recall/F1, ``dis evaluate`` and its plots.

- :mod:`~discli.evaluation.metrics`   confusion matrices, IoU, tag scores (all-reduced under DDP)
- :mod:`~discli.evaluation.evaluate`  a model on a manifest at every t_ts
- :mod:`~discli.evaluation.plots`     curves and confusion-matrix figures
"""
