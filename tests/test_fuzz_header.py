"""Property tests: every malformed safetensors file raises CheckpointFormatError, never a crash, hang or huge
allocation; and whatever our parser accepts, safetensors itself accepts with the same tensors."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from deltakit.io.dtypes import SAFETENSORS_DTYPES
from deltakit.io.checkpoint import read_safetensors_header
from deltakit.errors import CheckpointFormatError

FUZZ = settings(
    max_examples=200, deadline=2000, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

VALID_FILE = save(
    {
        "w": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "b": torch.tensor([1.5, -2.0]),
        "s": torch.tensor(7, dtype=torch.int64),
        "e": torch.zeros(0, 2, dtype=torch.bfloat16),
        "m": torch.tensor([True, False, True]),
    },
    metadata={"format": "pt"},
)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "case.safetensors"


def _check(path: Path, data: bytes) -> None:
    """Parse ``data``: either a header whose invariants hold and that safetensors agrees with, or our error."""
    path.write_bytes(data)
    try:
        header = read_safetensors_header(path)
    except CheckpointFormatError as e:
        assert e.path == path
        assert "\n" not in str(e)
        return
    # Accepted: the tensors tile the data section exactly, in order, and safetensors reads the same thing.
    position = header.data_start
    for name, info in header.tensors.items():
        assert info.name == name and info.file == path
        assert info.start == position and info.end - info.start == info.nbytes
        position = info.end
    assert position == len(data)
    reference = load(data)
    assert set(reference) == set(header.tensors)
    for name, tensor in reference.items():
        info = header.tensors[name]
        assert (tensor.dtype, tuple(tensor.shape)) == (info.dtype, info.shape)


# --- (a) random bytes and mutations of a valid file ----------------------------------------------------------

_OPS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 16)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("duplicate"), st.integers(0, 10**6), st.integers(1, 32)),
)


def _mutate(data: bytes, ops) -> bytes:
    buffer = bytearray(data)
    for op, position, *args in ops:
        at = position % (len(buffer) + 1)
        if op == "flip" and buffer:
            buffer[at % len(buffer)] ^= 1 << args[0]
        elif op == "truncate":
            del buffer[at:]
        elif op == "insert":
            buffer[at:at] = args[0]
        elif op == "delete":
            del buffer[at : at + args[0]]
        elif op == "overwrite":
            buffer[at : at + len(args[0])] = args[0]
        elif op == "duplicate":
            buffer[at:at] = buffer[at : at + args[0]]
    return bytes(buffer)


@FUZZ
@given(ops=st.lists(_OPS, min_size=1, max_size=4))
def test_mutated_file_parses_or_raises_format_error(scratch, ops):
    _check(scratch, _mutate(VALID_FILE, ops))


@FUZZ
@given(ops=st.lists(_OPS, min_size=1, max_size=3))
def test_mutated_header_with_matching_length_field_parses_or_raises_format_error(scratch, ops):
    """Mutations inside the JSON only, with the length field kept right, so parsing gets past the framing."""
    (header_len,) = struct.unpack("<Q", VALID_FILE[:8])
    header = _mutate(VALID_FILE[8 : 8 + header_len], ops)
    _check(scratch, struct.pack("<Q", len(header)) + header + VALID_FILE[8 + header_len :])


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_parse_or_raise_format_error(scratch, data):
    _check(scratch, data)


@FUZZ
@given(text=st.text(max_size=200), tail=st.binary(max_size=64), length_delta=st.integers(-3, 3))
def test_random_header_text_parses_or_raises_format_error(scratch, text, tail, length_delta):
    """Random text where the JSON goes, with a length field that is right or a few bytes off."""
    header = text.encode("utf-8", "surrogatepass")
    _check(scratch, struct.pack("<Q", max(0, len(header) + length_delta)) + header + tail)


# --- (b) structured malformed headers ------------------------------------------------------------------------

_FINITE_FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # json.dumps writes inf as "Infinity", not JSON
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), _FINITE_FLOATS, st.text(max_size=8))
_NON_STRINGS = _JSON_SCALARS.filter(lambda v: not isinstance(v, str))
_BAD_DIMS = st.one_of(
    st.integers(max_value=-1), st.booleans(), _FINITE_FLOATS, st.text(max_size=4), st.none(), st.just([1])
)


def _valid_entries() -> dict[str, dict]:
    return {
        "w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]},
        "s": {"dtype": "I64", "shape": [], "data_offsets": [20, 28]},
    }


_UNKNOWN_DTYPES = st.one_of(st.text(max_size=12).filter(lambda s: s not in SAFETENSORS_DTYPES), _NON_STRINGS)
_BAD_OFFSETS = st.one_of(
    _JSON_SCALARS, st.lists(_JSON_SCALARS, max_size=3), st.lists(st.integers(-(10**18), 10**18), min_size=2, max_size=2)
)
_BAD_METADATA = st.one_of(
    _JSON_SCALARS.filter(lambda v: v is not None),
    st.dictionaries(st.text(max_size=4), _NON_STRINGS, min_size=1, max_size=3),
)
_CORRUPTIONS = st.one_of(
    st.tuples(st.just("dtype"), _UNKNOWN_DTYPES),
    st.tuples(st.just("shape"), st.one_of(_JSON_SCALARS, st.lists(_BAD_DIMS, min_size=1, max_size=3))),
    st.tuples(st.just("shape-size"), st.lists(st.integers(0, 10**20), max_size=4)),
    st.tuples(st.just("huge-shape"), st.integers(16, 10**30)),
    st.tuples(st.just("offsets"), _BAD_OFFSETS),
    st.tuples(st.just("shift"), st.integers(-28, 28).filter(bool)),
    st.tuples(st.just("drop-key"), st.sampled_from(["dtype", "shape", "data_offsets"])),
    st.tuples(st.just("entry"), _JSON_SCALARS),
    st.tuples(st.just("metadata"), _BAD_METADATA),
    st.tuples(st.just("extra-bytes"), st.integers(1, 64)),
    st.tuples(st.just("missing-bytes"), st.integers(1, 28)),
)


@FUZZ
@given(corruption=_CORRUPTIONS, victim=st.sampled_from(["w", "b", "s"]))
def test_structured_malformed_header_raises_format_error_naming_file(scratch, corruption, victim):
    entries = _valid_entries()
    data_size = 28
    kind, value = corruption
    entry = entries[victim]
    if kind == "dtype":
        entry["dtype"] = value
    elif kind == "shape":
        entry["shape"] = value
    elif kind == "shape-size":
        begin, end = entry["data_offsets"]
        if end - begin == _nbytes(entry["dtype"], value):  # make sure the size is wrong
            value = value + [2]
        entry["shape"] = value
    elif kind == "huge-shape":
        entry["shape"] = [value]
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + _nbytes(entry["dtype"], [value])]
    elif kind == "offsets":
        assume(value != entry["data_offsets"])
        entry["data_offsets"] = value
    elif kind == "shift":  # move one tensor onto its neighbour or off the data: overlap, gap or past the end
        entry["data_offsets"] = [o + value for o in entry["data_offsets"]]
    elif kind == "drop-key":
        del entry[value]
    elif kind == "entry":
        entries[victim] = value
    elif kind == "metadata":
        entries = {"__metadata__": value, **entries}
    elif kind == "extra-bytes":
        data_size += value
    elif kind == "missing-bytes":
        data_size -= value
    header = json.dumps(entries).encode()
    scratch.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_size))
    with pytest.raises(CheckpointFormatError) as caught:
        read_safetensors_header(scratch)
    assert caught.value.path == scratch
    if kind in ("dtype", "shape", "shape-size", "huge-shape", "offsets", "drop-key", "entry"):
        assert caught.value.tensor == victim
    elif kind == "shift":
        assert caught.value.tensor in (None, "w", "b", "s")


def _nbytes(dtype_name: str, shape: list[int]) -> int:
    count = SAFETENSORS_DTYPES[dtype_name].itemsize
    for dim in shape:
        count *= dim
    return count


# --- (c) absurd sizes cost nothing ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dims=st.lists(st.integers(10**3, 10**15), min_size=1, max_size=3), dtype=st.sampled_from(sorted(SAFETENSORS_DTYPES))
)
def test_header_claiming_enormous_tensor_fails_fast_without_allocating(scratch, dims, dtype):
    nbytes = _nbytes(dtype, dims)
    header = json.dumps({"huge": {"dtype": dtype, "shape": dims, "data_offsets": [0, nbytes]}}).encode()
    scratch.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    tracemalloc.start()
    read_before = _bytes_read()
    try:
        with pytest.raises(CheckpointFormatError, match="beyond the end of the file") as caught:
            read_safetensors_header(scratch)
        read = _bytes_read() - read_before
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.tensor == "huge"
    assert read < 1 << 16  # the header only
    assert peak < 1_000_000


def test_petabyte_tensor_header_fails_at_header_read(scratch):
    header = json.dumps({"huge": {"dtype": "U8", "shape": [10**15], "data_offsets": [0, 10**15]}}).encode()
    scratch.write_bytes(struct.pack("<Q", len(header)) + header)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset peak RSS
    rss_before = _status_kib("VmRSS")
    read_before = _bytes_read()
    with pytest.raises(CheckpointFormatError) as caught:
        read_safetensors_header(scratch)
    assert _bytes_read() - read_before < 1 << 16  # the header only
    assert _status_kib("VmHWM") - rss_before < 10 * 1024
    data_start = 8 + len(header)
    assert str(caught.value) == (
        f"{scratch}: huge: data ends at byte {data_start + 10**15}, beyond the end of the file ({data_start} bytes)"
    )


def test_length_field_claiming_petabytes_fails_before_reading(scratch):
    scratch.write_bytes(struct.pack("<Q", 10**15) + b"{}")
    with pytest.raises(CheckpointFormatError, match="header length 1000000000000000 exceeds"):
        read_safetensors_header(scratch)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == field:
                return int(value.split()[0])
    raise LookupError(field)


def _bytes_read() -> int:
    """Bytes this process has asked read() for so far (``rchar`` of /proc/self/io), cached or not."""
    with open("/proc/self/io") as io_counters:
        return next(int(line.split()[1]) for line in io_counters if line.startswith("rchar:"))
