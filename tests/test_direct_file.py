"""DirectFile: a new file written front to back past the page cache; the same bytes whatever the file system
allows, whatever the sizes of the writes."""

from __future__ import annotations

import fcntl
import os
import random

import pytest
from builders import refuse_direct

from deltakit.io import direct_file
from deltakit.io.direct_file import DirectFile

MODES = ["allowed", "refused at open", "refused at write"]


def _pieces(seed: int, total: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces, size = [], 0
    while size < total:
        piece = rng.randbytes(rng.choice([0, 1, 7, 4095, 4096, 4097, 9000, 20000]))
        pieces.append(piece)
        size += len(piece)
    return pieces


@pytest.mark.parametrize("mode", MODES)
def test_the_file_holds_exactly_the_bytes_written(tmp_path, monkeypatch, mode):
    """Writes of any size, across staging-buffer boundaries (16 KiB here), with copies from another file between
    them: the file is their concatenation, its size exact (the padded last block is cut off)."""
    monkeypatch.setattr(direct_file, "_STAGING_BYTES", 16384)
    refuse_direct(monkeypatch, mode)
    source = tmp_path / "source"
    source_bytes = random.Random(1).randbytes(50_000)
    source.write_bytes(source_bytes)
    expected = bytearray()
    out = DirectFile(tmp_path / "out")
    with open(source, "rb") as src:
        for i, piece in enumerate(_pieces(0, 100_000)):
            assert out.write(piece) == len(piece)
            expected += piece
            if i % 3 == 0:
                offset = (i * 977) % 40_000
                assert out.copy_from(src.fileno(), offset, 6000) == 6000
                expected += source_bytes[offset:offset + 6000]
        assert out.copy_from(src.fileno(), 49_000, 5000) == 1000  # the source ends
        expected += source_bytes[49_000:]
    out.sync()
    out.close()
    assert (tmp_path / "out").read_bytes() == bytes(expected)


def test_o_direct_is_used_where_the_file_system_allows_it(tmp_path):
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT here")
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip("this file system refuses O_DIRECT")
    out = DirectFile(tmp_path / "out")
    out.write(b"x" * 100)
    out.sync()
    assert fcntl.fcntl(out.fileno(), fcntl.F_GETFL) & os.O_DIRECT
    out.close()
    assert (tmp_path / "out").read_bytes() == b"x" * 100


def test_an_existing_file_is_refused_and_nothing_is_written_after_sync(tmp_path):
    (tmp_path / "taken").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        DirectFile(tmp_path / "taken")
    assert (tmp_path / "taken").read_bytes() == b"keep"
    out = DirectFile(tmp_path / "out")
    out.write(b"abc")
    out.sync()
    with pytest.raises(ValueError, match="after sync"):
        out.write(b"d")
    out.close()
    assert out.closed and (tmp_path / "out").read_bytes() == b"abc"
