"""Inference: gradient descent on the features (u1, v1) with frozen weights, and everything that
runs it on images.

- :mod:`~discli.infer.settings`    ``InferenceConfig``: steps, step size, method, ``parse_steps``
- :mod:`~discli.infer.loop`        ``infer_steps``: the t steps (autograd or low-rank)
- :mod:`~discli.infer.lowrank`     the closed-form low-rank step
- :mod:`~discli.infer.compiled`    the low-rank step through ``torch.compile`` (opt-in)
- :mod:`~discli.infer.checkpoint`  checkpoint files: a model and its inference settings
- :mod:`~discli.infer.runtime`     batching, sharding, views (scales, flip), upsampling
- :mod:`~discli.infer.predict`     ``dis infer``: inputs -> labelmaps, overlays, probabilities
- :mod:`~discli.infer.inputs`, :mod:`~discli.infer.probs`, :mod:`~discli.infer.provenance`,
  :mod:`~discli.infer.visual`  what ``dis infer`` reads and writes
"""
