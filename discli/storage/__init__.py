"""The storage layer: every file dis writes goes through here.

- :mod:`discli.storage.atomic`: the one atomic writer (temporary file beside the target, fsync,
  rename), the clean-up of temporaries torn by a kill, and output-folder creation. Free
  of torch and h5py, so that the data commands start fast.
- :mod:`discli.storage.parts`: the crash-safe, rank-aware part-file writer for HDF5 files of
  per-image entries (``done_ids``, merge), over which the pseudo-label cache
  (:mod:`discli.pseudo.cache`) and the ``--probs`` file (:mod:`discli.infer.probs`) are thin
  schemas.
"""

from discli.storage.atomic import (atomic_path, atomic_write, make_folder,  # noqa: F401
                                   remove_stale_temps, same_bytes, temp_path)

__all__ = ["atomic_path", "atomic_write", "make_folder", "remove_stale_temps", "same_bytes",
           "temp_path"]
