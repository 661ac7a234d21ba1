"""Opening checkpoints lazily: every Hugging Face layout, header-only listing, bit-exact reads, typed errors.

Checkpoints here are written with safetensors itself (and torch.save for legacy .bin), so the reader is
checked against the reference writer, not against our own.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from builders import refuse_direct
from safetensors.torch import save_file

from deltakit.io import buffers
from deltakit.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint, plan_reads, read_safetensors_header
from deltakit.io.dtypes import SAFETENSORS_DTYPES
from deltakit.io.page_cache import cached_fraction
from deltakit.errors import (
    HubUnavailableError,
    CheckpointFormatError,
    CheckpointLayoutError,
    CheckpointNotFoundError,
    TensorMissingError,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(11, 6, generator=generator).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(6, 6, generator=generator).to(torch.float16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(6, generator=generator),
        "model.layers.0.input_layernorm.weight": torch.randn(6, generator=generator),
        "model.norm.weight": torch.randn(6, generator=generator).to(torch.bfloat16),
        "lm_head.weight": torch.randn(11, 6, generator=generator).to(torch.float16),
        "model.position_ids": torch.arange(7),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 6),
    }


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assert_same(ckpt: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert set(ckpt) == set(tensors) and len(ckpt) == len(tensors)
    for name, expected in tensors.items():
        got = ckpt.get(name)
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert _bits(got) == _bits(expected), name


def _write_sharded(ckpt_dir, tensors, prefix: str, n_shards: int, *, metadata=None) -> list[str]:
    """Split tensors round-robin into HF-named shards plus index; returns the shard file names."""
    ckpt_dir.mkdir(exist_ok=True)
    names = [f"{prefix}-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)]
    weight_map = {name: names[i % n_shards] for i, name in enumerate(tensors)}
    for shard in names:
        save_file({n: t for n, t in tensors.items() if weight_map[n] == shard}, ckpt_dir / shard, metadata=metadata)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (ckpt_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index))
    return names


def _status_kib(*fields: str) -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in fields:
                values[key] = int(value.split()[0])
    return values


def _write_sparse_safetensors(path, entries: dict[str, tuple[str, list[int], int]]) -> int:
    """A safetensors file whose data section is a hole (zeros, no disk blocks); returns the data start."""
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        file.truncate(8 + len(encoded) + offset)
    return 8 + len(encoded)


# --- layouts -------------------------------------------------------------------------------------------------


def test_single_file(tmp_path):
    tensors = _tensors()
    path = tmp_path / "weights.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    ckpt = open_checkpoint(str(path))
    assert ckpt.path == path and ckpt.files == (path,) and ckpt.index_path is None
    assert ckpt.header(path).metadata == {"format": "pt"}
    _assert_same(ckpt, tensors)
    assert ckpt.total_nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_directory_with_model_safetensors_and_config(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 6}))
    (tmp_path / "training_args.bin").write_bytes(b"a pickle we must never load")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.files == (tmp_path / "model.safetensors",)
    assert ckpt.config == {"model_type": "llama", "hidden_size": 6}
    _assert_same(ckpt, tensors)


def test_directory_without_config_has_none(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    assert open_checkpoint(tmp_path).config is None


def test_malformed_config_raises_format_error(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(tmp_path).config
    assert caught.value.path == tmp_path / "config.json"


def test_sharded_with_diffusers_prefix_mixed_dtypes(tmp_path):
    tensors = _tensors()
    shards = _write_sharded(tmp_path, tensors, "diffusion_pytorch_model", 3, metadata={"format": "pt"})
    ckpt = open_checkpoint(tmp_path)
    assert shards[0] == "diffusion_pytorch_model-00001-of-00003.safetensors"
    assert ckpt.files == tuple(tmp_path / s for s in shards)
    assert ckpt.index_path == tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    assert {info.dtype for info in ckpt.tensors.values()} >= {torch.bfloat16, torch.float16, torch.float32}
    for shard in shards:
        assert ckpt.header(tmp_path / shard).metadata == {"format": "pt"}
    _assert_same(ckpt, tensors)


def test_iteration_is_file_order_then_data_order(tmp_path):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors, "model", 2)
    ckpt = open_checkpoint(tmp_path)
    infos = [ckpt.info(name) for name in ckpt]
    positions = [(ckpt.files.index(info.file), info.start) for info in infos]
    assert positions == sorted(positions)
    assert list(ckpt.tensors) == list(ckpt)
    for file in ckpt.files:
        header = ckpt.header(file)
        assert [i.start for i in header.tensors.values()] == sorted(i.start for i in header.tensors.values())
        assert all(info.file == file for info in header.tensors.values())


def test_tensor_info_offsets_locate_the_bytes(tmp_path):
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    data = path.read_bytes()
    header = read_safetensors_header(path)
    (header_len,) = struct.unpack("<Q", data[:8])
    assert header.data_start == 8 + header_len
    for name, info in header.tensors.items():
        assert isinstance(info, TensorInfo) and info.end - info.start == info.nbytes
        assert info.numel == tensors[name].numel()
        assert data[info.start : info.end] == _bits(tensors[name])


@pytest.mark.parametrize("dtype_name", list(SAFETENSORS_DTYPES))
def test_every_dtype_reads_bit_exact(tmp_path, dtype_name):
    dtype = SAFETENSORS_DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        tensor = torch.randint(0, 2, (5, 3), generator=generator).bool()
    else:  # random bit patterns, NaNs included: only a bit-exact read passes
        raw = torch.randint(0, 256, (5 * 3 * dtype.itemsize,), dtype=torch.uint8, generator=generator)
        tensor = raw.view(dtype).reshape(5, 3)
    save_file({"t": tensor}, tmp_path / "model.safetensors")
    got = open_checkpoint(tmp_path).get("t")
    assert got.dtype == dtype and _bits(got) == _bits(tensor)


def test_get_returns_fresh_writable_tensors(tmp_path):
    save_file({"w": torch.ones(3)}, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    first = ckpt.get("w")
    first.add_(1)
    assert torch.equal(ckpt.get("w"), torch.ones(3))


def test_directory_prefers_model_safetensors_over_other_files(tmp_path):
    # Mistral-style repos ship consolidated.safetensors beside model.safetensors; transformers reads the latter.
    save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    save_file({"b": torch.ones(1)}, tmp_path / "consolidated.safetensors")
    assert list(open_checkpoint(tmp_path)) == ["a"]


def test_directory_with_one_unconventionally_named_file(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "unet.safetensors")
    assert open_checkpoint(tmp_path).files == (tmp_path / "unet.safetensors",)


def test_index_wins_over_unindexed_files(tmp_path):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors, "model", 2)
    save_file({"other": torch.ones(1)}, tmp_path / "consolidated.safetensors")
    assert set(open_checkpoint(tmp_path)) == set(tensors)


# --- layout errors -------------------------------------------------------------------------------------------


def test_index_naming_a_missing_shard_names_the_file(tmp_path):
    shards = _write_sharded(tmp_path, _tensors(), "model", 3)
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointLayoutError, match="missing") as caught:
        open_checkpoint(tmp_path)
    assert caught.value.path == tmp_path / shards[1]


def test_tensor_in_two_shards_is_refused(tmp_path):
    tensors = _tensors()
    shards = _write_sharded(tmp_path, tensors, "model", 2)
    # Put a tensor the index assigns to shard 1 into shard 2 as well.
    name = next(iter(tensors))
    second = {n: t for n, t in tensors.items() if list(tensors).index(n) % 2 == 1}
    save_file({**second, name: tensors[name]}, tmp_path / shards[1])
    with pytest.raises(CheckpointLayoutError, match="two shards") as caught:
        open_checkpoint(tmp_path)
    assert caught.value.tensor == name


def test_index_listing_a_tensor_absent_from_its_shard(tmp_path):
    tensors = _tensors()
    shards = _write_sharded(tmp_path, tensors, "model", 2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = shards[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointLayoutError) as caught:
        open_checkpoint(tmp_path)
    assert caught.value.tensor == "ghost.weight" and caught.value.path == tmp_path / shards[0]


def test_index_placing_a_tensor_in_the_wrong_shard(tmp_path):
    tensors = _tensors()
    shards = _write_sharded(tmp_path, tensors, "model", 2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(tensors))
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointLayoutError, match=f"says it is in {shards[1]}") as caught:
        open_checkpoint(tmp_path)
    assert caught.value.tensor == name


def test_shard_holding_unindexed_tensors(tmp_path):
    tensors = _tensors()
    _write_sharded(tmp_path, tensors, "model", 2)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["scalar"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointLayoutError, match="not listed in the index: scalar"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "index",
    [
        "not json",
        "[]",
        '{"weight_map": {}}',
        '{"weight_map": {"a": 3}}',
        '{"weight_map": {"a": "../outside.safetensors"}}',
        '{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}',
    ],
    ids=["not-json", "not-object", "empty", "non-string-shard", "path-escape", "duplicate-key"],
)
def test_malformed_index_raises_format_error(tmp_path, index):
    save_file({"a": torch.ones(1)}, tmp_path / "x.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(tmp_path)
    assert caught.value.path == tmp_path / "model.safetensors.index.json"


def test_several_unindexed_weight_files_are_refused(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(1)}, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointLayoutError, match="several weight files and no index") as caught:
        open_checkpoint(tmp_path)
    assert "index is missing" in str(caught.value) and caught.value.path == tmp_path


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    save_file({"a": torch.ones(1)}, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointNotFoundError, match=r"no \*\.safetensors or pytorch_model\*\.bin weights") as caught:
        open_checkpoint(tmp_path)
    assert isinstance(caught.value, FileNotFoundError)
    assert "subdirectories with weights: unet" in str(caught.value)


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as caught:
        open_checkpoint(tmp_path / "nope")
    assert caught.value.path == tmp_path / "nope"
    # A name of the form org/name that is not a local path is a Hub id; offline and uncached, it says both.
    with pytest.raises(HubUnavailableError, match="not a local path"):
        open_checkpoint("org/not-a-local-path")


def test_non_weights_file_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="not a .safetensors or .bin"):
        open_checkpoint(tmp_path / "config.json")


def test_missing_tensor_names_checkpoint_and_tensor(tmp_path):
    save_file({"model.norm.weight": torch.ones(1)}, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    assert "model.norm.weight" in ckpt and "model.norm.bias" not in ckpt
    with pytest.raises(TensorMissingError) as caught:
        ckpt.get("model.norm.bias")
    error = caught.value
    assert isinstance(error, KeyError)
    assert error.path == tmp_path and error.tensor == "model.norm.bias"
    assert str(error) == (
        f"{tmp_path}: model.norm.bias: no such tensor in this checkpoint; did you mean model.norm.weight?"
    )


def test_header_of_unknown_file_is_refused(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointNotFoundError):
        open_checkpoint(tmp_path).header(tmp_path / "other.safetensors")


# --- lazy reading and memory ---------------------------------------------------------------------------------


def test_listing_a_64_gib_checkpoint_reads_no_tensor_data(tmp_path):
    """The file is sparse: listing it costs one header read, and a small tensor after the huge one reads alone."""
    path = tmp_path / "model.safetensors"
    huge = 64 * 2**30
    data_start = _write_sparse_safetensors(path, {"huge": ("U8", [huge], huge), "small": ("F32", [4], 16)})
    with open(path, "r+b") as file:
        file.seek(data_start + huge)
        file.write(torch.arange(4, dtype=torch.float32).numpy().tobytes())
    before = _status_kib("RssAnon")["RssAnon"]
    read_before = _bytes_read()
    ckpt = open_checkpoint(path)
    small = ckpt.get("small")
    assert _bytes_read() - read_before < 1 << 20  # the header and 16 bytes, not the 64 GiB before them
    assert _status_kib("RssAnon")["RssAnon"] - before < 16 * 1024
    assert ckpt.info("huge").nbytes == huge and ckpt.total_nbytes == huge + 16
    assert torch.equal(small, torch.arange(4, dtype=torch.float32))


def test_reading_a_tensor_holds_about_its_size_in_anonymous_memory(tmp_path):
    """get() reads into memory sized like the tensor: peak RSS grows by ~1x its size, never 2x or page cache."""
    size = 200 * 2**20
    path = tmp_path / "model.safetensors"
    _write_sparse_safetensors(path, {"w": ("F32", [size // 4], size)})
    ckpt = open_checkpoint(path)
    before = _status_kib("VmRSS", "RssAnon")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    tensor = ckpt.get("w")
    after = _status_kib("VmHWM", "RssAnon")
    size_kib = size // 1024
    assert after["RssAnon"] - before["RssAnon"] > 0.95 * size_kib  # the tensor is in our own memory...
    assert after["VmHWM"] - before["VmRSS"] < 1.1 * size_kib + 16 * 1024  # ...and nothing else of its size was
    assert tensor.shape == (size // 4,) and not tensor.any()
    del tensor


def test_file_truncated_after_opening_raises_format_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(100)}, path)
    ckpt = open_checkpoint(path)
    assert list(ckpt) == ["a", "b"]  # b's bytes come last
    os.truncate(path, os.path.getsize(path) - 10)
    assert torch.equal(ckpt.get("a"), torch.ones(4))
    with pytest.raises(CheckpointFormatError, match="truncated") as caught:
        ckpt.get("b")
    assert caught.value.path == path and caught.value.tensor == "b"


# --- header validation ---------------------------------------------------------------------------------------


def _raw_file(path, header: bytes | str | None, data: bytes = b"", length: int | None = None):
    """Length field + header + data; with no header, just the data."""
    if header is None:
        path.write_bytes(data)
        return path
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    ("header", "data", "length", "words"),
    [
        (None, b"\x02\x00\x00", None, "too short"),
        ("{}", b"", 10**15, "exceeds"),
        (b"\xff\xfe{}", b"", None, "not UTF-8"),
        ("{not json", b"", None, "not valid JSON"),
        ("[1, 2]", b"", None, "not an object"),
        (json.dumps({"a": [1]}), b"", None, "not an object"),
        (json.dumps({"a": _entry(dtype="F4")}), b"0000", None, "unknown dtype 'F4'"),
        (json.dumps({"a": _entry(shape=(-1,))}), b"0000", None, "non-negative integers"),
        (json.dumps({"a": _entry(shape=(True,))}), b"0000", None, "non-negative integers"),
        (json.dumps({"a": _entry(shape=(1.0,))}), b"0000", None, "non-negative integers"),
        (json.dumps({"a": _entry(offsets=(4, 0))}), b"0000", None, "0 <= begin <= end"),
        (json.dumps({"a": _entry(offsets=(0, 4, 8))}), b"0000", None, "0 <= begin <= end"),
        (json.dumps({"a": _entry(shape=(2,))}), b"0000", None, "needs 8 bytes"),
        (json.dumps({"a": _entry(shape=(10**15,), offsets=(0, 4 * 10**15))}), b"0000", None, "beyond the end"),
        (json.dumps({"a": _entry(shape=(2**20, 2**20), offsets=(0, 4))}), b"0000", None, "more bytes than the file"),
        (json.dumps({"a": _entry(shape=(2**62, 2**62, 0), offsets=(0, 0))}), b"", None, "too large for torch"),
        (json.dumps({"a": _entry(), "b": _entry()}), b"0000", None, "overlaps tensor a"),
        (json.dumps({"a": _entry(offsets=(4, 8))}), b"00000000", None, "unclaimed bytes"),
        (json.dumps({"a": _entry()}), b"00000000", None, "after the last tensor"),
        (json.dumps({"__metadata__": {"k": 1}}), b"", None, "__metadata__"),
        (json.dumps({"__metadata__": ["k"]}), b"", None, "__metadata__"),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": NaN}}', b"0000", None, "not valid JSON"),
        ('{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"0000", None, "not valid Unicode"),
        ('{"a": ' + json.dumps(_entry()) + ', "a": ' + json.dumps(_entry()) + "}", b"0000", None, "twice"),
        ("[" * 100_000 + "]" * 100_000, b"", None, "not valid JSON"),
    ],
    ids=[
        "empty-file", "length-past-eof", "not-utf8", "not-json", "top-level-list", "entry-not-object",
        "unknown-dtype", "negative-dim", "bool-dim", "float-dim", "begin-after-end", "three-offsets",
        "size-mismatch", "petabyte-tensor", "shape-overflows-file", "shape-overflows-int64", "overlap", "gap",
        "trailing-bytes", "metadata-int-value", "metadata-not-object", "nan", "lone-surrogate", "duplicate-name",
        "deep-nesting",
    ],
)
def test_malformed_header_raises_format_error_naming_the_file(tmp_path, header, data, length, words):
    path = _raw_file(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointFormatError) as caught:
        open_checkpoint(path)
    assert caught.value.path == path
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_header_larger_than_safetensors_limit_is_refused_unread(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", 150_000_000))
        file.truncate(200_000_000)  # sparse
    with pytest.raises(CheckpointFormatError, match="limit of 100000000 bytes"):
        read_safetensors_header(path)


def test_header_tolerates_json_whitespace_like_safetensors(tmp_path):
    header = ' {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\n\t  '
    path = _raw_file(tmp_path / "ws.safetensors", header, b"\x00\x00\x80\x3f")
    assert torch.equal(open_checkpoint(path).get("a"), torch.ones(1))


def test_empty_tensors_may_share_an_offset(tmp_path):
    entries = {"e1": _entry(shape=(0,), offsets=(0, 0)), "a": _entry(), "e2": _entry(shape=(3, 0), offsets=(4, 4))}
    header = json.dumps(entries)
    path = _raw_file(tmp_path / "empty.safetensors", header, b"\x00\x00\x80\x3f")
    ckpt = open_checkpoint(path)
    assert list(ckpt) == ["e1", "a", "e2"]
    assert ckpt.get("e2").shape == (3, 0)


# --- legacy .bin ---------------------------------------------------------------------------------------------


def test_legacy_bin_with_shared_storage(tmp_path):
    tensors = _tensors()
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied: one storage, two names
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    (tmp_path / "training_args.bin").write_bytes(b"not ours to load")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.files == (tmp_path / "pytorch_model.bin",)
    assert ckpt.header(ckpt.files[0]).metadata is None
    _assert_same(ckpt, tensors)
    first = ckpt.get("lm_head.weight")
    first.add_(1)  # a private copy, not a view of the mapped file or of its tied twin
    assert _bits(ckpt.get("model.embed_tokens.weight")) == _bits(tensors["model.embed_tokens.weight"])


def test_legacy_sharded_bin_with_index(tmp_path):
    tensors = _tensors()
    names = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    weight_map = {name: names[i % 2] for i, name in enumerate(tensors)}
    for shard in names:
        torch.save({n: t for n, t in tensors.items() if weight_map[n] == shard}, tmp_path / shard)
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.files == tuple(tmp_path / n for n in names)
    assert ckpt.index_path == tmp_path / "pytorch_model.bin.index.json"
    # Alternate between shards so the one-file-at-a-time cache is exercised.
    for name in sorted(tensors, key=lambda n: weight_map[n] == names[0]):
        assert _bits(ckpt.get(name)) == _bits(tensors[name])
    _assert_same(ckpt, tensors)


def test_legacy_pre_zip_format_loads(tmp_path):
    tensors = {"w": torch.randn(3, 2)}
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same(open_checkpoint(tmp_path), tensors)


def test_safetensors_win_over_bin(tmp_path):
    save_file({"from_safetensors": torch.ones(1)}, tmp_path / "model.safetensors")
    torch.save({"from_bin": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert list(open_checkpoint(tmp_path)) == ["from_safetensors"]


class _Exploit:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "payload": _Exploit(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="unsafe to load") as caught:
        open_checkpoint(tmp_path)
    assert caught.value.path == tmp_path / "pytorch_model.bin"
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [({"w": torch.ones(1), "step": 3}, "not a tensor"), ([torch.ones(1)], "not a state dict")],
    ids=["non-tensor-value", "not-a-dict"],
)
def test_bin_that_is_not_a_state_dict_is_refused(tmp_path, content, words):
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match=words):
        open_checkpoint(tmp_path)


def test_bin_that_is_no_torch_file_raises_format_error(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage" * 50)
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        open_checkpoint(tmp_path)


def test_truncated_bin_raises_format_error(tmp_path):
    torch.save({"w": torch.ones(1000)}, tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        open_checkpoint(tmp_path)


def test_zip_that_is_no_torch_archive_raises_format_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a readable PyTorch checkpoint"):
        open_checkpoint(tmp_path)


def _bytes_read() -> int:
    """Bytes this process has asked read() for so far (``rchar`` of /proc/self/io), cached or not."""
    with open("/proc/self/io") as io_counters:
        return next(int(line.split()[1]) for line in io_counters if line.startswith("rchar:"))


def _read_once(monkeypatch, ckpt) -> None:
    """Plan the checkpoint's reads as for inputs larger than half the memory."""
    from deltakit.io import checkpoint as checkpoint_module

    if checkpoint_module._DROP_CACHE is None:
        pytest.skip("no posix_fadvise here")
    size = sum(f.stat().st_size for f in ckpt.files)
    monkeypatch.setattr(checkpoint_module, "available_memory", lambda: 2 * size - 2)
    monkeypatch.setattr(checkpoint_module, "cached_fraction", lambda path: 1.0)  # large inputs: cached or not
    plan_reads(ckpt)
    assert ckpt.drop_pages and ckpt.read_direct == (set(ckpt.files) if hasattr(os, "O_DIRECT") else set())


def _recording_opens(monkeypatch) -> list[int]:
    """Record the flags of every os.open."""
    flags_seen, real_open = [], os.open

    def fake_open(path, flags, *args, **kwargs):
        flags_seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    return flags_seen


def test_a_large_input_is_read_past_the_page_cache_and_reads_the_same_values(tmp_path, monkeypatch):
    """Inputs larger than memory are read once with O_DIRECT (no kernel copy, nothing to evict), at any offset in
    the file, the last tensor's aligned block running past the end of the file included."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here")
    tensors = {"a.weight": torch.randn(300, 20), "b.weight": torch.randn(7), "c.weight": torch.randn(1500)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    assert not ckpt.read_direct and torch.equal(ckpt.get("a.weight"), tensors["a.weight"])
    _read_once(monkeypatch, ckpt)
    dropped = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, start, length, advice: dropped.append(start))
    flags_seen = _recording_opens(monkeypatch)
    assert {ckpt.info(n).start % 4096 for n in tensors} != {0}  # unaligned starts are the case being tested
    for name, value in tensors.items():
        assert torch.equal(ckpt.get(name), value)
    assert len(flags_seen) == 3 and all(f & os.O_DIRECT for f in flags_seen) and dropped == []


def _two_shards(tmp_path) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    tensors = {"a.weight": torch.randn(300, 20), "b.weight": torch.randn(7)}
    save_file({"a.weight": tensors["a.weight"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b.weight": tensors["b.weight"]}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return open_checkpoint(tmp_path), tensors


@pytest.mark.parametrize("direct", ["allowed", "refused at open"])
def test_an_input_that_fits_in_memory_is_read_past_the_cache_only_where_it_is_not_cached(tmp_path, monkeypatch,
                                                                                        direct):
    """Per file: one mostly not in the page cache is read with O_DIRECT (the kernel's copy and the cache's upkeep
    would take CPU from the math), one mostly cached is read from the cache; no page is ever dropped, and where
    O_DIRECT is refused the file is read through the cache."""
    from deltakit.io import checkpoint as checkpoint_module

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT here")
    ckpt, tensors = _two_shards(tmp_path)
    first, second = ckpt.files
    monkeypatch.setattr(checkpoint_module, "cached_fraction", {first: 0.49, second: 0.5}.get)
    plan_reads(ckpt)
    assert ckpt.read_direct == {first} and not ckpt.drop_pages
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: pytest.fail("pages dropped from a file that fits"))
    refuse_direct(monkeypatch, direct)
    direct_opens, real_open = [], os.open

    def recording_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            direct_opens.append(Path(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    for name, value in tensors.items():
        assert torch.equal(ckpt.get(name), value)
    assert direct_opens == [first]  # asked for the first file only, whether or not it was refused


def test_where_the_page_cache_cannot_be_asked_every_file_is_read_through_it(tmp_path, monkeypatch):
    from deltakit.io import checkpoint as checkpoint_module

    ckpt, tensors = _two_shards(tmp_path)
    monkeypatch.setattr(checkpoint_module, "cached_fraction", lambda path: None)
    plan_reads(ckpt)
    assert not ckpt.read_direct and not ckpt.drop_pages


def test_cached_fraction_is_what_the_page_cache_holds_of_the_file(tmp_path):
    """Read whole, a file is all cached; with its second half's pages dropped, half of it is (where the file system
    drops pages at all: tmpfs keeps them, its pages are the file). 8 MiB, halved at 4 MiB: the kernel caches files in
    folios of up to 2 MiB, and drops only whole ones."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here")
    path, size = tmp_path / "blob", 8 << 20
    path.write_bytes(os.urandom(size))
    with open(path, "rb") as file:
        os.fsync(file.fileno())  # dirty pages are not dropped
        file.read()
        assert cached_fraction(path) == 1.0
        os.posix_fadvise(file.fileno(), size // 2, size // 2, os.POSIX_FADV_DONTNEED)
    after = cached_fraction(path)
    if after == 1.0:
        pytest.skip("this file system keeps a file's pages (tmpfs)")
    assert after == 0.5
    assert cached_fraction(tmp_path / "missing") is None
    (tmp_path / "empty").write_bytes(b"")
    assert cached_fraction(tmp_path / "empty") == 1.0


def test_a_large_input_on_a_file_system_without_o_direct_drops_each_tensors_pages(tmp_path, monkeypatch):
    tensors = {"a.weight": torch.randn(30, 20), "b.weight": torch.randn(7)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    _read_once(monkeypatch, ckpt)
    dropped = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, start, length, advice: dropped.append((start, length, advice)))
    refuse_direct(monkeypatch, "refused at open")
    for name, value in tensors.items():
        assert torch.equal(ckpt.get(name), value)
    info = {name: ckpt.info(name) for name in tensors}
    assert dropped == [(info[n].start, info[n].nbytes, os.POSIX_FADV_DONTNEED) for n in tensors]


def test_a_large_input_with_a_tensor_off_its_element_alignment_is_read_through_the_cache(tmp_path, monkeypatch):
    """A float32 tensor starting at an odd byte cannot be a view of an aligned read: it is read as before."""
    path = tmp_path / "model.safetensors"
    values = torch.randn(5)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [5], "data_offsets": [3, 23]}}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"xyz" + values.numpy().tobytes())
    ckpt = open_checkpoint(path)
    _read_once(monkeypatch, ckpt)
    dropped = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, start, length, advice: dropped.append(start))
    assert torch.equal(ckpt.get("b"), values)
    assert dropped == [ckpt.info("b").start]  # read through the cache, then its pages dropped
    assert torch.equal(ckpt.get("a"), torch.tensor([120, 121, 122], dtype=torch.uint8))


def test_a_large_input_truncated_after_opening_raises_format_error(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(3000)}, path)
    ckpt = open_checkpoint(path)
    _read_once(monkeypatch, ckpt)
    os.truncate(path, os.path.getsize(path) - 10)
    assert torch.equal(ckpt.get("a"), torch.ones(4))
    with pytest.raises(CheckpointFormatError, match="truncated") as caught:
        ckpt.get("b")
    assert caught.value.path == path and caught.value.tensor == "b"


@pytest.mark.parametrize("read_once", [False, True])
def test_read_memory_is_reused_only_once_no_tensor_refers_to_it(tmp_path, monkeypatch, read_once):
    """A tensor that is kept keeps its memory, whatever view of it is kept; memory no tensor refers to any more is
    read into again (no fresh pages to fault in for every tensor)."""
    tensors = {f"w{i}": torch.randn(64, 64) for i in range(3)}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    if read_once:
        _read_once(monkeypatch, ckpt)
    allocated = []
    real_large_buffer = buffers.large_buffer
    monkeypatch.setattr(buffers, "large_buffer", lambda nbytes: allocated.append(nbytes) or real_large_buffer(nbytes))
    kept = ckpt.get("w0")[1:].view(torch.int32).view(-1)  # a view of a view: the first tensor itself is gone
    second = ckpt.get("w1")
    assert second.data_ptr() != kept.data_ptr()
    pointer = second.data_ptr()
    del second
    assert len(allocated) == 2
    third = ckpt.get("w2")
    # The same memory, not merely the same address from the allocator: nothing new was allocated.
    assert len(allocated) == 2 and third.data_ptr() == pointer and torch.equal(third, tensors["w2"])
    assert torch.equal(kept.view(torch.float32).view(63, 64), tensors["w0"][1:])
