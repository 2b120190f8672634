"""torchvision's ImageNet weights for the ResNet and MobileNetV3 backbones, offline first.

torchvision keeps downloaded weights in the torch hub cache (``torch.hub.get_dir()/checkpoints``:
``$TORCH_HOME/hub/checkpoints``, ``TORCH_HOME`` defaulting to ``~/.cache/torch``) under the
file name of their URL, and downloads them the first time they are asked for. GPU clusters
often cannot reach download.pytorch.org, where torchvision's own lookup ends in a bare
``URLError`` from urllib; this lookup names the file it wanted, where it looked, and the two
ways round it (copy the file there, or pass a local state dict as ``backbone_weights``).

It reads the cache as torchvision does, so a file that torchvision downloaded earlier (or one
copied there by hand) is used without any network access. It is also stricter than
torchvision's: ``torch.load(weights_only=True)``, and a damaged file is named with what to do.
"""

from __future__ import annotations

import http.client
import os
import re
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch

from discli.errors import BadInputError, DisError, IncompatibleError, first_line, system_error

# torch.hub's convention: the file name's "-<hex>." part is a prefix of its SHA-256
_HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")
_CACHE_HINT = "the torch hub cache, $TORCH_HOME/hub/checkpoints, TORCH_HOME defaulting to " \
              "~/.cache/torch"


def cache_file(url: str) -> Path:
    """Where torchvision keeps (and looks for) the download of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def imagenet_state_dict(weights: Any, backbone: str) -> dict[str, torch.Tensor]:
    """The state dict behind a torchvision ``WeightsEnum`` member (``ResNet101_Weights.
    IMAGENET1K_V2``): from the torch hub cache, downloaded into it when missing.

    Raises :class:`BadInputError` (exit 3) naming the cache file when it is missing and cannot
    be downloaded, :class:`IncompatibleError` when the cached file is damaged, and the
    :class:`~discli.errors.SystemRefusedError` of :func:`~discli.errors.system_error` when the
    cache folder cannot be written."""
    from discli.model.backbones import load_state_dict_file

    path = cache_file(weights.url)
    if not path.is_file():
        _download(weights.url, path, backbone)
    try:
        return load_state_dict_file(path)
    except IncompatibleError as exc:
        raise IncompatibleError(f"the cached ImageNet weights of {backbone} are damaged "
                                f"({exc.template}); delete the file to download it again, or "
                                f"pass a local torchvision state dict with "
                                f"{{opt:backbone_weights=PATH}}", path) from None


def _download(url: str, path: Path, backbone: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        match = _HASH_PREFIX.search(path.name)
        # written to a temporary file beside `path` and renamed: a broken download leaves
        # nothing that a later run would take for the weights
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None,
                                       progress=True)
    except DisError:
        raise
    except (OSError, http.client.HTTPException, RuntimeError) as exc:
        # URLError is an OSError without errno; a full disk or a cache folder the user may
        # not write to is the machine's refusal, named as such (exit 6)
        refused = None if isinstance(exc, URLError) or not isinstance(exc, OSError) \
            else system_error(exc, path)
        if refused is not None:
            raise refused from None
        if isinstance(exc, RuntimeError) and "hash" not in str(exc):
            raise  # not a failed download: a bug, with its traceback under --debug
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        raise BadInputError(
            f"ImageNet weights of the {backbone} backbone not found, and downloading them "
            f"from {url} failed ({reason}); torchvision looks for this file here ("
            f"{_CACHE_HINT}): copy it there from a machine that has it, or pass a local "
            f"torchvision state dict with {{opt:backbone_weights=PATH}}", path) from None
