"""Data: manifests, formats (VOC, SBD, captions), the synthetic benchmark, loading."""
