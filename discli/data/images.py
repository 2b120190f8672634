"""Reading images defensively: every failure is one line naming the file.

Web images (IDW-style sets are crawled) come in every mode PIL knows; :func:`read_image` turns
them all into plain 8-bit RGB the same way, so a training run never depends on which decoder
path an image happened to take:

- CMYK (print JPEGs): PIL's CMYK -> RGB conversion; Adobe's inverted CMYK JPEGs are already
  un-inverted by PIL's decoder.
- 16-bit greyscale (``I;16``) and 32-bit integer (``I``): scaled to 8 bits by the bit depth
  (value >> 8), not clipped at 255 (clipping turns most 16-bit images white).
- 16-bit RGB PNGs: PIL already reduces them to 8 bits per channel.
- anything with alpha (RGBA, LA, PA, palette with transparency): composited over white, the
  way a browser shows it on a page, instead of exposing whatever colour hides under alpha 0.
- EXIF orientation is applied, so width and height are the ones a viewer shows (and the ones
  an annotation tool would have used for the labelmap).

Refused, before any pixel is decoded: missing and zero-byte files, files PIL cannot identify,
and headers claiming more than :data:`MAX_IMAGE_PIXELS` pixels (a decompression bomb: a few
kilobytes of PNG can claim 20000 x 20000 pixels and take gigabytes to decode). Refused after
decoding: truncated or corrupt data, and images with a side under :data:`MIN_SIDE` pixels.
Choice for tiny images: a 1x1 or 4x4 image is refused, not upsampled. Such files in crawled
sets are tracking pixels and broken thumbnails, not photos, and they are smaller than one cell of
the network's stride-8 output; ``min_side=1`` accepts them for callers that really want them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from discli.data.fileio import env_limit
from discli.errors import BadInputError, first_line, system_error

# 50 megapixels: above any camera photo in common datasets (VOC images are ~0.2 MP) and well
# under the memory a decoded image may take on a small machine (50 MP RGB = 150 MB).
# DIS_MAX_IMAGE_PIXELS raises it.
MAX_IMAGE_PIXELS = 50_000_000
MIN_SIDE = 8

# EXIF orientations 5..8 are transposes: width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def open_checked(path: str | Path, max_pixels: int | None = None,
                 what: str = "image") -> Image.Image:
    """Open an image (header only) and check its claimed size; the caller closes it.

    Used for labelmaps too: the same missing / empty / bomb checks apply to any PNG we read.
    """
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{what} not found", path)
    if path.is_dir():
        raise BadInputError(f"expected a file ({what}), found a folder", path)
    if not path.is_file():  # /dev/zero, a FIFO: opening or reading one may never end
        raise BadInputError(f"expected a {what} file, found a device, pipe or socket", path)
    if path.stat().st_size == 0:
        raise BadInputError(f"empty {what} file (0 bytes)", path)
    limit = (env_limit("DIS_MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS) if max_pixels is None
             else max_pixels)
    try:
        # We apply our own limit below; PIL's warning (at ~89 MP) would only duplicate it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError:
        raise BadInputError(f"{what} header claims too many pixels (decompression bomb?); the "
                            f"limit is {limit} pixels", path) from None
    except UnidentifiedImageError:
        raise BadInputError(f"not a decodable {what} (unknown or corrupt format)", path) from None
    except OSError as exc:
        if isinstance(exc, PermissionError):  # the machine refused, not the data: exit 6
            raise system_error(exc, path) or exc from None
        raise BadInputError(f"cannot open {what}: {exc}", path) from None
    w, h = im.size
    if w * h > limit:
        im.close()
        raise BadInputError(f"{what} header claims {w}x{h} = {w * h} pixels, more than the limit "
                            f"of {limit} (decompression bomb?); raise DIS_MAX_IMAGE_PIXELS if the "
                            "image is genuine", path)
    return im


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make a good image unreadable
        return 1


def header_orientation(path: str | Path) -> int:
    """The EXIF orientation of an image file from its header alone (1 when it has none, or the
    file cannot be opened: reading it later says why). Costs a header read, not a decode: a PNG's
    eXIf chunk is taken only from before the pixel data, where the standard puts it (Pillow's
    ``getexif`` would decode the whole PNG to look after it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format == "PNG":
                    raw = im.info.get("exif")
                    if not raw:
                        return 1
                    exif = Image.Exif()
                    exif.load(raw)
                    return int(exif.get(0x0112, 1))
                return _orientation(im)
    except Exception:  # noqa: BLE001 - only a hint; read_image refuses a broken file properly
        return 1


def size_mismatch(labelmap_hw: tuple[int, ...], image: str | Path,
                  image_hw: tuple[int, ...], name_image: bool = True) -> str:
    """The message for a labelmap whose size is not its image's, saying so when the image's
    EXIF orientation explains it (dis shows images as a viewer does, rotated; a labelmap drawn
    on the stored, unrotated pixels then has width and height swapped)."""
    (lh, lw), (h, w) = labelmap_hw[:2], image_hw[:2]
    named = f" {Path(image).name}" if name_image else ""
    message = f"labelmap is {lw}x{lh} but its image{named} is {w}x{h}"
    try:
        with Image.open(image) as im:
            orientation, (sw, sh) = _orientation(im), im.size
    except Exception:  # the image was readable a moment ago; the note is only a hint
        return message
    if orientation in _SWAPPING_ORIENTATIONS and (lh, lw) == (sh, sw):
        message += (f" after its EXIF rotation (orientation {orientation}); the labelmap matches "
                    f"the image as stored ({sw}x{sh}), but dis applies EXIF rotation: rotate the "
                    f"labelmap the same way, or remove the orientation tag from the image")
    return message


def probe_image(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(H, W) as :func:`read_image` would return it, from the header only (cheap, no decoding)."""
    with open_checked(path, max_pixels) as im:
        w, h = im.size
        if _orientation(im) in _SWAPPING_ORIENTATIONS:
            w, h = h, w
    return h, w


def _to_rgb(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        # "I" holds 16-bit PNGs in older Pillow; a genuine 8-bit range needs no scaling.
        if mode != "I" or a.max(initial=0) > 255:
            a = a >> 8
        grey = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        raise BadInputError("floating-point images are not supported; convert to 8-bit", path)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_image(path: str | Path, max_pixels: int | None = None,
               min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3), or raise :class:`BadInputError`."""
    path = Path(path)
    with open_checked(path, max_pixels) as im:
        try:
            im.load()
            im = ImageOps.exif_transpose(im) if _orientation(im) != 1 else im
            rgb = _to_rgb(im, path)
        except BadInputError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadInputError(f"truncated or corrupt image data ({first_line(exc, 120)})",
                                path) from None
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise BadInputError(f"image too small ({w}x{h} pixels; the smallest side must be at least "
                            f"{min_side} pixels, one cell of the stride-8 output)", path)
    return rgb
