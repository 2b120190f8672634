"""Data: manifests, formats (VOC, SBD, captions, labelmaps), preparation, loading.

Modules (no CLI code here; ``plugins/prepare_*.py`` and ``plugins/synth.py`` are thin wrappers):

- :mod:`~discli.data.manifest`   the JSON Lines manifest format (Record, Manifest, read/write)
- :mod:`~discli.data.images`     defensive image decoding (read_image, probe_image)
- :mod:`~discli.data.labelmap`   labelmaps: void = 255, the VOC colour map, the formats registry
- :mod:`~discli.data.voc`        VOC classes and the VOCdevkit layout
- :mod:`~discli.data.sbd`        SBD "VOC augment" ``cls/*.mat`` labelmaps
- :mod:`~discli.data.prepare`    ``dis prepare-voc``: VOCdevkit (+ SBD) -> manifests
- :mod:`~discli.data.captions`   caption -> tags with the shipped lexicon
- :mod:`~discli.data.idw`        ``dis prepare-idw``: captioned images -> a tagged manifest
- :mod:`~discli.data.dataset`    SegDataset, transforms, collate (the only module needing torch)
"""
