"""The paper's network at real size, from random weights (nothing can be downloaded here): one
pretraining iteration of every step and one `dis infer --t-ts 30` of a 500x366 image. Slow:
about 20 s on 2 CPU cores."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factories import make_split

pytestmark = pytest.mark.slow


def _dis(*args, cwd):
    exe = Path(sys.executable).with_name("dis")
    out = subprocess.run([str(exe) if exe.exists() else "dis", *args], capture_output=True,
                         text=True, timeout=900, cwd=cwd,
                         env={**os.environ, "DIS_LOAD_PLUGINS": "pretrain,infer"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_resnet101_pretrains_from_random_weights_and_infers_a_real_size_image(tmp_path):
    manifest = make_split(tmp_path, "voc", 2, 0, True, size=(366, 500))
    # The default SGD recipe of docs/running.md (lr 0.01, new layers x10): without gradient
    # clipping the losses reached 1e4-1e7 within four iterations and step 2 stopped on a NaN.
    _dis("pretrain", "--labelled", str(manifest), "--out", "run", "--backbone", "resnet101",
         "--batch-size", "1", "--crop-size", "321", "--device", "cpu", "-q",
         "--set", "iters_step1=2", "--set", "iters_step2=1", "--set", "iters_step3=1",
         "--set", "log_every=1", cwd=tmp_path)
    log = [json.loads(line) for line in (tmp_path / "run/pretrain/log.jsonl").read_text()
           .splitlines()]
    assert [r["phase"] for r in log] == ["step1", "step1", "step2", "step3"]
    assert all(math.isfinite(r["loss"]) and r["loss"] < 1e3 for r in log)
    image = tmp_path / "voc" / "voc_000.png"
    out = _dis("infer", str(image), "-c", "run/pretrain/final.pth", "-o", "pred", "--t-ts",
               "30", "--device", "cpu", "--json", cwd=tmp_path)
    assert '"id"' in out.stdout
    labelmap = np.asarray(Image.open(next((tmp_path / "pred").glob("voc_000*.png"))))
    assert labelmap.shape == (374, 500)  # voc_000 is the taller of make_split's two sizes
