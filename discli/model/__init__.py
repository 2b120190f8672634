"""The network: backbones (a registry of factories), DISNet with its three subnets, the losses,
and the lookup of shipped and ImageNet weights.

- :mod:`~discli.model.backbones`  backbone registry (entry-point group ``dis.backbones``)
- :mod:`~discli.model.net`        ``DISNet``: u1, v1 -> labelmap u3, reconstruction z3, tags v3
- :mod:`~discli.model.losses`     the losses of Eq. 1
- :mod:`~discli.model.weights`    shipped weights of the small backbones (names, files)
- :mod:`~discli.model.imagenet`   torchvision's ImageNet weights, offline-aware
"""
