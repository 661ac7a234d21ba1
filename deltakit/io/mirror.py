"""Write a checkpoint that mirrors another one, changing some tensors: the same shard file names, index, tensor
order, dtypes and ``__metadata__``, and the other top-level files (config, tokenizer, ...) copied.

Without a ``dtype`` override each output shard has the source shard's header bytes and layout, so what no one
changes (the header, unchanged tensors) is copied from the source as bytes, never decoded. A changed tensor is
read as raw bytes on a background thread, one tensor ahead (into memory reused from tensor to tensor,
io/buffers.py), handed to the caller's transform, and written at its own offset on another background thread
while the next one is transformed (each shard's closing fsync too). With a ``dtype`` override every tensor goes
that way (cast) into a header-first :class:`~deltakit.io.writer.SafetensorsWriter`. Either way the output is
written past the page cache where the file system allows it (io/direct_file.py), and the source's changed
tensors are read past it too unless their file is cached already (:func:`~deltakit.io.checkpoint.plan_reads`).
Peak memory is about three times the largest tensor read, plus what the transform holds, whatever the shard or
model size.

An FP8 block-scaled weight (io/fp8.py) is two stored tensors, codes and block scales, and one weight to the
transform: it is handed over dequantized (fp32) and its result stored as FP8 again with fresh scales, or, with a
``dtype``, written plain without scales. Both stored tensors are written when the first of them comes up in the
file (safetensors puts the fp32 scales before the float8 codes); the other waits until its own turn.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from deltakit.errors import CheckpointFormatError, NonFiniteError
from deltakit.io.checkpoint import Checkpoint, SafetensorsHeader, TensorInfo, plan_reads
from deltakit.io.direct_file import DirectFile
from deltakit.io.fp8 import Requantization, dequantize, requantize
from deltakit.io.prefetch import prefetched
from deltakit.io.writer import SafetensorsWriter, no_room_as_error, write_json
from deltakit.names import TensorName

# Files beside the weights that are themselves weights in another format (or their index): copying them would
# ship stale weights next to the new ones, so they are skipped and reported.
_OTHER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")

# The new value of a changed tensor, from its stored bytes (in memory of its own, which the transform may write
# over: merge's does, in place) and the dtype to write.
Transform = Callable[[TensorName, torch.Tensor, torch.dtype], torch.Tensor]


@dataclass
class MirrorResult:
    unchanged: int = 0  # tensors copied byte for byte (or only cast with ``dtype``)
    weight_files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    requantized: list[Requantization] = field(default_factory=list)  # changed FP8 weights stored as FP8 again
    # With ``hash_changed``: SHA-256 of the bytes written for each changed tensor (FP8 weights, stored
    # requantized, aside), taken on the writing thread while the next tensor is transformed.
    written_sha256: dict[TensorName, str] = field(default_factory=dict)


@dataclass
class OtherFiles:
    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # with the reason


def out_dtype(info: TensorInfo, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor is written in: ``dtype`` for floating-point tensors when given, else its own."""
    return dtype if dtype is not None and info.dtype.is_floating_point else info.dtype


def write_mirror(ckpt: Checkpoint, staging_dir: Path, changed: Collection[TensorName], transform: Transform, *,
                 dtype: torch.dtype | None, progress: bool, desc: str, hash_changed: bool = False) -> MirrorResult:
    """Write every shard of ``ckpt`` into ``staging_dir``, passing the tensors in ``changed`` through
    ``transform``; with ``hash_changed`` each one's SHA-256 as written goes into the result.

    Without ``dtype`` each shard is a :class:`_MirroredShard`: unchanged tensors are copied as bytes, never
    decoded. With ``dtype`` every tensor is read, cast and written by a :class:`SafetensorsWriter`. Three stages
    overlap: the next tensor is read ahead on one background thread while this one is transformed, and the one
    before is written out on another (as is each shard's closing sync). (FP8 weights are read in line: they are
    dequantized into memory of their own.)
    """
    plan_reads(ckpt)
    result = MirrorResult()
    fp8 = _Fp8Weights(ckpt, changed, transform, dtype, result)
    infos = [info for file in ckpt.files for info in ckpt.header(file).tensors.values()]
    total = sum(info.nbytes for info in infos)
    to_read = [info for info in infos
               if not fp8.holds(info.name) and (dtype is not None or info.name in changed)]
    with ThreadPoolExecutor(max_workers=1) as pool, ExitStack() as sinks, \
            prefetched((ckpt.get_stored(info.name) for info in to_read), depth=1) as stored_tensors, \
            tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        writes = _WriteBehind(pool)
        done = 0
        try:
            for shard_path in ckpt.files:
                header = ckpt.header(shard_path)
                out_path = staging_dir / shard_path.name
                if dtype is None:
                    sink = sinks.enter_context(_MirroredShard(shard_path, out_path, header))
                else:
                    specs = [(name, out_dtype(info, dtype), tuple(info.shape))
                             for name, info in header.tensors.items() if name not in fp8.owner]
                    sink = sinks.enter_context(SafetensorsWriter(out_path, specs, header.metadata))
                for name, info in header.tensors.items():
                    done += 1
                    bar.update(info.nbytes)
                    bar.set_postfix_str(f"{done}/{len(infos)} tensors", refresh=False)
                    if fp8.holds(name):
                        value = fp8.value(name)
                        if value is not None:
                            writes.submit(sink.write, name, value)
                        continue
                    is_changed = name in changed
                    if not is_changed and dtype is None:
                        result.unchanged += 1  # the sink copies it
                        continue
                    stored = next(stored_tensors)
                    if is_changed:
                        value = transform(name, stored, out_dtype(info, dtype))
                    else:
                        result.unchanged += 1
                        value = stored.to(out_dtype(info, dtype))
                        if not is_finite(value):
                            raise NonFiniteError(f"has NaN or Inf once cast to {str(dtype).removeprefix('torch.')}"
                                                 "; choose a wider --dtype", path=ckpt.path, tensor=name)
                    del stored
                    if is_changed and hash_changed:
                        writes.submit(_write_hashed, sink, name, value, result.written_sha256)
                    else:
                        writes.submit(sink.write, name, value)
                writes.submit(sink.close)  # syncs while the next shard is read and computed
                result.weight_files.append(shard_path.name)
        finally:
            writes.wait()  # a sink is discarded (on error) only when nothing is in flight
    result.bytes_written = sum((staging_dir / name).stat().st_size for name in result.weight_files)
    return result


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes as stored (little-endian, row-major)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def _write_hashed(sink: _MirroredShard | SafetensorsWriter, name: TensorName, value: torch.Tensor,
                  hashes: dict[TensorName, str]) -> None:
    sink.write(name, value)
    hashes[name] = tensor_sha256(value)


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor about to be written holds no NaN or ±Inf. One fp32 sum decides almost always (a NaN or
    Inf makes it non-finite); only a non-finite sum, which finite values near fp32's limit can also give, costs a
    full element-wise check."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def mirror_order(ckpt: Checkpoint, dtype: torch.dtype | None) -> list[TensorName]:
    """The tensors of ``ckpt`` in the order :func:`write_mirror` hands them to its transform: file order, an FP8
    weight at the first of its codes and its scales when it is stored as FP8 again (no ``dtype``)."""
    owner = {} if dtype is not None else {info.scale: name for name, info in ckpt.tensors.items() if info.scale}
    stored = (owner.get(name, name) for file in ckpt.files for name in ckpt.header(file).tensors)
    return [name for name in dict.fromkeys(stored) if name in ckpt]


class _Fp8Weights:
    """The FP8 block-scaled weights of a mirrored checkpoint: two stored tensors each, one weight to the transform."""

    def __init__(self, ckpt: Checkpoint, changed: Collection[TensorName], transform: Transform,
                 dtype: torch.dtype | None, result: MirrorResult) -> None:
        self.ckpt, self.changed, self.transform, self.dtype, self.result = ckpt, changed, transform, dtype, result
        self.owner = {info.scale: name for name, info in ckpt.tensors.items() if info.scale is not None}
        self.pending: dict[TensorName, torch.Tensor] = {}

    def holds(self, name: TensorName) -> bool:
        """Whether ``name`` is the codes or the scales of an FP8 weight."""
        return name in self.owner or (name in self.ckpt and self.ckpt.info(name).scale is not None)

    def value(self, name: TensorName) -> torch.Tensor | None:
        """What to write under the stored name ``name``; None: nothing (the sink copies it, or it is dropped)."""
        weight = self.owner.get(name, name)
        if name in self.pending:
            return self.pending.pop(name)
        is_changed = weight in self.changed
        if self.dtype is None and not is_changed:
            self.result.unchanged += name == weight  # copied byte for byte, with its scales
            return None
        if self.dtype is not None and name != weight:
            return None  # a plain output has no scales
        scale = self.ckpt.info(weight).scale
        codes, scale_inv = self.ckpt.get_stored(weight), self.ckpt.get_stored(scale)
        value = dequantize(codes, scale_inv, self.ckpt.fp8)  # (out, in) fp32
        if not is_changed:
            self.result.unchanged += 1
            return value.to(self.dtype)
        value = self.transform(weight, value, self.dtype or torch.float32)
        if self.dtype is not None:
            return value
        new_codes, new_scale, loss = requantize(weight, value, codes, scale_inv, self.ckpt.fp8)
        self.result.requantized.append(loss)
        self.pending[weight if name == scale else scale] = new_codes if name == scale else new_scale
        return new_scale if name == scale else new_codes


def write_index(ckpt: Checkpoint, staging_dir: Path, dtype: torch.dtype | None) -> None:
    """The shard index, as it is, or with ``total_size`` recomputed for ``dtype``."""
    if ckpt.index_path is None:
        return
    target = staging_dir / ckpt.index_path.name
    if dtype is None:
        shutil.copyfile(ckpt.index_path, target)
        return
    index = json.loads(ckpt.index_path.read_text(encoding="utf-8"))
    if ckpt.fp8 is not None:  # a plain output: the block scales are gone
        index["weight_map"] = {name: shard for name, shard in index["weight_map"].items() if name in ckpt}
    if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
        total = 0
        for info in ckpt.tensors.values():
            total += info.numel * out_dtype(info, dtype).itemsize
        index["metadata"]["total_size"] = total
    write_json(target, index)


def copy_other_files(ckpt: Checkpoint, staging_dir: Path | None, dtype: torch.dtype | None,
                     replaced_dirs: Collection[str] = ()) -> OtherFiles:
    """Copy the checkpoint directory's non-weight files (config, tokenizer, ...) into ``staging_dir`` (None: only
    list them); skip weights in other formats and subdirectories, listing each, except ``replaced_dirs`` (which
    the caller writes anew, or leaves out on purpose)."""
    files = OtherFiles()
    if not ckpt.path.is_dir():
        return files
    own = {p.name for p in ckpt.files} | ({ckpt.index_path.name} if ckpt.index_path else set())
    for path in sorted(ckpt.path.iterdir()):
        if path.name in own:
            continue
        if path.is_dir():
            if path.name not in replaced_dirs:
                files.skipped.append(f"{path.name}/ (a directory; not copied)")
        elif path.name.endswith(_OTHER_WEIGHT_SUFFIXES):
            files.skipped.append(f"{path.name} (weights in another format; they would not hold the merge)")
        elif staging_dir is None:
            files.copied.append(path.name)
        elif path.name == "config.json" and dtype is not None:
            config = json.loads(path.read_text(encoding="utf-8"))
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = str(dtype).removeprefix("torch.")
            if ckpt.fp8 is not None:
                del config["quantization_config"]  # the weights are written dequantized
            write_json(staging_dir / path.name, config)
            files.copied.append(path.name)
        elif path.is_file():
            shutil.copyfile(path, staging_dir / path.name)
            files.copied.append(path.name)
    return files


class _WriteBehind:
    """At most one write in flight on a background thread, so that reading and computing the next tensor overlap
    with writing this one (file I/O and torch release the GIL). Writes run in submission order."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._pending: Future | None = None

    def submit(self, write: Callable[..., None], *args: object) -> None:
        self.wait()
        self._pending = self._pool.submit(write, *args)

    def wait(self) -> None:
        """Block until the write in flight is done; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


class _MirroredShard:
    """An output shard laid out exactly as its source shard (the same header bytes, tensor offsets and size), for
    a run that changes no dtype. Written front to back: what stays as it is (the header, unchanged tensors) is
    read from the source straight into the output's staging buffer; a changed tensor's bytes are written at its
    own offset. As a context manager, an exception closes without syncing (the staging directory is removed
    anyway)."""

    def __init__(self, base_path: Path, out_path: Path, header: SafetensorsHeader) -> None:
        self._header = header
        self._out_path = out_path
        self._end = max((info.end for info in header.tensors.values()), default=header.data_start)
        self._base = open(base_path, "rb", buffering=0)
        try:
            self._out = DirectFile(out_path)
        except BaseException:
            self._base.close()
            raise
        self._written = 0  # the output holds the source's layout up to here

    def __enter__(self) -> _MirroredShard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._base.close()
            self._out.close()

    def write(self, name: TensorName, tensor: torch.Tensor) -> None:
        """Copy the source up to this tensor, then write its new bytes (same dtype and shape)."""
        info = self._header.tensors[name]
        with no_room_as_error(self._out_path):
            self._copy_until(info.start)
            self._out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self._written = info.end

    def close(self) -> None:
        """Copy the rest of the source, sync to disk and close (once)."""
        if self._out.closed:
            return
        with no_room_as_error(self._out_path):
            self._copy_until(self._end)
            self._out.sync()
            self._out.close()
        self._base.close()

    def _copy_until(self, end: int) -> None:
        while self._written < end:
            copied = self._out.copy_from(self._base.fileno(), self._written, end - self._written)
            if not copied:
                raise CheckpointFormatError(f"file ends at byte {self._written}, before {self._end}; it changed "
                                            "since it was opened", path=self._base.name)
            self._written += copied
