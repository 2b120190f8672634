"""Multi-GPU training paths checked without a GPU (issue 31): which GPU each rank of a simulated
torchrun job takes and what its process group receives, the global batch over the ranks, a
checkpoint's CUDA generator state on a machine that shows fewer GPUs, and the refinement's
TF32 switch. The same paths on real GPUs: test_multigpu_cuda.py (benchmarks/gpu_check.sh)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as tdist

from factories import SPLIT_CLASSES, make_split, one_thread, save_tiny, tiny_model  # noqa: F401
from discli import distributed
from discli.infer.checkpoint import load_checkpoint, save_checkpoint
from discli.errors import UsageError
from discli.train.keys import TrainConfig
from discli.train.rng import rng_state, set_rng_state
from discli.train.finetune import finetune
from discli.train.pretrain import pretrain
from test_distributed import _free_port


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multigpu-data")
    return {"labelled": make_split(root, "train", 4, 0, True),
            "tagged": make_split(root, "web", 3, 1, False, tag_source="caption")}


def _config(data, out, **kw):
    base = dict(labelled=str(data["labelled"]), tagged=str(data["tagged"]), out=str(out),
                backbone="tiny", channels=8, batch_size=4, crop_size=32, iters_step1=4,
                iters_step2=0, iters_step3=0, ckpt_every=2, log_every=1, device="cpu")
    return TrainConfig(**{**base, **kw})


class Joined(Exception):
    """Stands in for init_process_group: the simulated rank stops once it has joined."""


@pytest.fixture
def cuda_job(monkeypatch):
    """A simulated torchrun job on a machine with 2 GPUs: ``job(rank, world)`` sets the rank's
    environment; ``calls`` records set_device and init_process_group (which raises Joined)."""
    calls = {"set_device": [], "init": []}
    current = [0]

    def set_device(device):
        calls["set_device"].append(torch.device(device))
        current[0] = torch.device(device).index

    def init_process_group(**kwargs):
        calls["init"].append(kwargs)
        raise Joined

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(tdist, "init_process_group", init_process_group)

    def job(rank, world=2):
        for name, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", world)):
            monkeypatch.setenv(name, str(value))
        calls["set_device"].clear()
        calls["init"].clear()
        return calls
    return job


# ----------------------------------------------------------------------------- device per rank

@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_trains_on_its_own_gpu_and_binds_it_to_the_process_group(
        cuda_job, data, tmp_path, command, rank):
    calls = cuda_job(rank)
    with pytest.raises(Joined):
        {"pretrain": pretrain, "finetune": finetune}[command](
            _config(data, tmp_path, device="cuda"))
    gpu = torch.device("cuda", rank)
    assert calls["set_device"] == [gpu]  # before joining: NCCL and object collectives use it
    assert calls["init"] == [{"backend": "nccl", "device_id": gpu}]  # barrier() uses it


def test_collectives_of_each_simulated_rank_run_on_its_gpu(cuda_job, monkeypatch):
    """What the CPU-tensor path of all_reduce_sum (check_finite's) and the object collectives
    (the E-step's broadcast_object_list) allocate on, once a rank has set up."""
    for rank in (0, 1):
        cuda_job(rank)
        with pytest.raises(Joined):
            distributed.setup_distributed("cuda")
        with monkeypatch.context() as joined:  # as after a real init_process_group("nccl")
            joined.setattr(tdist, "is_initialized", lambda: True)
            joined.setattr(tdist, "get_backend", lambda group=None: "nccl")
            assert distributed.collective_device() == torch.device("cuda", rank)
        assert torch.cuda.current_device() == rank  # what broadcast_object_list allocates on


def test_indexed_device_is_refused_under_torchrun_and_checked_against_the_gpus(
        cuda_job, data, tmp_path):
    calls = cuda_job(1)
    for name in ("cuda:0", "cuda:1"):  # the same index on every rank: one GPU for all
        with pytest.raises(UsageError, match=rf"device: {name} under torchrun \(2 processes\)"):
            pretrain(_config(data, tmp_path, device=name))
    with pytest.raises(UsageError, match="must use cuda:1, not cuda:0"):  # a library caller's
        distributed.setup_distributed(torch.device("cuda", 0))
    assert calls["init"] == [] and calls["set_device"] == []  # refused before joining
    cuda_job(2, world=3)  # a third process on a 2-GPU machine
    with pytest.raises(UsageError, match=r"cuda:2 is not a visible GPU: this machine shows 2 "
                                         r"CUDA devices \(LOCAL_RANK 2: start at most 2 "):
        distributed.resolve_device("cuda")
    cuda_job(0, world=1)  # no torchrun: an index is the user's choice, within the GPUs
    assert distributed.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="cuda:5 is not a visible GPU: this machine shows 2 "
                                         "CUDA devices$"):
        distributed.resolve_device("cuda:5")


# ----------------------------------------------------------------------------- global batch

@pytest.mark.parametrize("batch, world, message", [
    (1, 2, "batch_size 1 is smaller than the 2 processes"),
    (8, 16, "batch_size 8 is smaller than the 16 processes"),  # docs/running.md's 2 x 8 GPUs
    (10, 4, r"batch_size 10 is not divisible by the 4 processes \(use a multiple of 4, e.g. "
            r"8 or 12\)"),
])
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_global_batch_must_split_evenly_before_joining(cuda_job, data, tmp_path, batch, world,
                                                       message, command):
    calls = cuda_job(0, world)
    cfg = _config(data, tmp_path, device="cuda", batch_size=batch)
    with pytest.raises(UsageError, match=message):
        {"pretrain": pretrain, "finetune": finetune}[command](cfg)
    assert calls["init"] == []
    assert not (tmp_path / command).exists()  # nothing made
    cuda_job(0, world)
    with pytest.raises(Joined):  # the E-step deals whole batches: any number of ranks
        finetune(cfg, only="estep")


def test_two_gloo_ranks_with_one_image_per_batch_stop_with_exit_2(data, tmp_path):
    """Two real ranks (gloo) of `dis finetune --batch-size 1`: each gets one clear line and
    exit code 2 before any work (it used to run the E-step, then fail in collate([]) on the
    rank whose share of the M-step batch was empty)."""
    init = save_tiny(tmp_path / "init.pth", tiny_model(len(SPLIT_CLASSES), 8), SPLIT_CLASSES)
    args = [sys.executable, "-m", "discli", "finetune", "--labelled", str(data["labelled"]),
            "--tagged", str(data["tagged"]), "--init", str(init), "--out", str(tmp_path / "run"),
            "--backbone", "tiny", "--set", "channels=8", "--batch-size", "1", "--crop-size", "32",
            "--device", "cpu", "--quiet", "--set", "mstep_iters=2", "--set", "rounds=1",
            "--set", "t_tr=1"]
    port = str(_free_port())
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DIS_LOAD_PLUGINS": "finetune",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        ranks.append(subprocess.Popen(args, env=env, cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in ranks:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err[-3000:]
        assert "--batch-size 1 is smaller than the 2 processes" in lines[0]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- RNG of a checkpoint

@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: n visible (simulated) GPUs; returns the list of set_rng_state calls. Setting
    the state of a GPU that is not there raises IndexError, as torch's does (it indexes
    torch.cuda.default_generators)."""
    restored = []

    def set_state(state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if index >= torch.cuda.device_count():
            raise IndexError("list index out of range")
        restored.append((index, state))

    def visible(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_rng_state",
                            lambda device="cuda": torch.full((16,), 7, dtype=torch.uint8))
        for module in (torch.cuda, torch.cuda.random):  # set_rng_state_all calls the latter
            monkeypatch.setattr(module, "set_rng_state", set_state)
        return restored
    return visible


def _cuda_states(n):
    return [torch.full((16,), i, dtype=torch.uint8) for i in range(n)]


def test_checkpoint_holds_and_restores_this_rank_gpu_generator_only(gpus):
    restored = gpus(2)
    state = rng_state(torch.device("cuda", 1))
    assert torch.equal(state["cuda"], torch.full((16,), 7, dtype=torch.uint8))  # one state
    set_rng_state(state, torch.device("cuda", 1))
    assert [index for index, _ in restored] == [1]
    assert "cuda" not in rng_state(torch.device("cpu"))  # a CPU run holds no GPU state


@pytest.mark.parametrize("visible", [0, 1])
def test_old_checkpoint_with_every_gpu_state_restores_on_fewer_gpus(gpus, visible):
    restored = gpus(visible)
    torch.manual_seed(3)
    saved = {**rng_state(torch.device("cpu")), "cuda": _cuda_states(4)}  # written with 4 GPUs
    expected = torch.rand(3)
    device = torch.device("cuda", 0) if visible else torch.device("cpu")
    set_rng_state(saved, device)
    assert torch.equal(torch.rand(3), expected)  # the CPU generator is restored
    assert [(i, s.tolist()) for i, s in restored] == [(0, s.tolist()) for s in
                                                       _cuda_states(4)[:visible]]
    set_rng_state(saved, torch.device("cuda", 6))  # no entry for this GPU: left as it is
    assert len(restored) == visible


def test_resume_from_checkpoint_written_with_four_gpus_on_a_one_gpu_machine(gpus, data,
                                                                            tmp_path):
    cfg = _config(data, tmp_path)
    pretrain(cfg, steps=[1])
    last = tmp_path / "pretrain/last.pth"
    state = load_checkpoint(last)
    assert "cuda" not in state["rng"]  # written by a CPU run
    # The same run as if its checkpoint had been written half-way by a 4-GPU job.
    state["rng"]["cuda"] = _cuda_states(4)
    state.update(iteration=2, done=False)
    save_checkpoint(last, state)
    gpus(1)
    summary = pretrain(cfg, steps=[1])
    assert summary["steps"][1] == "trained"
    assert load_checkpoint(last)["iteration"] == 4


# ----------------------------------------------------------------------------- TF32

def _precisions():
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            torch.backends.cudnn.rnn.fp32_precision)


@pytest.fixture
def tf32_flags():
    """Leave the process's TF32 flags as they were."""
    before = _precisions()
    yield
    matmul, conv, rnn = before
    torch.backends.cuda.matmul.fp32_precision = matmul
    torch.backends.cudnn.conv.fp32_precision = conv
    torch.backends.cudnn.rnn.fp32_precision = rnn


def test_ieee_float32_turns_tf32_off_and_restores_the_flags(tf32_flags):
    from discli.infer.loop import ieee_float32

    torch.backends.cuda.matmul.fp32_precision = "tf32"  # a user who opted in
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    with ieee_float32():
        assert _precisions() == ("ieee", "ieee", "ieee")
    assert _precisions() == ("tf32", "tf32", "ieee")
    with pytest.raises(RuntimeError, match="inside"):
        with ieee_float32():
            raise RuntimeError("inside")
    assert _precisions() == ("tf32", "tf32", "ieee")


@pytest.mark.parametrize("method", ["lowrank", "autograd"])
def test_refinement_runs_without_tf32(tf32_flags, monkeypatch, method):
    import discli.infer.loop as inference

    seen = []
    real = {"lowrank": inference._refine_lowrank, "autograd": inference._refine_autograd}[method]

    def spy(*args, **kwargs):
        seen.append(_precisions())
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, f"_refine_{method}", spy)
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    result = inference.infer(tiny_model(3, 8), torch.randn(1, 3, 32, 32), 2,
                             inference.InferenceConfig(method=method))
    assert seen == [("ieee", "ieee", "ieee")] and result.losses.shape == (1, 3)
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
