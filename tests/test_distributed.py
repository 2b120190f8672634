"""torchrun with 2 CPU processes (gloo) against one process with the same global batch, and
`dis infer` / `dis evaluate` sharded over 2 processes against one process."""

import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from factories import make_split, write_dataset
from test_infer_cli import cli, one_thread, tiny_checkpoint  # noqa: F401
from discli.pseudo.cache import PseudoCache
from discli.infer.checkpoint import load_checkpoint
from discli.distributed import DistInfo, resolve_device, shard
from discli.errors import UsageError
from discli.infer.probs import ProbsWriter
from discli.infer.runtime import plan_batches, size_batches


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args, nproc, tmp_path, stdin=None, plugins=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "discli"]
    cmd = (launcher if nproc > 1 else [sys.executable, "-m", "discli"]) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if plugins is not None:  # fewer plugins to import: a faster start of every process
        env["DIS_LOAD_PLUGINS"] = plugins
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                         cwd=tmp_path, input=stdin)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-data")
    return {"labelled": make_split(root, "train", 8, 0, True),
            "tagged": make_split(root, "web", 7, 1, False, tag_source="caption")}


def _common(data, out):
    return ["--labelled", str(data["labelled"]), "--tagged", str(data["tagged"]),
            "--out", str(out), "--backbone", "tiny", "--batch-size", "4", "--crop-size", "32",
            "--device", "cpu", "--quiet", "--set", "channels=16", "--set", "freeze_bn=true",
            "--set", "iters_step1=3", "--set", "iters_step2=2", "--set", "iters_step3=3",
            "--set", "estep_batch_size=2", "--set", "t_tr=2", "--set", "mstep_iters=2",
            "--set", "rounds=1"]


def test_ddp_pretrain_matches_single_process_and_sharded_estep(data, tmp_path):
    for nproc, name in ((1, "single"), (2, "ddp")):
        args = _common(data, tmp_path / name)
        _run(["pretrain", *[a for a in args if a != "--tagged" and a != str(data["tagged"])]],
             nproc, tmp_path)
        # Both E-steps start from the single-process model: the caches must then agree.
        _run(["finetune", *args, "--only", "estep", "--init",
              str(tmp_path / "single/pretrain/final.pth")], nproc, tmp_path)
    single = load_checkpoint(tmp_path / "single/pretrain/final.pth")["model"]
    ddp = load_checkpoint(tmp_path / "ddp/pretrain/final.pth")["model"]
    for key in single:
        assert torch.allclose(single[key].float(), ddp[key].float(), atol=1e-5), key
    a = PseudoCache(tmp_path / "single/finetune/round-1/cache.h5")
    b = PseudoCache(tmp_path / "ddp/finetune/round-1/cache.h5")
    assert sorted(a.ids()) == sorted(b.ids()) and len(a) == 7
    assert not (tmp_path / "ddp/finetune/round-1/cache.parts").exists()
    for image_id in a.ids():
        ea, eb = a.get(image_id), b.get(image_id)
        assert np.array_equal(ea.labelmap, eb.labelmap)
        assert np.allclose(ea.tag_probs, eb.tag_probs, atol=1e-5)
        assert np.allclose(ea.confidence.astype(np.float32), eb.confidence.astype(np.float32),
                           atol=1e-3)


# ----------------------------------------------------------------------------- infer / evaluate

# 7 images of three sizes: with -b 2 the batches are uneven in count and size over 2 ranks
SIZES = [(32, 40), (32, 40), (40, 32), (32, 40), (40, 32), (32, 40), (48, 48)]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ddp-eval"), SIZES, seed=7)


def _scores(report):
    """The report without its timings (ms/image legitimately differs under DDP)."""
    report = {k: v for k, v in report.items() if k != "ms_per_image"}
    report["setups"] = [{k: v for k, v in s.items() if k != "ms_per_image"}
                        for s in report["setups"]]
    return report


@pytest.mark.parametrize("limit", [None, 1], ids=["7-images", "1-image-world-larger"])
def test_ddp_evaluate_equals_single_process_exactly(
        tiny_checkpoint, labelled, tmp_path, capsys, limit):  # noqa: F811
    args = ["evaluate", str(labelled), "-c", str(tiny_checkpoint), "--t-ts", "0,2", "-b", "2",
            "--device", "cpu", "--json", "-q"] + ([] if limit is None else ["--limit", "1"])
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    single = json.loads(out)
    ddp_out = _run(args, 2, tmp_path, plugins="evaluate").stdout
    assert len(ddp_out.splitlines()) == 1  # rank 0 alone prints
    ddp = json.loads(ddp_out)
    assert ddp["images"] == single["images"] == (1 if limit else len(SIZES))
    assert [s["name"] for s in ddp["setups"]] == ["t=0", "t=2", "ensemble"]
    assert ddp["setups"][-1]["pixels"] > 0
    assert _scores(ddp) == _scores(single)  # IoU, mIoU, pixel counts, boundary F: exactly
    assert ddp["ms_per_image"] > 0


def test_ddp_infer_equals_single_process(tiny_checkpoint, labelled, tmp_path, capsys):  # noqa: F811
    images = labelled.parent / "images"
    paths = sorted(images.glob("*.png"))
    common = ["-c", str(tiny_checkpoint), "--t-ts", "2", "-b", "2", "--device", "cpu", "-q"]
    code, _, err = cli(capsys, "infer", str(images), "-o", str(tmp_path / "single"),
                       "--probs", str(tmp_path / "single.h5"), *common)
    assert code == 0, err
    # Resume: two images already done by an earlier (single-process) run into the DDP folder.
    code, _, err = cli(capsys, "infer", str(paths[0]), str(paths[3]), "-o",
                       str(tmp_path / "ddp"), "--probs", str(tmp_path / "ddp.h5"), *common)
    assert code == 0, err
    # The paths come on stdin: rank 0 alone reads them (two readers would split the list).
    ddp = _run(["infer", "-", "-o", str(tmp_path / "ddp"), "--probs", str(tmp_path / "ddp.h5"),
                "--json", *common], 2, tmp_path, stdin="".join(f"{p}\n" for p in paths),
               plugins="infer")
    lines = [json.loads(line) for line in ddp.stdout.splitlines()]  # rank 0 alone prints
    assert sorted(s["id"] for s in lines) == [p.stem for p in paths]
    assert sorted(s["id"] for s in lines if s["skipped"]) == [paths[0].stem, paths[3].stem]

    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    files = sorted(p.name for p in single_dir.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in ddp_dir.iterdir() if not p.name.startswith(".")) == files
    assert len(files) == 2 * len(paths)
    for name in files:
        assert (ddp_dir / name).read_bytes() == (single_dir / name).read_bytes(), name
    assert json.loads((ddp_dir / ".dis-infer.json").read_text()) == json.loads(
        (single_dir / ".dis-infer.json").read_text())
    assert not (tmp_path / ".ddp.h5.parts").exists()  # every rank's parts merged by rank 0
    with h5py.File(tmp_path / "single.h5", "r") as a, h5py.File(tmp_path / "ddp.h5", "r") as b:
        ids = [str(g.attrs["id"]) for g in b["entries"].values()]
        assert sorted(ids) == [p.stem for p in paths]  # each image exactly once
        assert {k: str(v) for k, v in a.attrs.items()} == {k: str(v) for k, v in b.attrs.items()}
        for key in a["entries"]:
            for name in ("probs", "tag_probs"):
                x = a["entries"][key][name][()].astype(np.float32)
                y = b["entries"][key][name][()].astype(np.float32)
                assert x.shape == y.shape and np.allclose(x, y, atol=1e-5), (key, name)


def test_ranks_given_other_settings_stop_together(data, tmp_path):
    """A torchrun job whose rank 1 got another learning rate trained apart without a word, and
    another number of iterations hung: both ranks now stop at the start with exit 2."""
    wrap = tmp_path / "wrap.sh"
    wrap.write_text('#!/bin/sh\nif [ "$RANK" = 1 ]; then exec "$PY" -m discli "$@" --set lr=0.5\n'
                    'else exec "$PY" -m discli "$@"; fi\n')
    wrap.chmod(0o755)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "--no-python",
           str(wrap), "pretrain", *[a for a in _common(data, tmp_path / "run")
                                    if a not in ("--tagged", str(data["tagged"]))]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PY": sys.executable,
           "DIS_LOAD_PLUGINS": "pretrain"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.startswith("dis: error:")]
    assert out.returncode != 0 and len(lines) == 2, out.stderr[-3000:]
    assert "rank 1 has other settings than rank 0 (lr " in lines[0] + lines[1]
    assert "exitcode: 2" in out.stderr  # torchrun's report of the ranks' exit code
    assert not (tmp_path / "run" / "pretrain" / "final.pth").exists()


def test_shard_is_disjoint_covering_and_takes_world_larger_than_items():
    for n in range(10):
        items = [f"item{i}" for i in range(n)]
        for world in range(1, 13):
            shares = [shard(items, DistInfo(rank, world)) for rank in range(world)]
            flat = [x for share in shares for x in share]
            assert sorted(flat) == sorted(items) and len(flat) == n  # every item exactly once
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert all(share == [] for share in shares[n:])  # ranks beyond the items: nothing
            assert shares == [shard(items, DistInfo(rank, world)) for rank in range(world)]
    assert shard([1, 2, 3], DistInfo(0, 1)) == [1, 2, 3]
    with pytest.raises(ValueError):
        shard([1, 2], DistInfo(2, 2))


def test_resolve_device_is_the_one_device_rule(monkeypatch):
    """Every command's --device goes through this one function (training, infer, evaluate,
    clean-tags, the benchmarks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)  # this rank's GPU
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UsageError, match="cuda:2 is not a visible GPU.*2 CUDA devices"):
        resolve_device("cuda:2")


def test_plan_batches_are_the_streamed_batches():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(x) for x in rng.choice([32, 40, 48], 2)) for _ in range(60)]
    streamed = list(size_batches(range(len(sizes)), lambda i: sizes[i], 3, max_pending=5))
    assert plan_batches(sizes, 3) == list(size_batches(range(len(sizes)),
                                                       lambda i: sizes[i], 3))
    assert sorted(i for b in plan_batches(sizes, 3) for i in b) == list(range(60))
    assert all(len({sizes[i] for i in b}) == 1 for b in streamed)


def test_probs_writer_parts_of_several_ranks_merge_once(tmp_path):
    attrs = {"format": "dis-probs", "format_version": 1, "classes": '["bg", "a"]', "steps": 0,
             "checkpoint_hash": "h", "inference": "{}"}
    path = tmp_path / "p.h5"
    writers = [ProbsWriter(path, attrs, part_images=2, rank=rank) for rank in range(3)]
    for i in range(7):
        writers[i % 3].add(f"im{i}", np.full((2, 4, 4), i, np.float32), np.zeros(2, np.float32))
    for w in writers[1:]:
        w.close(commit=False)
    names = sorted(p.name for p in writers[0].parts())
    assert "part-000000.h5" in names and "part-r1-000000.h5" in names
    assert "part-r2-000000.h5" in names
    # a re-run sees every rank's finished parts as done (im6 is in rank 0's open part)
    assert ProbsWriter(path, attrs).done == {f"im{i}" for i in range(6)}
    writers[0].close()
    with h5py.File(path, "r") as h5:
        assert sorted(h5["entries"]) == [f"im{i}" for i in range(7)]
        assert h5["entries"]["im5"]["probs"][0, 0, 0] == 5
    assert not (tmp_path / ".p.h5.parts").exists()


# ----------------------------------------------------------------------------- M-step batch mix

def test_every_rank_gets_the_global_batch_mix_of_sources():
    from discli.train.batches import PlannedBatches

    sizes, per_batch = [30, 50], [6, 2]  # pixel-labelled, pseudo-labelled: a quarter tagged
    whole = PlannedBatches(sizes, per_batch, seed=3, start=0, stop=5)
    for it in range(5):
        shares = [PlannedBatches(sizes, per_batch, 3, 0, 5, DistInfo(rank, 2)).batch(it)
                  for rank in range(2)]
        for share in shares:
            assert [s for s, _, _ in share].count(1) == 1  # 2 tagged over 2 ranks: one each
            assert len(share) == 4
        assert sorted(shares[0] + shares[1]) == sorted(whole.batch(it))  # nothing lost


_MIX_SCRIPT = """
import json, torch.distributed as dist
from discli.distributed import DistInfo
from discli.train.batches import PlannedBatches
dist.init_process_group("gloo")
info = DistInfo(dist.get_rank(), dist.get_world_size())
shares = [[s for s, _, _ in b] for b in PlannedBatches([9, 40], [3, 3], 0, 0, 4, info)]
gathered = [None, None]
dist.all_gather_object(gathered, shares)
if info.rank == 0:
    print(json.dumps(gathered))
dist.destroy_process_group()
"""


def test_ddp_ranks_each_mix_labelled_and_pseudo_labelled(tmp_path):
    script = tmp_path / "mix.py"
    script.write_text(_MIX_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    per_rank = json.loads(out.stdout.strip().splitlines()[-1])
    for rank_batches in per_rank:  # half of every global batch is pseudo-labelled: so per rank
        assert len(rank_batches) == 4
        assert all(sorted(b) in ([0, 1, 1], [0, 0, 1]) for b in rank_batches)
        assert sum(b.count(1) for b in rank_batches) == 6  # the odd one alternates
