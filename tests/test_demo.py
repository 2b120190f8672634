"""`dis demo --quick` end to end (slow: a few minutes on 2 CPU cores)."""

import json
import subprocess

import pytest
from PIL import Image


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(["dis", "demo", "--quick", "--out", str(out), "--quiet", "--json"],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report == json.loads((out / "report.json").read_text())
    classes = report["classes"]
    assert classes[0] == "background" and len(classes) >= 3
    assert set(report["scores"]) == {"baseline", "t_tr=0", "t_tr=10", "t_tr=30", "bound"}
    for scores in report["scores"].values():
        names = [s["name"] for s in scores["setups"]]
        assert names == ["t=0", "t=10", "t=30", "ensemble"]
        for setup in scores["setups"]:
            assert 0.0 <= setup["miou"] <= 1.0 and set(setup["iou"]) == set(classes)
    for stats in report["tags"].values():
        for kind in ("noisy", "cleaned"):
            assert 0.0 <= stats[kind]["micro"]["f1"] <= 1.0
    md = (out / "report.md").read_text()
    assert "| setup |" in md and "fully supervised bound" in md and "cleaned F1" in md
    figure = Image.open(out / "figure.png")
    assert figure.width >= 7 * 64 and figure.height > 64
    # A re-run finds every stage finished and only rewrites the report.
    again = subprocess.run(["dis", "demo", "--quick", "--out", str(out), "--quiet", "--json"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert json.loads(again.stdout)["scores"] == report["scores"]
