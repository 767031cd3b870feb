"""Checkpoints: --fsdp writes sharded ones (DCP, a folder per step) that resume exactly and on
another number of ranks, with the EMA weights whole in checkpoint.pt for sample.py; a full disk
ends a write with one line, no partial file, the previous checkpoint kept (plain, sharded,
samples, statistics)."""

import contextlib
import errno
import io
import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import common
import sample
import train_flow
from tarflow import load_flow
# the toy data and stage 1 (pytest fixtures) of test_train
from test_train import (assert_equal_states, cli, flow_args, load, max_diff, run,  # noqa: F401
                        stage1, toy)


def shards_of(out):
    """The flow's, the EMA's and AdamW's states of out's sharded checkpoint, as one process reads
    them (DCP's own conversion to a torch.save file)."""
    record = load(out / "checkpoint.pt")
    dcp_to_torch_save(out / record["shards"], out / "shards.pt")
    return record, load(out / "shards.pt")


def train(args, capsys):
    """train_flow.py in this process (--fsdp: a process group of one); exit status, stderr."""
    code, err = cli(train_flow, args, capsys)
    if dist.is_initialized():  # left by a failed run (run_cli does not clean up after errors)
        dist.destroy_process_group()
    return code, err


def fsdp_run(toy, stage1, out, capsys, extra=()):
    return train(flow_args(toy, stage1, out, ["--fsdp", "--grid-every", 0, *extra]), capsys)


def test_sharded_checkpoints_resume_exactly_and_on_another_number_of_ranks(toy, stage1, capsys):
    """1 process --fsdp, 9 steps uninterrupted == 4 steps + --resume, bit for bit (flow, EMA,
    AdamW); the step-4 checkpoint resumed on 2 processes up to step 6, then on 1, reaches the same
    weights up to the summation order. The layout: checkpoint.pt (record + EMA whole, loadable by
    load_flow) and one shards-<step>/ folder (a file per rank and DCP's .metadata)."""
    assert fsdp_run(toy, stage1, toy / "c1", capsys)[0] == 0
    assert fsdp_run(toy, stage1, toy / "c1r", capsys, ["--max-steps", 4])[0] == 0
    shutil.copytree(toy / "c1r", toy / "c12")
    assert fsdp_run(toy, stage1, toy / "c1r", capsys, ["--resume"])[0] == 0
    whole, states = shards_of(toy / "c1")
    resumed, resumed_states = shards_of(toy / "c1r")
    assert whole["step"] == resumed["step"] == 9
    assert sorted(os.listdir(toy / "c1")) == ["checkpoint.pt", "log.jsonl", "shards-0000009",
                                              "shards.pt"]
    assert sorted(os.listdir(toy / "c1" / "shards-0000009")) == [".metadata", "__0_0.distcp"]
    assert "flow" not in whole and "optimizer" not in whole
    for key in ("flow", "flow_ema"):
        assert_equal_states(states[key], resumed_states[key])
    assert_equal_states(whole["flow_ema"], states["flow_ema"])
    adam = states["optimizer"]["state"]
    assert adam.keys() == states["flow"].keys()
    for name, moments in adam.items():
        assert_equal_states(moments, resumed_states["optimizer"]["state"][name])
    flow, record = load_flow(str(toy / "c1" / "checkpoint.pt"))
    with pytest.raises(common.UserError, match="holds no raw weights .'flow'.; an --fsdp run keeps"):
        load_flow(str(toy / "c1" / "checkpoint.pt"), ema=False)
    assert_equal_states(flow.state_dict(), whole["flow_ema"])
    assert record["shards"] == "shards-0000009"

    # 1 -> 2 -> 1 processes: the step-4 checkpoint resumed on 2 up to the epoch's end, then on 1
    extra = ["--fsdp", "--grid-every", 0, "--max-steps", 6, "--resume"]
    run("train_flow.py", flow_args(toy, stage1, toy / "c12", extra), nproc=2)
    assert sorted(os.listdir(toy / "c12")) == ["checkpoint.pt", "log.jsonl", "shards-0000006"]
    assert sorted(os.listdir(toy / "c12" / "shards-0000006")) == [".metadata", "__0_0.distcp",
                                                                  "__1_0.distcp"]
    assert fsdp_run(toy, stage1, toy / "c12", capsys, ["--resume"])[0] == 0
    record, other = shards_of(toy / "c12")
    assert record["step"] == 9 and record["world_size"] == 1
    for key in ("flow", "flow_ema"):
        assert max_diff(states[key], other[key]) < 1e-4, key


class FullDisk(io.FileIO):
    """A file on a disk that fills after `room` bytes."""
    room = 1000

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def full_disk_open(path, mode="r", *args, **kwargs):
    """open() whose .tmp files (atomic_write's) find the disk full."""
    if str(path).endswith(".tmp") and "w" in mode:
        f = FullDisk(path, mode.replace("b", ""))
        return f if "b" in mode else io.TextIOWrapper(f)
    return open(path, mode, *args, **kwargs)


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_full_disk_keeps_the_previous_file_in_one_line(tmp_path, monkeypatch):
    """atomic_write's writers (torch.save, json, np.savez, PNG) and its rename on a full disk:
    a UserError naming the file and the space, the .tmp gone, the earlier file intact."""
    path = str(tmp_path / "checkpoint.pt")
    common.save_checkpoint(dict(step=1, w=torch.ones(10)), path)
    monkeypatch.setattr(common, "open", full_disk_open, raising=False)
    writes = {
        "checkpoint.pt": lambda p: common.save_checkpoint(dict(step=2, w=torch.ones(10**4)), p),
        "stats.json": lambda p: common.save_json(dict(x=list(range(1000))), p),
        "samples.npz": lambda p: common.atomic_write(
            p, lambda f: np.savez(f, arr_0=np.zeros((10, 32, 32, 3), np.uint8))),
        "grid.png": lambda p: common.save_grid(torch.rand(4, 3, 32, 32), p),
    }
    for name, write in writes.items():
        with pytest.raises(common.UserError) as e:
            write(str(tmp_path / name))
        line = str(e.value)
        assert line.startswith(f"{tmp_path / name}: no space left on device (it needs ")
        assert " free)" in line and "\n" not in line
        assert not os.path.exists(tmp_path / (name + ".tmp"))
    assert load(path)["step"] == 1
    monkeypatch.undo()

    def replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.os, "replace", replace)
    with pytest.raises(common.UserError, match="the previous checkpoint.pt is kept$"):
        common.save_checkpoint(dict(step=3, w=torch.ones(10)), path)
    assert load(path)["step"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]


def full_disk_stream(self, path, mode):
    """DCP's FileSystem.create_stream on a full disk."""
    return contextlib.nullcontext(FullDisk(path, mode.replace("b", "")))


@pytest.mark.parametrize("fsdp", [False, True])
def test_full_disk_ends_training_in_one_line_and_keeps_the_checkpoint(toy, stage1, fsdp, capsys,
                                                                      monkeypatch):
    """A checkpoint write that fills the disk (checkpoint.pt; under --fsdp the shards) ends the
    run with one line; the partial file or folder is gone and the step-2 checkpoint resumes."""
    out = toy / f"full{int(fsdp)}"
    mode = ["--fsdp"] if fsdp else []
    args = flow_args(toy, stage1, out, [*mode, "--grid-every", 0, "--max-steps", 2])
    assert train(args, capsys)[0] == 0
    if fsdp:
        monkeypatch.setattr(filesystem.FileSystem, "create_stream", full_disk_stream)
    else:
        monkeypatch.setattr(common, "open", full_disk_open, raising=False)
    args = flow_args(toy, stage1, out, [*mode, "--grid-every", 0, "--max-steps", 4, "--resume"])
    code, err = train(args, capsys)
    line = one_error_line(err)
    # (the epoch ends at step 3)
    target = out / ("shards-0000003" if fsdp else "checkpoint.pt")
    assert code == 2 and line.startswith(f"error: {target}: no space left on device (it needs ~")
    assert line.endswith("free); the previous checkpoint.pt is kept"), line
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    assert load(out / "checkpoint.pt")["step"] == 2
    monkeypatch.undo()
    assert train(args, capsys)[0] == 0
    assert load(out / "checkpoint.pt")["step"] == 4


def test_sample_npz_on_a_full_disk_is_one_line(toy, stage1, capsys, monkeypatch):
    """sample.py's samples.npz through atomic_write: one line, no .tmp left."""
    out = toy / "fulls"
    args = flow_args(toy, stage1, toy / "s2small", ["--grid-every", 0, "--max-steps", 1])
    assert cli(train_flow, args, capsys)[0] == 0
    monkeypatch.setattr(common, "open", full_disk_open, raising=False)
    argv = ["--ckpt", toy / "s2small" / "checkpoint.pt", "--out", out, "--num-samples", 2,
            "--no-png", "--no-progress", "--device", "cpu"]
    code, err = cli(sample, argv, capsys)
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: {out / 'samples.npz'}: no space left on device")
    assert os.listdir(out) == []
