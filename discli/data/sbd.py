"""SBD, the "VOC augment" set (Hariharan et al. 2011): 11k VOC images with class labelmaps.

Layout (``benchmark_RELEASE/dataset``)::

    cls/<id>.mat     MATLAB struct GTcls with field Segmentation: uint8 (H, W), 0..20
    img/<id>.jpg     the images (the same files as VOC2012/JPEGImages/<id>.jpg)
    train.txt, val.txt

The ``.mat`` labelmaps are read directly (registered in
:data:`discli.data.labelmap.LABELMAP_FORMATS` under ``.mat``), so preparing SBD writes nothing but
manifests: no converted PNG copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from discli.data.manifest import Record
from discli.data.problems import Problems
from discli.data.voc import VOC_CLASSES, read_id_list
from discli.errors import BadInputError
from discli.data.labelmap import IGNORE, LABELMAP_FORMATS, check_pair, labelmap_tags


@LABELMAP_FORMATS.register(".mat")
def read_sbd_mat(path: str | Path) -> np.ndarray:
    """The ``GTcls.Segmentation`` array of an SBD ``cls/*.mat`` file as uint8 (H, W)."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise BadInputError("labelmap not found", path)
    try:
        mat = scipy.io.loadmat(path, struct_as_record=True, squeeze_me=True)
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError... for bad files
        raise BadInputError(f"not a readable MATLAB file ({type(exc).__name__})", path) from None
    gt = mat.get("GTcls")
    names = getattr(getattr(gt, "dtype", None), "names", None) or ()
    if gt is None or "Segmentation" not in names or gt.size == 0:  # size 0: an empty struct
        raise BadInputError("no GTcls.Segmentation in this .mat file (not an SBD cls file?)",
                            path)
    seg = np.asarray(gt["Segmentation"].item() if gt.ndim == 0 else gt["Segmentation"][0])
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise BadInputError(f"GTcls.Segmentation is not a 2-D integer array "
                            f"({seg.dtype}, shape {seg.shape})", path)
    if seg.size and (seg.min() < 0 or seg.max() > IGNORE):
        raise BadInputError("GTcls.Segmentation has values outside 0..255", path)
    return seg.astype(np.uint8)


def find_sbd_root(path: str | Path) -> Path:
    """The SBD ``dataset`` folder given it, ``benchmark_RELEASE`` or a parent of that."""
    path = Path(path)
    for c in (path, path / "dataset", path / "benchmark_RELEASE" / "dataset"):
        if (c / "cls").is_dir() and ((c / "train.txt").is_file() or (c / "val.txt").is_file()):
            return c
    raise BadInputError("not an SBD tree (no cls/ with train.txt or val.txt in it, its "
                        "dataset/ or benchmark_RELEASE/dataset/)", path)


def sbd_records(sbd_root: Path, split: str, voc_root: Path | None = None,
                classes: Sequence[str] = VOC_CLASSES, problems: Problems | None = None,
                decode: bool = False, progress: Callable[[], None] | None = None
                ) -> list[Record]:
    """Records of SBD's ``train`` or ``val`` list with absolute paths, tags from the labelmaps.

    The image is VOC's ``JPEGImages/<id>.jpg`` when ``voc_root`` has it (one image file per id
    across VOC and SBD manifests), else SBD's own ``img/<id>.jpg``.
    """
    problems = problems if problems is not None else Problems()
    records = []
    for image_id in read_id_list(sbd_root / f"{split}.txt"):
        image = sbd_root / "img" / f"{image_id}.jpg"
        if voc_root is not None and (voc_root / "JPEGImages" / f"{image_id}.jpg").is_file():
            image = voc_root / "JPEGImages" / f"{image_id}.jpg"
        labelmap = sbd_root / "cls" / f"{image_id}.mat"
        rec = None
        with problems.guard():
            values = check_pair(image, labelmap, len(classes), decode)
            rec = Record(id=image_id, image=str(image), labelmap=str(labelmap),
                         tags=labelmap_tags(values, classes), tag_source="pixels",
                         split=f"sbd_{split}")
        if rec is not None:
            records.append(rec)
        if progress:
            progress()
    return records

