"""The mirrored-shard writer's pipeline: the next tensor is read while this one is transformed and the one before
is written, in memory reused from tensor to tensor, and the output is the same whatever the timing."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from builders import write_safetensors_pair
from safetensors.torch import load_file

from deltakit.io import mirror
from deltakit.io.checkpoint import Checkpoint, open_checkpoint


def _checkpoint(tmp_path, count: int, shards: int):
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((64, 32), float(i), dtype=torch.bfloat16)
               for i in range(count)}
    tensors |= {f"model.layers.{i}.input_layernorm.weight": torch.full((32,), -float(i)) for i in range(count)}
    base_dir, _ = write_safetensors_pair(tmp_path, tensors, tensors, shards=shards)
    return open_checkpoint(base_dir), tensors


def _doubled(name, stored, dtype):
    return stored.mul_(2).to(dtype)  # in place, as merge's transform writes over the tensor's own bytes


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_output_is_the_same_whatever_the_timing(tmp_path, monkeypatch, dtype):
    ckpt, tensors = _checkpoint(tmp_path, count=24, shards=3)
    changed = {n for n in tensors if "up_proj" in n}
    jitter = random.Random(0)
    real_read, real_write = Checkpoint.get_stored, mirror._MirroredShard.write

    def slow_read(self, name):
        time.sleep(jitter.random() * 0.003)
        return real_read(self, name)

    def slow_write(self, name, tensor):
        time.sleep(jitter.random() * 0.003)  # a write still in flight must keep its buffer
        return real_write(self, name, tensor)

    monkeypatch.setattr(Checkpoint, "get_stored", slow_read)
    monkeypatch.setattr(mirror._MirroredShard, "write", slow_write)
    out = tmp_path / "out"
    out.mkdir()
    result = mirror.write_mirror(ckpt, out, changed, _doubled, dtype=dtype, progress=False, desc="test")
    assert result.unchanged == len(tensors) - len(changed)
    written = {}
    for path in out.glob("*.safetensors"):
        written |= load_file(path)
    for name, value in tensors.items():
        expected = value * 2 if name in changed else value
        assert torch.equal(written[name], expected.to(dtype or value.dtype)), name


def test_next_tensor_is_read_while_this_one_is_transformed(tmp_path, monkeypatch):
    ckpt, tensors = _checkpoint(tmp_path, count=3, shards=1)
    changed = [n for n in tensors if "up_proj" in n]
    second_read = threading.Event()
    real_read = Checkpoint.get_stored

    def read(self, name):
        if name == changed[1]:
            second_read.set()
        return real_read(self, name)

    def transform(name, stored, dtype):
        if name == changed[0]:
            # Read in line, the second tensor would only be read after this returns: waiting would time out.
            assert second_read.wait(timeout=30), "the next tensor was not read ahead"
        return _doubled(name, stored, dtype)

    monkeypatch.setattr(Checkpoint, "get_stored", read)
    out = tmp_path / "out"
    out.mkdir()
    mirror.write_mirror(ckpt, out, set(changed), transform, dtype=None, progress=False, desc="test")
