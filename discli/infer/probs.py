"""The ``--probs`` file of ``dis infer``: a schema over :mod:`discli.storage.parts`.

HDF5: root attrs ``format="dis-probs"``, ``format_version``, ``classes`` (JSON), ``steps``,
``checkpoint_hash``, ``inference`` (JSON); ``/entries/<key>`` per image (key = id with "/" as
"%2F") holds ``probs`` float16 (K, H, W) at the image's resolution, ``tag_probs`` float32 (K,),
attrs ``id`` and ``input`` (hash of the input file: an entry of another image under the same id
is redone).

While a run is in progress, entries go to small part files (``.<name>.parts/part-NNNNNN.h5``;
rank r > 0 of a torchrun job: ``part-r<r>-NNNNNN.h5``), each written under a temporary name and
renamed when complete (every :data:`PROBS_PART_IMAGES` images or :data:`PROBS_PART_SECONDS`
seconds); when the run ends (also on an error or ^C) the entries of the existing file and of the
parts are merged into a new file that replaces it (temp + rename). So the file is never torn,
and a run killed with SIGKILL loses at most the part being written: a re-run takes the finished
parts as done.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from discli.errors import BadInputError, IncompatibleError, first_line
from discli.storage.parts import PartWriter

PROBS_FORMAT = "dis-probs"
PROBS_FORMAT_VERSION = 1
PROBS_PART_IMAGES = 32  # a kill loses at most this many images' probabilities ...
PROBS_PART_SECONDS = 60.0  # ... or this much work


def probs_attrs(classes: Sequence[str], steps: int, checkpoint_hash: str,
                inference: dict[str, Any]) -> dict[str, Any]:
    """The root attributes of a probabilities file."""
    return {"format": PROBS_FORMAT, "format_version": PROBS_FORMAT_VERSION,
            "classes": json.dumps(list(classes)), "steps": int(steps),
            "checkpoint_hash": checkpoint_hash, "inference": json.dumps(inference)}


class ProbsWriter:
    """Writes the ``--probs`` HDF5 file (see the module docstring): crash-safe part files while
    the run goes, merged into the file (temp + rename) by :meth:`close`.

    ``rank``: under torchrun, rank 0 cleans torn temporaries, deletes old parts (``overwrite``),
    checks the file and the parts and lists the ids already done (:attr:`done`), and merges every
    rank's parts in the end; the other ranks only write parts of their own name (``rank`` > 0:
    nothing is read or deleted, :attr:`done` stays empty, close with ``commit=False``).
    """

    def __init__(self, path: str | Path, attrs: dict[str, Any], overwrite: bool = False,
                 part_images: int = PROBS_PART_IMAGES,
                 part_seconds: float = PROBS_PART_SECONDS, rank: int = 0):
        self.path = Path(path)
        self.attrs = attrs
        self.overwrite = overwrite
        self.parts_dir = self.path.with_name(f".{self.path.name}.parts")
        self.rank = rank
        self.done: set[str] = set()
        self.inputs: dict[str, str] = {}  # id -> hash of the input its entry was made from
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = PartWriter(self.path, attrs, self.parts_dir,
                                  prefix="part-" if rank == 0 else f"part-r{rank}-",
                                  part_images=part_images, part_seconds=part_seconds,
                                  clean=rank == 0)
        if rank == 0:
            if overwrite:
                self._writer.drop_parts()
            else:
                sources = ([self.path] if self.path.exists() else []) + self.parts()
                for source in sources:
                    self._check(source)
                    # "" for entries written before dis recorded the input's hash
                    entries = {i: str(a.get("input", "")) for i, a in
                               self._writer.done([source]).items()}
                    self.done |= set(entries)
                    self.inputs.update(entries)

    def parts(self) -> list[Path]:
        return self._writer.parts()

    @property
    def _h5(self) -> h5py.File | None:
        """The part file being written (None between parts)."""
        return self._writer._h5

    def _check(self, path: Path) -> None:
        if path.is_dir():
            raise BadInputError("expected a probabilities file (.h5), found a folder", path)
        try:
            with h5py.File(path, "r") as h5:
                attrs = dict(h5.attrs)
        except OSError as exc:
            raise BadInputError(f"not a readable HDF5 file ({first_line(exc, 120)}); pass "
                                f"{{opt:overwrite=True}} to replace it", path) from None
        if attrs.get("format") != PROBS_FORMAT:
            raise IncompatibleError("not a dis probabilities file; pass {opt:overwrite=True} to "
                                    "replace it",
                                    path)
        for key in ("classes", "steps", "checkpoint_hash", "inference"):
            if str(attrs.get(key)) != str(self.attrs.get(key)):
                raise IncompatibleError(f"made with another {key} ({attrs.get(key)}, now "
                                        f"{self.attrs.get(key)}); pass {{opt:overwrite=True}} to "
                                        f"replace it", path)

    def add(self, image_id: str, probs: np.ndarray, tag_probs: np.ndarray,
            input_hash: str = "") -> None:
        def fill(g: h5py.Group) -> None:
            g.attrs["input"] = input_hash
            g.create_dataset("probs", data=probs.astype(np.float16), compression="gzip",
                             compression_opts=1, chunks=True)
            g.create_dataset("tag_probs", data=tag_probs.astype(np.float32))

        self._writer.add(image_id, fill)
        self.done.add(image_id)
        self.inputs[image_id] = input_hash

    def close(self, commit: bool = True) -> None:
        """Finish the current part; with ``commit``, merge everything into the file (every
        rank's finished parts: under torchrun only rank 0 commits, once the others are done)."""
        self._writer.flush()
        parts = self.parts()
        if not commit or (not parts and self.path.exists() and not self.overwrite):
            return  # nothing new: the file is already what a merge would write
        sources = parts[::-1]  # the newest copy of an entry wins
        if self.path.exists() and not self.overwrite:
            sources.append(self.path)
        self._writer.merge(sources)
        self.overwrite = False
