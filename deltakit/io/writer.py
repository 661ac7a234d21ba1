"""Write outputs without ever holding a whole shard, and without a half-written file under its final name.

:class:`SafetensorsWriter` writes a ``.safetensors`` file header-first: the names, dtypes and shapes are known
before any data, so tensors can be appended one at a time (``safetensors.save_file`` needs the whole dict in
memory). :func:`staged_output` builds an output directory beside its final place and renames it in only when
complete.

An output that cannot be written (disk full, quota, file-size limit, permission denied, read-only filesystem,
immutable directory) raises :class:`OutputWriteError` naming the file, and leaves no partial or temporary file
behind; :func:`staged_output` finds the last three before the caller's work starts, also for ``--overwrite``.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import math
import os
import secrets
import shutil
import signal
import struct
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import torch

from deltakit.io.direct_file import DirectFile
from deltakit.io.dtypes import DTYPE_NAMES
from deltakit.names import TensorName
from deltakit.errors import (
    DeltakitError,
    InvalidOptionError,
    OutputExistsError,
    OutputWriteError,
    TensorMismatchError,
    TensorMissingError,
    shorten,
)

TensorSpec = tuple[TensorName, torch.dtype, tuple[int, ...]]

# The errnos that mean the output does not fit where it goes (not a bug, not a bad path): what each is called in
# the one-line message, and what the user can do.
_NO_ROOM = {
    errno.ENOSPC: ("the disk is full (no space left on device)", "free some space"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space"),
    errno.EFBIG: ("the file size limit was hit (file too large for `ulimit -f` or the filesystem)", "raise the limit"),
}
# The errnos that mean the output may not go where it was asked. Unlike running out of room, reading an input can
# raise these too, so they become OutputWriteError only where the failing call is known to touch the output.
_NOT_ALLOWED = {
    errno.EACCES: ("permission denied", "fix the permissions"),
    errno.EPERM: ("operation not permitted (an immutable or append-only file or directory?)", "check `lsattr`"),
    errno.EROFS: ("the filesystem is read-only", "remount it read-write"),
}
_CANNOT_WRITE = {**_NO_ROOM, **_NOT_ALLOWED}
# Signals whose default action kills the process without unwinding: while an output is staged they raise
# SystemExit(128 + signal) instead, so the staging directory is removed as it is on Ctrl-C.
_TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class SafetensorsWriter:
    """Stream tensors into one ``.safetensors`` file, in the order given up front.

    The bytes are those ``safetensors.torch.save_file`` writes for the same tensors in the same order: an 8-byte
    little-endian header length, compact JSON (``__metadata__`` first) padded with spaces to a multiple of 8,
    then each tensor's raw little-endian bytes with no gaps. (``save_file`` itself orders tensors by its dtype
    enum, descending, which is roughly largest itemsize first, then by name; pass specs in that order to get
    identical files.)

    The data goes to a hidden temporary sibling that replaces ``path`` only when :meth:`close` has verified that
    every tensor was written, so ``path`` never holds a partial file. As a context manager, a normal exit closes
    (and verifies); an exception discards the temporary file instead.

    Example:
        >>> with SafetensorsWriter(path, [("w", torch.float16, (2, 3))]) as writer:
        ...     writer.write("w", torch.zeros(2, 3, dtype=torch.float16))
    """

    def __init__(
        self, path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        """Check the specs and write the header.

        Args:
            path: the file to create (replaced if it exists).
            specs: (name, dtype, shape) of every tensor, in the order they will be written and laid out.
            metadata: the ``__metadata__`` string map, if any.

        Raises:
            InvalidOptionError: a name repeats or is ``__metadata__``, a dtype has no safetensors name, a shape
                is not non-negative integers, or metadata is not string -> string.
        """
        self.path = Path(path)
        self._specs = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        self._next = 0
        header = _encode_header(self.path, self._specs, metadata)
        self._temp_path, self._file = _create_sibling(self.path, "deltakit-tmp")
        try:
            with no_room_as_error(self.path):
                self._file.write(struct.pack("<Q", len(header)) + header)
        except BaseException:
            self._discard()
            raise

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def write(self, name: TensorName, tensor: torch.Tensor) -> None:
        """Append the next tensor's bytes.

        Args:
            name: must be the next name in spec order.
            tensor: its dtype and shape must match the spec; it may live on any device and need not be
                contiguous (a contiguous CPU copy is made only if it is not one already).

        Raises:
            TensorMissingError: ``name`` is not in the specs, or every tensor was already written.
            TensorMismatchError: ``name`` is out of order, or its dtype or shape differs from the spec.
            OutputWriteError: no room left for the bytes (the partial file is discarded, the writer closed).
        """
        if self._file is None:
            raise TensorMismatchError("writer is already closed", path=self.path, tensor=name)
        if self._next == len(self._specs):
            raise TensorMissingError("every tensor in the header was already written", path=self.path, tensor=name)
        expected_name, dtype, shape = self._specs[self._next]
        if name != expected_name:
            if not any(spec[0] == name for spec in self._specs):
                raise TensorMissingError("not in this file's header", path=self.path, tensor=name)
            raise TensorMismatchError(f"written out of order; {expected_name} comes next", path=self.path, tensor=name)
        if tensor.dtype != dtype:
            raise TensorMismatchError(f"dtype is {tensor.dtype}, the header says {dtype}", path=self.path, tensor=name)
        if tuple(tensor.shape) != shape:
            raise TensorMismatchError(
                f"shape is {tuple(tensor.shape)}, the header says {shape}", path=self.path, tensor=name
            )
        if tensor.numel():
            data = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
            try:
                with no_room_as_error(self.path):
                    self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            except BaseException:
                # A failed write leaves a file with part of a tensor: no later write could make it valid.
                self._discard()
                raise
        self._next += 1

    def close(self) -> None:
        """Verify every tensor was written, flush to disk and move the file to ``path``.

        Raises:
            TensorMissingError: some tensors were never written (the partial file is discarded).
            OutputWriteError: no room left when flushing to disk (the file is discarded).
        """
        if self._file is None:
            return
        if self._next < len(self._specs):
            missing = [spec[0] for spec in self._specs[self._next :]]
            self._discard()
            raise TensorMissingError(
                f"closed with {len(missing)} tensor(s) never written: {shorten(missing)}",
                path=self.path,
                tensor=missing[0],
            )
        try:
            # Space may be allocated only now (delayed allocation, network filesystems): fsync and close can fail.
            with no_room_as_error(self.path):
                self._file.sync()
                self._file.close()
        except BaseException:
            self._discard()
            raise
        self._file = None
        os.replace(self._temp_path, self.path)

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._temp_path.unlink(missing_ok=True)


def safetensors_size(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    """The exact size in bytes of the file :class:`SafetensorsWriter` writes for these specs: header included.

    Raises:
        InvalidOptionError: as :class:`SafetensorsWriter` does for the same specs.
    """
    specs = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
    header = _encode_header(Path("<size>"), specs, metadata)
    return 8 + len(header) + sum(dtype.itemsize * math.prod(shape) for _, dtype, shape in specs)


def save_tensors(
    path: Path, tensors: Mapping[TensorName, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors to one ``.safetensors`` file, laid out in the mapping's order.

    Args:
        path: the file to create (replaced if it exists, atomically).
        tensors: name -> tensor.
        metadata: the ``__metadata__`` string map, if any.

    Raises:
        InvalidOptionError: a name is ``__metadata__``, a dtype has no safetensors name, or metadata is not
            string -> string.
        OutputWriteError: the disk is full, or a quota or file-size limit was hit (no file is left behind).
    """
    specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order, trailing newline), replacing ``path`` atomically.

    Args:
        path: the file to create or replace.
        obj: anything ``json.dumps`` accepts.

    Raises:
        OutputWriteError: the disk is full, or a quota or file-size limit was hit (``path`` is left as it was).
    """
    _write_file(Path(path), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8, replacing ``path`` atomically.

    Args:
        path: the file to create or replace.
        text: the whole content.

    Raises:
        OutputWriteError: the disk is full, or a quota or file-size limit was hit (``path`` is left as it was).
    """
    _write_file(Path(path), text.encode("utf-8"))


def _write_file(path: Path, data: bytes) -> None:
    temp_path, file = _create_sibling(path, "deltakit-tmp")
    try:
        with no_room_as_error(path):
            try:
                file.write(data)
                file.sync()
            finally:
                file.close()
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise


@contextmanager
def staged_output(final_path: Path, *, overwrite: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Build an output directory in a hidden sibling and move it to ``final_path`` only when the block completes.

    The staging directory is named ``.{name}.deltakit-tmp-<random>`` beside ``final_path`` (same filesystem, so
    the final move is a rename). On success, an existing ``final_path`` (with ``overwrite``) is renamed aside,
    the new directory renamed in, then the old one deleted: ``final_path`` never holds a partial output. On
    any exception, KeyboardInterrupt and SystemExit included, the staging directory is removed and the
    exception re-raised; SIGTERM and SIGHUP (where they would kill the process) raise SystemExit(128 + signal)
    inside the block, so they clean up the same way. Running out of room (an ``OSError`` ENOSPC, EDQUOT or
    EFBIG, from any code in the block) becomes :class:`OutputWriteError` naming the file under ``final_path``.
    Before yielding, the output's place is checked: an unwritable or read-only parent, and with ``overwrite``
    an existing output that cannot be moved aside or deleted, are refused with one line naming the path.
    Parent directories are created as needed. A process killed outright (SIGKILL, power loss) can leave a
    staging directory behind, never a partial ``final_path``; killed between the two renames of an overwrite,
    it leaves no ``final_path`` and the old output in ``.{name}.deltakit-old-<random>``. The next run for the
    same ``final_path`` cleans up either: it deletes abandoned staging directories and set-aside outputs, and
    moves a set-aside output back to ``final_path`` where nothing replaced it.

    Args:
        final_path: where the output directory should end up.
        overwrite: replace an existing ``final_path``.
        inputs: the files or directories the output is made from; ``final_path`` may not be one of them, lie
            inside one, or contain one (replacing it would delete an input).

    Yields:
        The empty staging directory to write into.

    Raises:
        OutputExistsError: ``final_path`` exists and ``overwrite`` is false (checked before yielding, and again
            before the final rename).
        InvalidOptionError: ``final_path`` overlaps an input.
        OutputWriteError: the disk is full, a quota or file-size limit was hit, or the output's directory (or,
            with ``overwrite``, the existing output) may not be written: permission denied, read-only filesystem,
            immutable.
    """
    # abspath, not resolve: a symlink at final_path is replaced, not followed.
    final_path = Path(os.path.abspath(final_path))
    refuse_overlap(final_path, inputs)
    with no_room_as_error(final_path):
        if final_path.parent.is_dir():
            _remove_abandoned_staging(final_path)
        _refuse_existing(final_path, overwrite)
        final_path.parent.mkdir(parents=True, exist_ok=True)
        staging_dir = _make_sibling_dir(final_path, "deltakit-tmp")
    try:
        with no_room_as_error(final_path):
            lock = _hold_lock(staging_dir)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    try:
        with no_room_as_error(final_path):
            if overwrite and os.path.lexists(final_path):
                _check_replaceable(final_path)
        with _terminating_signals_raise():
            yield staging_dir
            _refuse_existing(final_path, overwrite)
            _fsync_dir(staging_dir)
            _replace_dir(staging_dir, final_path)
        _release_lock(staging_dir, lock)
    except BaseException as e:
        shutil.rmtree(staging_dir, ignore_errors=True)
        _release_lock(staging_dir, lock)
        if isinstance(e, OutputWriteError) or (isinstance(e, OSError) and e.errno in _NO_ROOM):
            cause = e.__cause__ if isinstance(e, OutputWriteError) and e.__cause__ is not None else e
            raise _no_room_in_output(e, staging_dir, final_path) from cause
        raise


@contextmanager
def _terminating_signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit(128 + signal) where they would otherwise kill the
    process on the spot (default action, main thread): ignored or handled signals are left to their owner."""
    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _TERMINATING_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_DFL:
                previous[sig] = signal.signal(sig, raise_exit)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_replaceable(final_path: Path) -> None:
    """Raise the OSError that replacing ``final_path`` at the end would meet, before any work: it must move aside
    (a rename there and back: an immutable directory refuses it) and each directory in it must allow deletion."""
    probe = _free_sibling_name(final_path, "deltakit-old")
    os.rename(final_path, probe)
    os.rename(probe, final_path)
    if final_path.is_symlink() or not final_path.is_dir():
        return
    for directory, _, _ in os.walk(final_path):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), directory)


def _lock_path(staging_dir: Path) -> Path:
    # A tag of its own, so that nothing looking for staging directories finds the lock file among them.
    return staging_dir.with_name(staging_dir.name.replace(".deltakit-tmp-", ".deltakit-lock-"))


def _hold_lock(staging_dir: Path) -> int:
    """Lock a file beside the staging directory for as long as this process builds it: the kernel drops the
    lock when the process dies, however it dies, which is how a later run tells an abandoned directory."""
    fd = os.open(_lock_path(staging_dir), os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _release_lock(staging_dir: Path, fd: int) -> None:
    _lock_path(staging_dir).unlink(missing_ok=True)
    os.close(fd)


def _remove_abandoned_staging(final_path: Path) -> None:
    """Clean up after earlier runs for the same output that were killed (SIGKILL, power loss): delete their
    staging directories (on a large model each can hold a partial checkpoint), one whose lock another live process
    holds excepted; then, if no run is live, deal with outputs set aside by an overwrite: the newest goes back to
    ``final_path`` where nothing replaced it, the others (full copies of an old output) are deleted."""
    pattern = f".{glob.escape(final_path.name)}"
    is_live = False
    for lock_path in final_path.parent.glob(f"{pattern}.deltakit-lock-*"):
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            is_live = True
            continue  # a run in progress
        staging_name = lock_path.name.replace(".deltakit-lock-", ".deltakit-tmp-")
        shutil.rmtree(lock_path.with_name(staging_name), ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        os.close(fd)
    if is_live:
        return  # a live run may be between its two renames: its set-aside output is not abandoned
    set_aside = sorted(final_path.parent.glob(f"{pattern}.deltakit-old-*"), key=lambda p: p.lstat().st_mtime)
    if set_aside and not os.path.lexists(final_path):
        os.rename(set_aside.pop(), final_path)
    for old_path in set_aside:
        _remove(old_path)


def _no_room_in_output(error: OSError, staging_dir: Path, final_path: Path) -> OutputWriteError:
    """The error naming the file under ``final_path`` the user asked for, not its removed staging twin."""
    if isinstance(error, OutputWriteError):
        message, path = error.message, error.path
    else:
        # shutil.copyfile names its destination in filename2; a bare write() names no file: blame the output.
        message = _no_room_message(error.errno)
        named = error.filename2 or error.filename
        path = Path(os.fsdecode(named)) if isinstance(named, (str, bytes)) else final_path
    if path is not None and path.is_relative_to(staging_dir):
        path = final_path / path.relative_to(staging_dir)
    return OutputWriteError(message, path=path if path is not None else final_path)


@contextmanager
def no_room_as_error(path: Path) -> Iterator[None]:
    """Turn a failure to write inside the block into :class:`OutputWriteError` naming ``path``.

    For code that writes a file by other means than this module (``os.write``, ``copy_file_range``): the
    ``OSError`` of a full disk (ENOSPC), an exceeded quota (EDQUOT), the file-size limit (EFBIG), a denied
    permission (EACCES, EPERM) or a read-only filesystem (EROFS) names no file, or a hidden staging one. Keep
    reads of inputs out of the block: their permission errors are not the output's.

    Args:
        path: the file being written, as the user should see it (inside a staging directory is fine:
            :func:`staged_output` maps it to the final name).

    Raises:
        OutputWriteError: the block raised one of those errors (chained as the cause); other errors pass as they are.
    """
    try:
        yield
    except OSError as e:
        if isinstance(e, DeltakitError) or e.errno not in _CANNOT_WRITE:
            raise
        raise OutputWriteError(_no_room_message(e.errno), path=path) from e


def _no_room_message(code: int) -> str:
    what, fix = _CANNOT_WRITE[code]
    return f"cannot write: {what}; {fix} or choose another --out"


def check_output(final_path: Path, *, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
    """What :func:`staged_output` refuses on entry, for a caller that enters it only after long work: an output
    that overlaps an input, or exists without ``overwrite``.

    Raises:
        InvalidOptionError, OutputExistsError: as :func:`staged_output`.
    """
    final_path = Path(os.path.abspath(final_path))
    refuse_overlap(final_path, inputs)
    _refuse_existing(final_path, overwrite)


def refuse_overlap(final_path: Path, inputs: Sequence[Path]) -> None:
    """Raise InvalidOptionError if ``final_path`` is an input, lies inside one, or contains one."""
    # resolve() on both sides: a symlinked output or input must not hide that they are the same place.
    out = final_path.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source or source in out.parents:
            raise InvalidOptionError(f"the output is, or is inside, the input {given}; choose another --out", path=final_path)
        if out in source.parents:
            raise InvalidOptionError(f"the output contains the input {given}; choose another --out", path=final_path)


def _refuse_existing(final_path: Path, overwrite: bool) -> None:
    if not overwrite and os.path.lexists(final_path):
        raise OutputExistsError("already exists; pass --overwrite to replace it", path=final_path)


def _replace_dir(staging_dir: Path, final_path: Path) -> None:
    old_path = None
    if os.path.lexists(final_path):
        old_path = _free_sibling_name(final_path, "deltakit-old")
        os.rename(final_path, old_path)
    try:
        os.rename(staging_dir, final_path)
    except BaseException:
        if old_path is not None:
            os.rename(old_path, final_path)
        raise
    _fsync_dir(final_path.parent)
    if old_path is not None:
        _remove(old_path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _free_sibling_name(path: Path, tag: str) -> Path:
    while True:
        candidate = path.with_name(f".{path.name}.{tag}-{secrets.token_hex(4)}")
        if not os.path.lexists(candidate):
            return candidate


def _make_sibling_dir(path: Path, tag: str) -> Path:
    # Not tempfile.mkdtemp: its 0700 mode would end up on the final output directory.
    while True:
        candidate = _free_sibling_name(path, tag)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def _create_sibling(path: Path, tag: str) -> tuple[Path, DirectFile]:
    """Create a fresh hidden file beside ``path`` (normal permissions, unlike mkstemp's 0600)."""
    with no_room_as_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            candidate = _free_sibling_name(path, tag)
            try:
                return candidate, DirectFile(candidate)
            except FileExistsError:
                continue


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode_header(path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    entries: dict[str, object] = {}
    if metadata is not None:
        is_strings = all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        if not is_strings:
            raise InvalidOptionError("__metadata__ must map strings to strings", path=path)
        entries["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape in specs:
        if name == "__metadata__" or name in entries:
            raise InvalidOptionError("tensor name is reserved or repeated", path=path, tensor=name)
        if dtype not in DTYPE_NAMES:
            raise InvalidOptionError(f"dtype {dtype} has no safetensors name", path=path, tensor=name)
        if not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape):
            raise InvalidOptionError(f"shape {shape} is not a tuple of non-negative integers", path=path, tensor=name)
        nbytes = dtype.itemsize * math.prod(shape)
        # Key order dtype, shape, data_offsets, as safetensors (serde) writes them.
        entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    try:
        header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidOptionError(
            f"a tensor name or metadata string is not valid Unicode ({e.reason})", path=path
        ) from e
    # safetensors pads the header with spaces so the data section starts 8-byte aligned.
    return header + b" " * (-len(header) % 8)
