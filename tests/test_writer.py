"""The streaming safetensors writer and atomic outputs.

Every file we write must read back with safetensors itself, bit for bit, and be byte-identical to
``safetensors.torch.save`` when tensors come in the order safetensors uses. No output may ever appear
half-written under its final name, and running out of room is a typed, one-line error.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save

from deltakit.io.dtypes import DTYPE_NAMES
from deltakit.io.checkpoint import open_checkpoint
from deltakit.errors import (
    InvalidOptionError,
    OutputExistsError,
    OutputWriteError,
    TensorMismatchError,
    TensorMissingError,
)
from deltakit.io.writer import SafetensorsWriter, save_tensors, staged_output, write_json, write_text

SHAPES = [(), (0,), (3, 0), (1,), (3, 5), (2, 3, 4)]


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaNs and all) for every dtype, so a round trip has to be bit-exact to pass."""
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _hidden_siblings(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("dtype", list(DTYPE_NAMES), ids=lambda d: DTYPE_NAMES[d])
def test_round_trip_through_safetensors_is_bit_exact_for_every_dtype(tmp_path, dtype):
    tensors = {f"t{i}": _random_tensor(dtype, shape, seed=i) for i, shape in enumerate(SHAPES)}
    path = tmp_path / "out.safetensors"
    save_tensors(path, tensors)

    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype
        assert loaded[name].shape == tensor.shape
        assert _bits(loaded[name]) == _bits(tensor), name
    ckpt = open_checkpoint(path)
    assert list(ckpt) == list(tensors)  # laid out in mapping order
    for name, tensor in tensors.items():
        assert _bits(ckpt.get(name)) == _bits(tensor)


def test_bytes_match_safetensors_when_given_its_order(tmp_path):
    # safetensors lays tensors out by its Dtype enum, descending (roughly largest first; F8_E4M3 before BOOL),
    # then by name; given that order, the files must be byte-identical. One metadata key only: safetensors
    # writes several in hash-map (random) order.
    tensors = {
        "z.f64": _random_tensor(torch.float64, (3,)),
        "a.f32": _random_tensor(torch.float32, (2, 2)),
        "b.empty": _random_tensor(torch.float32, (0, 4)),
        "scalar": _random_tensor(torch.float32, ()),
        "a.bf16": _random_tensor(torch.bfloat16, (5,)),
        "b.f16": _random_tensor(torch.float16, (1, 3)),
        "é.unicode": _random_tensor(torch.float16, (1,)),
        "q": _random_tensor(torch.float8_e4m3fn, (3,)),
        "mask": _random_tensor(torch.bool, (7,)),
    }
    path = tmp_path / "ours.safetensors"
    save_tensors(path, tensors, metadata={"format": "pt"})
    assert path.read_bytes() == save(tensors, metadata={"format": "pt"})

    # In another order safetensors re-sorts, so the bytes differ while the content is the same.
    shuffled = dict(reversed(list(tensors.items())))
    save_tensors(path, shuffled, metadata={"format": "pt"})
    assert path.read_bytes() != save(shuffled, metadata={"format": "pt"})
    assert list(open_checkpoint(path)) == list(shuffled)
    assert all(_bits(load_file(path)[n]) == _bits(t) for n, t in tensors.items())


def test_bytes_match_safetensors_for_every_dtype_in_its_own_layout_order(tmp_path):
    tensors = {
        f"{DTYPE_NAMES[dtype]}.{i}": _random_tensor(dtype, shape, seed=i)
        for dtype in DTYPE_NAMES
        for i, shape in enumerate(SHAPES[:4])
    }
    reference = tmp_path / "reference.safetensors"
    reference.write_bytes(save(tensors))
    in_safetensors_order = {name: tensors[name] for name in open_checkpoint(reference)}
    path = tmp_path / "ours.safetensors"
    save_tensors(path, in_safetensors_order)
    assert path.read_bytes() == reference.read_bytes()


def test_header_is_padded_so_data_starts_8_byte_aligned(tmp_path):
    path = tmp_path / "out.safetensors"
    for name_length in range(1, 10):
        save_tensors(path, {"x" * name_length: torch.ones(1)}, metadata={"k": "v"})
        data = path.read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        assert header_len % 8 == 0
        header = data[8 : 8 + header_len]
        assert header.startswith(b'{"__metadata__":{"k":"v"},')
        assert header.rstrip(b" ").endswith(b"}")


def test_streams_tensors_one_by_one_in_spec_order(tmp_path):
    path = tmp_path / "out.safetensors"
    specs = [("w", torch.float16, (4, 2)), ("b", torch.float32, (4,))]
    w, b = _random_tensor(torch.float16, (2, 4)).T, _random_tensor(torch.float32, (4,))  # w is non-contiguous
    with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
        writer.write("w", w)
        assert not path.exists()  # nothing under the final name until close
        writer.write("b", b)
    loaded = load_file(path)
    assert _bits(loaded["w"]) == _bits(w) and _bits(loaded["b"]) == _bits(b)


@pytest.mark.parametrize(
    ("name", "tensor", "error", "words"),
    [
        ("b", torch.zeros(2), TensorMismatchError, "out of order"),
        ("nope", torch.zeros(2, 3), TensorMissingError, "not in this file's header"),
        ("a", torch.zeros(3, 2), TensorMismatchError, "shape"),
        ("a", torch.zeros(2, 3, dtype=torch.float64), TensorMismatchError, "dtype"),
    ],
    ids=["out-of-order", "unknown-name", "wrong-shape", "wrong-dtype"],
)
def test_bad_write_raises_typed_error_naming_tensor_and_writes_nothing(tmp_path, name, tensor, error, words):
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, [("a", torch.float32, (2, 3)), ("b", torch.float32, (2,))])
    with pytest.raises(error) as caught:
        writer.write(name, tensor)
    assert caught.value.tensor == name and caught.value.path == path
    assert words in str(caught.value)
    # The writer is still usable: the failed write added no bytes.
    writer.write("a", torch.ones(2, 3))
    writer.write("b", torch.ones(2))
    writer.close()
    assert torch.equal(load_file(path)["a"], torch.ones(2, 3))


def test_close_with_missing_tensors_raises_and_leaves_no_file(tmp_path):
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,)), ("c", torch.int8, ())])
    writer.write("a", torch.ones(2))
    with pytest.raises(TensorMissingError, match=r"2 tensor\(s\) never written: b, c") as caught:
        writer.close()
    assert caught.value.tensor == "b"
    assert list(tmp_path.iterdir()) == []


def test_write_after_all_tensors_raises(tmp_path):
    with SafetensorsWriter(tmp_path / "out.safetensors", [("a", torch.float32, (1,))]) as writer:
        writer.write("a", torch.ones(1))
        with pytest.raises(TensorMissingError, match="already written"):
            writer.write("a", torch.ones(1))


def test_exception_inside_writer_block_keeps_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.safetensors"
    save_tensors(path, {"old": torch.ones(1)})
    with pytest.raises(KeyboardInterrupt):
        with SafetensorsWriter(path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]) as writer:
            writer.write("a", torch.ones(2))
            raise KeyboardInterrupt
    assert list(load_file(path)) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


@pytest.mark.parametrize(
    ("specs", "metadata"),
    [
        ([("a", torch.float32, (1,)), ("a", torch.float32, (1,))], None),
        ([("__metadata__", torch.float32, (1,))], None),
        ([("a", torch.float32, (-1,))], None),
        ([("a", torch.float32, (1,))], {"format": 1}),
    ],
    ids=["repeated-name", "reserved-name", "negative-dim", "non-string-metadata"],
)
def test_invalid_specs_raise_before_creating_a_file(tmp_path, specs, metadata):
    with pytest.raises(InvalidOptionError):
        SafetensorsWriter(tmp_path / "out.safetensors", specs, metadata)
    assert list(tmp_path.iterdir()) == []


def test_write_json_keeps_insertion_order_and_ends_with_newline(tmp_path):
    path = tmp_path / "config.json"
    obj = {"z": 1, "a": [1, 2], "é": "ü"}
    write_json(path, obj)
    text = path.read_text(encoding="utf-8")
    assert text == '{\n  "z": 1,\n  "a": [\n    1,\n    2\n  ],\n  "é": "ü"\n}\n'
    assert json.loads(text) == obj
    write_json(path, [])
    assert path.read_text() == "[]\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_staged_output_moves_complete_directory_into_place(tmp_path):
    final = tmp_path / "nested" / "out"
    with staged_output(final, overwrite=False) as staging_dir:
        assert staging_dir.parent == final.parent
        assert staging_dir.name.startswith(".out.deltakit-tmp-")
        save_tensors(staging_dir / "adapter_model.safetensors", {"a": torch.ones(2)})
        write_json(staging_dir / "adapter_config.json", {"r": 4})
        assert not final.exists()
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _hidden_siblings(final.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


@pytest.mark.parametrize(
    "exception", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)], ids=lambda e: type(e).__name__
)
def test_staged_output_failure_leaves_nothing(tmp_path, exception):
    final = tmp_path / "out"
    with pytest.raises(type(exception)):
        with staged_output(final, overwrite=False) as staging_dir:
            (staging_dir / "partial.safetensors").write_bytes(b"half")
            raise exception
    assert list(tmp_path.iterdir()) == []


def test_staged_output_failure_with_overwrite_keeps_old_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with staged_output(final, overwrite=True) as staging_dir:
            (staging_dir / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (final / "old.txt").read_text() == "old"


def test_staged_output_overwrite_replaces_old_output_entirely(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.txt").write_text("old")
    with staged_output(final, overwrite=True) as staging_dir:
        (staging_dir / "new.txt").write_text("new")
        assert (final / "stale.txt").exists()  # the old output stays whole until the new one is complete
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_output_overwrite_replaces_a_symlink_not_its_target(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    final = tmp_path / "out"
    final.symlink_to(target)
    with staged_output(final, overwrite=True) as staging_dir:
        (staging_dir / "new.txt").write_text("new")
    assert not final.is_symlink() and [p.name for p in final.iterdir()] == ["new.txt"]
    assert (target / "keep.txt").read_text() == "keep"


def test_staged_output_refuses_existing_output_before_any_work(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    body_ran = False
    with pytest.raises(OutputExistsError) as caught:
        with staged_output(final, overwrite=False):
            body_ran = True
    assert not body_ran
    assert caught.value.path == final and caught.value.exit_code == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (final / "old.txt").read_text() == "old"


def test_staged_output_refuses_output_that_appeared_during_the_run(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(OutputExistsError):
        with staged_output(final, overwrite=False) as staging_dir:
            (staging_dir / "new.txt").write_text("new")
            final.mkdir()  # another process got there first
    assert list(final.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- running out of room -------------------------------------------------------------------------------------------

LIMIT = 4096  # bytes any file of this process may grow to inside ``_file_size_limit()``


@contextmanager
def _file_size_limit() -> Iterator[None]:
    """RLIMIT_FSIZE lowered to LIMIT for this process: a write past it fails with EFBIG (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


def _assert_file_size_error(error: OutputWriteError, path) -> None:
    assert error.path == path and error.exit_code == 1
    assert str(error) == (f"{path}: cannot write: the file size limit was hit (file too large for `ulimit -f` or "
                          "the filesystem); raise the limit or choose another --out")
    assert isinstance(error.__cause__, OSError) and error.__cause__.errno == errno.EFBIG


def test_writer_past_file_size_limit_raises_output_write_error_and_keeps_previous_file(tmp_path):
    path = tmp_path / "out.safetensors"
    save_tensors(path, {"old": torch.ones(1)})
    with _file_size_limit(), pytest.raises(OutputWriteError) as caught:
        with SafetensorsWriter(path, [("a", torch.float32, (512,)), ("b", torch.float32, (1024,))]) as writer:
            writer.write("a", torch.ones(512))  # 2 KiB: fits
            writer.write("b", torch.ones(1024))  # 4 KiB more: crosses the limit part-way
    _assert_file_size_error(caught.value, path)
    assert list(load_file(path)) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_writer_discards_its_file_when_a_write_fails_outside_a_with_block(tmp_path, monkeypatch):
    from deltakit.io import direct_file

    monkeypatch.setattr(direct_file, "_STAGING_BYTES", 4096)  # bytes reach the file during write(), not at close
    path = tmp_path / "out.safetensors"
    writer = SafetensorsWriter(path, [("a", torch.float32, (2048,))])
    with _file_size_limit(), pytest.raises(OutputWriteError):
        writer.write("a", torch.ones(2048))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TensorMismatchError, match="already closed"):
        writer.write("a", torch.ones(2048))


@pytest.mark.parametrize("write", [write_json, write_text], ids=lambda f: f.__name__)
def test_write_json_and_write_text_past_limit_keep_previous_file(tmp_path, write):
    path = tmp_path / "file"
    write(path, "old")
    previous = path.read_bytes()
    with _file_size_limit(), pytest.raises(OutputWriteError) as caught:
        write(path, "x" * (2 * LIMIT))
    _assert_file_size_error(caught.value, path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_staged_output_names_the_final_file_not_its_staging_twin(tmp_path):
    final = tmp_path / "out"
    with _file_size_limit(), pytest.raises(OutputWriteError) as caught:
        with staged_output(final, overwrite=False) as staging_dir:
            write_json(staging_dir / "adapter_config.json", {"r": 4})
            save_tensors(staging_dir / "adapter_model.safetensors", {"a": torch.ones(2048)})
    _assert_file_size_error(caught.value, final / "adapter_model.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_staged_output_turns_out_of_room_oserror_from_other_code_into_output_write_error(tmp_path):
    source = tmp_path / "tokenizer.json"
    source.write_bytes(b"x" * (2 * LIMIT))
    final = tmp_path / "outputs" / "out"
    # shutil.copyfile names its destination (OSError.filename2): that file, under the final name, is blamed.
    with _file_size_limit(), pytest.raises(OutputWriteError) as caught:
        with staged_output(final, overwrite=False) as staging_dir:
            shutil.copyfile(source, staging_dir / "tokenizer.json")
    _assert_file_size_error(caught.value, final / "tokenizer.json")
    # A bare write() names no file: the output directory is blamed.
    with _file_size_limit(), pytest.raises(OutputWriteError) as caught:
        with staged_output(final, overwrite=False) as staging_dir:
            (staging_dir / "README.md").write_bytes(b"x" * (2 * LIMIT))
    _assert_file_size_error(caught.value, final)
    assert list(final.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "the disk is full (no space left on device); free some space"),
     (errno.EDQUOT, "the disk quota is exceeded; free some space")],
    ids=["ENOSPC", "EDQUOT"],
)
def test_staged_output_reports_disk_full_and_quota_in_one_line(tmp_path, code, words):
    final = tmp_path / "out"
    with pytest.raises(OutputWriteError) as caught:
        with staged_output(final, overwrite=False) as staging_dir:
            (staging_dir / "partial.bin").write_bytes(b"half")
            raise OSError(code, os.strerror(code))
    assert str(caught.value) == f"{final}: cannot write: {words} or choose another --out"
    assert caught.value.__cause__.errno == code
    assert list(tmp_path.iterdir()) == []


def test_staged_output_keeps_other_oserrors_as_they_are(tmp_path):
    with pytest.raises(PermissionError):
        with staged_output(tmp_path / "out", overwrite=False):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_staging_abandoned_by_a_killed_run_is_removed_and_a_live_one_kept(tmp_path):
    """A run killed outright leaves its staging directory and an unlocked lock file; the next run for the same
    output removes them. A staging directory whose lock is held (a run in progress) is left alone."""
    import fcntl

    out = tmp_path / "out"
    abandoned = tmp_path / ".out.deltakit-tmp-dead"
    (abandoned / "sub").mkdir(parents=True)
    (abandoned / "sub" / "partial.safetensors").write_bytes(b"x" * 100)
    (tmp_path / ".out.deltakit-lock-dead").touch()
    live = tmp_path / ".out.deltakit-tmp-live"
    live.mkdir()
    held = os.open(tmp_path / ".out.deltakit-lock-live", os.O_CREAT | os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    other = tmp_path / ".other.deltakit-tmp-dead"  # another output's: not ours to judge
    other.mkdir()
    (tmp_path / ".other.deltakit-lock-dead").touch()
    try:
        with staged_output(out, overwrite=False) as staging:
            (staging / "a").write_text("a")
    finally:
        os.close(held)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.deltakit-lock-dead", ".other.deltakit-tmp-dead", ".out.deltakit-lock-live",
        ".out.deltakit-tmp-live", "out"]
    assert sorted(p.name for p in out.iterdir()) == ["a"]
