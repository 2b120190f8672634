"""dis: semi-supervised semantic segmentation by deep dual learning (Luo et al., ICCV 2017).

The library is importable on its own; the `dis` command line (``discli.cli``) is a thin layer
over it. Start with :func:`discli.model.net.build_model` and :func:`discli.infer.loop.infer`.
"""

__version__ = "0.1.0"
