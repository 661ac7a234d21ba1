"""Open Hugging Face checkpoints lazily: list tensors from headers alone, read one tensor at a time.

A checkpoint is a directory (``model.safetensors``; shards ``PREFIX-0000k-of-0000n.safetensors`` with
``PREFIX.safetensors.index.json``; or exactly one ``*.safetensors``), a single ``.safetensors`` file, or, only
where no safetensors exist, legacy ``pytorch_model*.bin`` files.

We parse safetensors headers ourselves instead of using ``safetensors.safe_open``: every malformed input must
raise a :class:`~deltakit.errors.CheckpointFormatError` naming the file and tensor (never a crash, a hang or a
huge allocation), and :meth:`Checkpoint.get` reads each tensor into anonymous memory of its own (reused for a later
read once no tensor refers to it, io/buffers.py), so resident memory is bounded by what we hold rather than by page
cache we happen to have mapped.
Tensor bytes are taken as little-endian, as safetensors stores them; like torch's CPU builds, we assume a
little-endian host.
"""

from __future__ import annotations

import difflib
import errno
import io
import json
import os
import pickle
import re
import reprlib
import struct
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from deltakit.errors import (
    CheckpointFormatError,
    CheckpointLayoutError,
    CheckpointNotFoundError,
    TensorMissingError,
    UnsupportedWeightsError,
    shorten,
)
from deltakit.io.buffers import BufferPool
from deltakit.io.hub import ResolvedRepo, local_path
from deltakit.io.dtypes import DTYPE_NAMES, SAFETENSORS_DTYPES
from deltakit.io.fp8 import FP8_DTYPE, BlockFp8, block_fp8_layout, dequantize, fp8_layout, scale_name
from deltakit.io.page_cache import available_memory, cached_fraction
from deltakit.names import TensorName


# safetensors' own limit (MAX_HEADER_SIZE): anything larger is refused before it is read.
MAX_HEADER_BYTES = 100_000_000
# torch sizes and strides are int64; a shape past this cannot be allocated even when it holds no elements.
_MAX_ELEMENTS = 2**63 - 1
_METADATA_KEY = "__metadata__"
_LEGACY_TORCH_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_SHARD_NAME = re.compile(r"-\d+-of-\d+\.(safetensors|bin)$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies and what it is, as read from a header (no tensor data).

    For legacy ``.bin`` files the bytes sit inside a pickle archive at no fixed offset: ``start`` is 0 and
    ``end`` is ``nbytes`` there.

    An FP8 block-scaled weight (io/fp8.py) is listed as what it means: ``dtype`` float32, read dequantized;
    ``scale`` names the tensor holding its block scales, and ``start``/``end`` are still its codes' bytes.
    """

    name: TensorName
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int
    scale: TensorName | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class SafetensorsHeader:
    """One weights file's header: its tensors in the order their bytes lie in the file, and its metadata."""

    path: Path
    tensors: dict[TensorName, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of one ``.safetensors`` file, reading no tensor data.

    Validation is as strict as safetensors' own loader (tensors must tile the data section exactly, with no
    gap, overlap or trailing byte), and stricter where Python's JSON is looser than Rust's: duplicate keys,
    ``NaN`` and strings that are not valid Unicode are refused.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        The parsed header; ``tensors`` is ordered by data offset.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CheckpointFormatError: the file is not a well-formed safetensors file; the message names the file and,
            where there is one, the tensor.
    """
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as file:
            file_size = os.fstat(file.fileno()).st_size
            if file_size < 8:
                raise CheckpointFormatError(
                    f"file is {file_size} bytes, too short for a safetensors header (8-byte length + JSON)", path=path
                )
            (header_len,) = struct.unpack("<Q", _read_exactly(file, 8, path))
            if header_len > file_size - 8:
                raise CheckpointFormatError(
                    f"header length {header_len} exceeds the {file_size - 8} bytes after the length field; "
                    "the file is truncated or not safetensors",
                    path=path,
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointFormatError(
                    f"header length {header_len} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes", path=path
                )
            header_bytes = _read_exactly(file, header_len, path)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("no such file", path=path) from e
    except IsADirectoryError as e:
        raise CheckpointFormatError("is a directory, not a .safetensors file", path=path) from e
    return _parse_header(path, header_bytes, file_size)


class Checkpoint:
    """A checkpoint opened for lazy reading: every tensor's name, dtype, shape and location, no data.

    Build one with :func:`open_checkpoint`. Iteration yields tensor names in file order, then in the order
    their bytes lie in each file.

    In an FP8 block-scaled checkpoint (``quant_method: "fp8"``, io/fp8.py) the listing shows each FP8 weight as a
    float32 tensor that :meth:`get` dequantizes, and hides its ``weight_scale_inv``: operations see plain weights.
    :meth:`header` and :attr:`files` still describe the bytes as stored, scales included, for a merge that mirrors
    them.

    Attributes:
        path: what was opened (a directory or a file).
        files: the weight files, in shard order.
        index_path: the ``*.index.json`` of a sharded checkpoint, else None.
        source: the Hub repository and commit ``path`` was fetched from, or None for a local path.
        fp8: the FP8 block layout when some weights are stored as FP8 codes with block scales, else None.
        read_direct: the files read past the page cache (``O_DIRECT``) where the file system allows it; see
            :func:`plan_reads`.
        drop_pages: drop each tensor's pages from the page cache once it is read through it.
    """

    def __init__(
        self, path: Path, files: tuple[Path, ...], index_path: Path | None, headers: dict[Path, SafetensorsHeader],
        source: ResolvedRepo | None = None,
    ) -> None:
        self.path = path
        self.source = source
        self.files = files
        self.index_path = index_path
        self._headers = headers
        self._stored = {name: info for file in files for name, info in headers[file].tensors.items()}
        has_fp8 = any(info.dtype == FP8_DTYPE for info in self._stored.values())
        self.fp8: BlockFp8 | None = fp8_layout(self.config) if has_fp8 else None  # config.json only if needed
        self._tensors = _dequantized_listing(self._stored, self.fp8) if self.fp8 else self._stored
        self.read_direct: frozenset[Path] = frozenset()
        self.drop_pages = False
        self._buffers = BufferPool(_typical_largest(self._stored.values()))
        # Legacy .bin only: the one state dict currently loaded (memory-mapped), as (file, state dict).
        self._loaded_pickle: tuple[Path, dict[str, torch.Tensor]] | None = None

    def __getstate__(self) -> dict:
        # Sent to another process (a Ray task): a legacy state dict loaded here stays here; the receiver loads its own.
        return {**self.__dict__, "_loaded_pickle": None}

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[TensorName]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.files)} file(s), {len(self)} tensors)"

    @property
    def tensors(self) -> dict[TensorName, TensorInfo]:
        """Every tensor's info, by name, in iteration order (a copy: changing it changes nothing here)."""
        return dict(self._tensors)

    @property
    def total_nbytes(self) -> int:
        """Total size of all tensor data, in bytes."""
        return sum(info.nbytes for info in self._tensors.values())

    def info(self, name: TensorName) -> TensorInfo:
        """Look up one tensor's dtype, shape and location.

        Raises:
            TensorMissingError: the checkpoint has no tensor of that name.
        """
        try:
            return self._tensors[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._tensors, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise TensorMissingError(f"no such tensor in this checkpoint{hint}", path=self.path, tensor=name) from None

    def header(self, file: Path) -> SafetensorsHeader:
        """One weight file's header (tensor order and ``__metadata__``), e.g. to mirror its layout on merge.

        For a legacy ``.bin`` file, ``metadata`` is None and ``data_start`` is 0.

        Raises:
            CheckpointNotFoundError: ``file`` is not one of :attr:`files`.
        """
        try:
            return self._headers[Path(file)]
        except KeyError:
            raise CheckpointNotFoundError(f"not one of the weight files of {self.path}", path=file) from None

    def get(self, name: TensorName) -> torch.Tensor:
        """Read one tensor from disk into a CPU tensor of its own dtype and shape, in memory of its own.

        Raises:
            TensorMissingError: no tensor of that name.
            CheckpointFormatError: the file is shorter than its header says (changed since it was opened).
        """
        info = self.info(name)
        if info.file.suffix == ".bin":
            return self._get_from_pickle(info)
        if info.scale is not None:
            return dequantize(self._read(self._stored[name]), self._read(self._stored[info.scale]), self.fp8)
        return self._read(info)

    def get_stored(self, name: TensorName) -> torch.Tensor:
        """Read a tensor as stored: for an FP8 weight its float8 codes; a block-scale tensor by its own name.

        Raises:
            TensorMissingError: no tensor of that name in the files.
        """
        if name not in self._stored:
            raise TensorMissingError("no such tensor in this checkpoint", path=self.path, tensor=name)
        return self._read(self._stored[name])

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return _read_tensor(info, self._buffers, info.file in self.read_direct, self.drop_pages)

    @cached_property
    def config(self) -> dict | None:
        """The parsed ``config.json`` beside the weights (e.g. for ``model_type``), or None if there is none.

        Raises:
            CheckpointFormatError: ``config.json`` is not a JSON object.
        """
        config_path = self.files[0].parent / "config.json"
        if not config_path.is_file():
            return None
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointFormatError(f"not valid JSON ({e})", path=config_path) from e
        if not isinstance(config, dict):
            raise CheckpointFormatError("not a JSON object", path=config_path)
        return config

    def _get_from_pickle(self, info: TensorInfo) -> torch.Tensor:
        if self._loaded_pickle is None or self._loaded_pickle[0] != info.file:
            self._loaded_pickle = None  # drop the previous file's mapping before loading the next
            self._loaded_pickle = (info.file, _load_pickle(info.file))
        stored = self._loaded_pickle[1].get(info.name)
        if stored is None:
            raise CheckpointFormatError(
                "tensor vanished from the file after it was opened", path=info.file, tensor=info.name
            )
        # A copy into our own memory: the stored tensor is a view of a memory-mapped file (or of a shared storage).
        return stored.clone(memory_format=torch.contiguous_format)


def _dequantized_listing(stored: dict[TensorName, TensorInfo], layout: BlockFp8) -> dict[TensorName, TensorInfo]:
    """The listing of an FP8 block-scaled checkpoint: each float8 weight with a ``weight_scale_inv`` beside it as a
    float32 weight, scales hidden. Float8 tensors without scales and scales without a float8 weight stay as they
    are (for the caller's refusal to name).

    Raises:
        CheckpointFormatError: a scale grid whose shape or dtype does not fit its weight and block size.
    """
    listing, scales = {}, set()
    for name, info in stored.items():
        scale = stored.get(scale_name(name))
        if info.dtype != FP8_DTYPE or scale is None or len(info.shape) != 2:
            continue
        expected = layout.scale_shape(info.shape)
        if tuple(scale.shape) != expected or scale.dtype != torch.float32:
            raise CheckpointFormatError(
                f"{str(scale.dtype).removeprefix('torch.')} {list(scale.shape)} block scales for a "
                f"{list(info.shape)} FP8 weight; weight_block_size {list(layout.block)} needs float32 "
                f"{list(expected)}", path=scale.file, tensor=scale.name)
        listing[name] = TensorInfo(name, torch.float32, info.shape, info.file, info.start, info.end, scale.name)
        scales.add(scale.name)
    return {name: listing.get(name, info) for name, info in stored.items() if name not in scales}


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint directory or weights file, reading only headers.

    Args:
        path: a checkpoint directory, a ``.safetensors`` file, a legacy ``.bin`` file, or (when no such path
            exists) a Hub id ``org/name[@revision]``, fetched into the huggingface_hub cache.

    Returns:
        The opened checkpoint; no tensor data has been read.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist, or a directory holds no weights.
        CheckpointLayoutError: the files disagree (index vs shards, a tensor in two shards, several weight
            files and no index, a shard missing).
        CheckpointFormatError: a header, index or pickle is malformed or unsafe.
        HubError, HubUnavailableError: a Hub id that cannot be resolved (see :func:`deltakit.hub.resolve`).
    """
    ckpt_path, source = local_path(path, kind="checkpoint")
    if not ckpt_path.exists():
        raise CheckpointNotFoundError("no such file or directory", path=ckpt_path)
    index_path = None
    if ckpt_path.is_dir():
        index_path, files = _find_weight_files(ckpt_path)
    elif ckpt_path.name.endswith((".safetensors", ".bin")):
        files = (ckpt_path,)
    else:
        raise CheckpointFormatError("not a .safetensors or .bin weights file", path=ckpt_path)
    if index_path is None:
        return Checkpoint(ckpt_path, files, None, {file: _read_listing(file) for file in files}, source)
    weight_map = _read_index(index_path)
    shards = tuple(index_path.parent / name for name in sorted(set(weight_map.values())))
    for shard_path in shards:
        if not shard_path.is_file():
            raise CheckpointLayoutError(f"listed in {index_path.name} but missing", path=shard_path)
    headers = {shard_path: _read_listing(shard_path) for shard_path in shards}
    _check_index_matches_shards(index_path, weight_map, headers)
    return Checkpoint(ckpt_path, shards, index_path, headers, source)


# Tensors beside FP8 weights that hold their per-block scales (DeepSeek-V3 and the FP8 releases built like it):
# where they exist, the F8 tensor holds codes, and the weight is codes x scale.
_FP8_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
_PARAM_NAMES = ("weight", "bias")


def refuse_unsupported_weights(ckpt: Checkpoint) -> None:
    """Refuse, from the headers and config.json, a checkpoint whose weights deltakit cannot compute on correctly.

    An operation calls this on every checkpoint whose weights it will subtract, factorize or merge into, before
    any math. FP8 block-scaled weights (io/fp8.py) are read dequantized and pass. Refused, one line each, naming
    the file and tensor:

    - a ``quantization_config`` in config.json other than FP8 block scales (GPTQ, AWQ, bitsandbytes, per-tensor
      FP8...: the stored tensors are codes deltakit does not decode), naming the layout;
    - FP8 block scales (``*.weight_scale_inv``) with no config to read them by;
    - float8 tensors without scales (no arithmetic of their own; an upcast alone is right only without scales);
    - complex tensors (their imaginary part would be dropped);
    - integer or bool parameters (``*.weight``, ``*.bias``): a factor or a merged delta rounds to zero or wraps.

    Integer buffers that are not parameters (``position_ids``) pass: they are only compared and copied.

    Raises:
        UnsupportedWeightsError: the first such layout or tensor found.
    """
    config = ckpt.config or {}
    if ckpt.fp8 is None:
        # Every layout but FP8 block scales is refused here, naming it; FP8 weights are listed dequantized.
        block_fp8_layout(config, ckpt.files[0].parent / "config.json")
    for name, info in ckpt.tensors.items():
        if name.endswith(_FP8_SCALE_SUFFIXES):  # the scales of no FP8 weight deltakit could pair them with
            raise UnsupportedWeightsError(
                f"FP8 block-scaled weights (this tensor holds the scales of {name.rsplit('.', 1)[0]}.weight), but "
                "config.json has no quantization_config with weight_block_size to read them by", path=info.file,
                tensor=name)
    for name, info in ckpt.tensors.items():
        dtype_name = DTYPE_NAMES[info.dtype]
        if info.dtype.is_complex:
            raise UnsupportedWeightsError(
                f"dtype {dtype_name}: complex weights are not supported (the imaginary part would be lost)",
                path=info.file, tensor=name)
        if info.dtype.is_floating_point and info.dtype.itemsize == 1:
            raise UnsupportedWeightsError(
                f"dtype {dtype_name}: 8-bit float weights are not supported yet; use the bf16 release",
                path=info.file, tensor=name)
        if not info.dtype.is_floating_point and name.rsplit(".", 1)[-1] in _PARAM_NAMES:
            raise UnsupportedWeightsError(
                f"dtype {dtype_name}: integer weights (quantized codes?) cannot be factorized or merged exactly; "
                "use the unquantized (bf16/fp16/fp32) release", path=info.file, tensor=name)


def _find_weight_files(ckpt_dir: Path) -> tuple[Path | None, tuple[Path, ...]]:
    """Find a checkpoint directory's index (whose weight_map then decides the files), else its one weights file."""
    for suffix, unindexed_pattern in ((".safetensors", "*.safetensors"), (".bin", "*pytorch_model*.bin")):
        indexes = sorted(ckpt_dir.glob(f"*{suffix}.index.json"))
        if len(indexes) > 1:
            names = [p.name for p in indexes]
            raise CheckpointLayoutError(f"several index files ({shorten(names)}); keep one", path=ckpt_dir)
        if indexes:
            return indexes[0], ()
        candidates = sorted(p for p in ckpt_dir.glob(unindexed_pattern) if p.is_file())
        if len(candidates) == 1:
            return None, (candidates[0],)
        # transformers loads model.safetensors by name and ignores other files beside it (e.g. Mistral's
        # consolidated.safetensors), so we do too.
        preferred = ckpt_dir / f"model{suffix}"
        if suffix == ".safetensors" and preferred in candidates:
            return None, (preferred,)
        if candidates:
            names = [p.name for p in candidates]
            is_sharded = any(_SHARD_NAME.search(name) for name in names)
            sharded = " (they look like shards; the index is missing)" if is_sharded else ""
            raise CheckpointLayoutError(
                f"several weight files and no index: {shorten(names)}{sharded}; point at one file", path=ckpt_dir
            )
    in_subdirs = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))
    hint = f"; subdirectories with weights: {shorten(in_subdirs)}" if in_subdirs else ""
    raise CheckpointNotFoundError(
        f"no *.safetensors or pytorch_model*.bin weights in this directory{hint}", path=ckpt_dir
    )


def _read_index(index_path: Path) -> dict[TensorName, str]:
    """The index's weight_map, validated: tensor name → shard file name (a plain name in the same directory)."""
    try:
        index = json.loads(index_path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as e:
        raise CheckpointFormatError(f"key {e.key!r} appears twice", path=index_path) from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointFormatError(f"not valid JSON ({e})", path=index_path) from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError('no "weight_map" object of tensor name -> shard file', path=index_path)
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard:
            raise CheckpointFormatError(
                f"shard {shard!r} is not a file name in this directory", path=index_path, tensor=name
            )
    return weight_map


def _check_index_matches_shards(
    index_path: Path, weight_map: dict[TensorName, str], headers: dict[Path, SafetensorsHeader]
) -> None:
    """Every tensor lies in exactly the shard the index names, and every tensor in a shard is indexed."""
    found_in: dict[TensorName, Path] = {}
    for shard_path, header in headers.items():
        for name in header.tensors:
            if name in found_in:
                raise CheckpointLayoutError(
                    f"also in {found_in[name].name}: a tensor in two shards", path=shard_path, tensor=name
                )
            found_in[name] = shard_path
    for name, shard in weight_map.items():
        if name not in found_in:
            raise CheckpointLayoutError(
                f"{index_path.name} lists it, but it is not in that shard", path=index_path.parent / shard, tensor=name
            )
        if found_in[name].name != shard:
            raise CheckpointLayoutError(f"{index_path.name} says it is in {shard}", path=found_in[name], tensor=name)
    unindexed = [name for name in found_in if name not in weight_map]
    if unindexed:
        raise CheckpointLayoutError(
            f"{len(unindexed)} tensor(s) in the shards are not listed in the index: {shorten(unindexed)}",
            path=index_path,
        )


def _read_listing(file: Path) -> SafetensorsHeader:
    """Names, dtypes and shapes of one weights file, without reading tensor data."""
    if file.suffix == ".bin":
        state = _load_pickle(file)
        tensors = {
            name: TensorInfo(name, t.dtype, tuple(t.shape), file, 0, t.numel() * t.dtype.itemsize)
            for name, t in state.items()
        }
        return SafetensorsHeader(file, tensors, None, 0)
    return read_safetensors_header(file)


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """Load a legacy state dict memory-mapped, through torch's weights-only unpickler."""
    # Files from torch < 1.6 are not zip archives and cannot be memory-mapped: those load whole (still safely).
    is_zip = zipfile.is_zipfile(file)
    if not is_zip:
        with open(file, "rb") as stream:
            head = stream.read(14)
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointFormatError("zip archive is truncated or corrupt (no central directory)", path=file)
        # Legacy files open with the pickled magic number: PROTO n, LONG1 of 10 bytes, 0x1950a86a20f9469cfc6c.
        if not (head[:1] == b"\x80" and head[2:] == _LEGACY_TORCH_MAGIC):
            raise CheckpointFormatError(
                "not a PyTorch checkpoint (neither a zip archive nor torch's legacy format)", path=file
            )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        raise CheckpointFormatError(
            "torch.load(weights_only=True) refused it: the pickle holds more than tensors and is unsafe to load; "
            "convert it to safetensors where you trust its source",
            path=file,
        ) from e
    except Exception as e:  # torch reports a corrupt archive as RuntimeError, KeyError, EOFError, ... (open set)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointFormatError(
            f"not a readable PyTorch checkpoint ({type(e).__name__}: {reason})", path=file
        ) from e
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"holds a {type(state).__name__}, not a state dict of tensors", path=file)
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(f"entry is a {type(value).__name__}, not a tensor", path=file, tensor=str(name))
    return state


def _typical_largest(infos: Iterable[TensorInfo]) -> int | None:
    """The size below which the read buffers of a checkpoint are reused: its tensors at the 90th percentile by size,
    with the blocks an ``O_DIRECT`` read adds around them. Above it lie the few outsized ones (embedding, head),
    better freed once read (see io/buffers.py).

    Without those blocks, the typical largest tensors (a 7B's MLP weights) read past the cache each got fresh memory
    and dropped the pool's: 24 GB of huge pages faulted in and zeroed for 27 GB read, beside the SVDs."""
    sizes = sorted(info.nbytes for info in infos)
    return sizes[int(0.9 * (len(sizes) - 1))] + 2 * _DIRECT_ALIGN if sizes else None


def plan_reads(*ckpts: Checkpoint, once: bool = True) -> None:
    """Choose how each weight file of these checkpoints is read: past the page cache (``O_DIRECT``) unless most
    of it is cached already (:attr:`Checkpoint.read_direct`, :attr:`Checkpoint.drop_pages`). With ``once=False``
    (the files are read again and again, as calibration does) only inputs too large to stay cached are.

    A file read through the cache from disk costs the kernel a copy and the cache's upkeep for every page, on the
    cores the math needs: extract -r 16 of a 2 × 2.1 GB pair, page cache dropped, 2 cores, took 12.4 s through the
    cache and 7.1 s past it (19.2 against 11.2 CPU-seconds); a merge of it 9.0 s against 5.9 s. A file that is
    cached already is read from memory (that merge, warm: 5.6 s through the cache, 6.9 s past it). The cost: a file
    read past the cache is not left in it for the next run.

    Inputs that together exceed half the memory available cannot stay cached anyway (every page read would evict an
    older one): all their files are read past the cache, and where the file system refuses ``O_DIRECT`` each
    tensor's pages are dropped once read. A 7B-shaped extract (2 × 13.5 GB, 24 GB of RAM, 2 cores) took 67.8 s with
    the reads spending 52.8 s, and 42.2 s when each tensor's pages were dropped once read (benchmarks/README.md).
    """
    if _O_DIRECT is None and _DROP_CACHE is None:
        return
    total = sum(f.stat().st_size for ckpt in ckpts for f in ckpt.files)
    large = total > available_memory() / 2
    for ckpt in ckpts:
        ckpt.drop_pages = large and _DROP_CACHE is not None
        if _O_DIRECT is not None:
            ckpt.read_direct = frozenset(f for f in ckpt.files if large or (once and _is_uncached(f)))


def _is_uncached(file: Path) -> bool:
    cached = cached_fraction(file)
    return cached is not None and cached < _MOSTLY_CACHED


# A file with at least this fraction of its pages in the page cache is read from it.
_MOSTLY_CACHED = 0.5

# posix_fadvise is missing on macOS and Windows: there, nothing is dropped.
_DROP_CACHE = getattr(os, "POSIX_FADV_DONTNEED", None) if hasattr(os, "posix_fadvise") else None
_O_DIRECT = getattr(os, "O_DIRECT", None)  # Linux; elsewhere every file is read through the cache
# O_DIRECT needs the buffer's address, the file offset and the length to be multiples of the device's logical block
# (512 B or 4 KiB): 4 KiB covers both.
_DIRECT_ALIGN = 4096


def _read_tensor(info: TensorInfo, pool: BufferPool, direct: bool = False, drop: bool = False) -> torch.Tensor:
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    try:
        if direct and _O_DIRECT is not None and info.start % info.dtype.itemsize == 0:
            read = _read_direct(info, pool)
            if read is not None:
                return read.view(info.dtype).view(info.shape)
        raw = pool.take(info.nbytes)
        with open(info.file, "rb", buffering=0) as file:
            file.seek(info.start)
            _readinto_exactly(file, memoryview(raw.numpy()), info.file, info.name)
            if drop:
                os.posix_fadvise(file.fileno(), info.start, info.nbytes, _DROP_CACHE)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError("weights file vanished after the checkpoint was opened", path=info.file) from e
    return raw.view(info.dtype).view(info.shape)


def _read_direct(info: TensorInfo, pool: BufferPool) -> torch.Tensor | None:
    """The tensor's bytes read with ``O_DIRECT`` (no page cache: no copy by the kernel, nothing to evict); None
    where the file system refuses it (tmpfs, some network mounts), for the caller to read through the cache."""
    first = info.start - info.start % _DIRECT_ALIGN
    end = info.start + info.nbytes
    raw = pool.take(-(-end // _DIRECT_ALIGN) * _DIRECT_ALIGN - first, align=_DIRECT_ALIGN)
    try:
        descriptor = os.open(info.file, os.O_RDONLY | _O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    with open(descriptor, "rb", buffering=0) as file:
        file.seek(first)
        buffer = memoryview(raw.numpy())
        filled = 0
        while filled < end - first:  # the last block may run past the end of the file: a short read there is fine
            try:
                count = file.readinto(buffer[filled:])
            except OSError as e:
                if e.errno == errno.EINVAL:
                    return None
                raise
            if not count:
                raise CheckpointFormatError(
                    f"file ends after {max(0, first + filled - info.start)} of {info.nbytes} expected bytes; it was "
                    "truncated or changed", path=info.file, tensor=info.name)
            filled += count
    return raw[info.start - first:end - first]


def _readinto_exactly(file: io.FileIO, buffer: memoryview, path: Path, tensor: TensorName | None) -> None:
    # One read() returns at most ~2 GiB on Linux, so large tensors take several.
    filled = 0
    while filled < len(buffer):
        count = file.readinto(buffer[filled:])
        if not count:
            raise CheckpointFormatError(
                f"file ends after {filled} of {len(buffer)} expected bytes; it was truncated or changed",
                path=path,
                tensor=tensor,
            )
        filled += count


def _read_exactly(file: io.FileIO, size: int, path: Path) -> bytes:
    data = bytearray(size)
    _readinto_exactly(file, memoryview(data), path, None)
    return bytes(data)


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Python's json keeps the last of duplicate keys silently; a header naming a tensor twice is corrupt.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _reject_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def _parse_header(path: Path, header_bytes: bytes, file_size: int) -> SafetensorsHeader:
    try:
        text = header_bytes.decode("utf-8")
        entries = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except _DuplicateKeyError as e:
        raise CheckpointFormatError(f"header names {e.key!r} twice", path=path) from e
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(f"header is not UTF-8 (byte {e.start})", path=path) from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, over-long integers, deep nesting
        raise CheckpointFormatError(f"header is not valid JSON ({str(e)[:200]})", path=path) from e
    if not isinstance(entries, dict):
        raise CheckpointFormatError(f"header is a JSON {type(entries).__name__}, not an object", path=path)

    data_start = 8 + len(header_bytes)
    data_size = file_size - data_start
    metadata = _parse_metadata(path, entries.pop(_METADATA_KEY, None))
    infos = [_parse_entry(path, name, entry, data_start, data_size) for name, entry in entries.items()]

    # Like safetensors, require the tensors to tile the data section exactly; sorting is stable, so empty
    # tensors sharing an offset keep their header order.
    infos.sort(key=lambda info: (info.start, info.end))
    expected_start = data_start
    previous: TensorInfo | None = None
    for info in infos:
        if info.start < expected_start:
            raise CheckpointFormatError(f"data overlaps tensor {previous.name}", path=path, tensor=info.name)
        if info.start > expected_start:
            raise CheckpointFormatError(
                f"{info.start - expected_start} unclaimed bytes before its data (offset {info.start - data_start})",
                path=path,
                tensor=info.name,
            )
        expected_start = info.end
        previous = info
    if expected_start != file_size:
        raise CheckpointFormatError(
            f"{file_size - expected_start} bytes after the last tensor's data; the file does not match its header",
            path=path,
        )
    return SafetensorsHeader(path, {info.name: info for info in infos}, metadata, data_start)


def _parse_metadata(path: Path, metadata: object) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _is_unicode(k) and _is_unicode(v) for k, v in metadata.items()
    ):
        raise CheckpointFormatError(f"{_METADATA_KEY} is not an object of string -> string", path=path)
    return metadata


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    def fail(message: str) -> CheckpointFormatError:
        return CheckpointFormatError(message, path=path, tensor=name if _is_unicode(name) else ascii(name))

    if not _is_unicode(name):
        raise fail("tensor name is not valid Unicode")
    if not isinstance(entry, dict):
        raise fail(f"header entry is a JSON {type(entry).__name__}, not an object")
    dtype_name = entry.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise fail(f"unknown dtype {dtype_name!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(dim) and dim >= 0 for dim in shape):
        raise fail(f"shape {_short(shape)} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    is_pair = isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
    if not (is_pair and 0 <= offsets[0] <= offsets[1]):
        raise fail(f"data_offsets {_short(offsets)} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise fail(f"data ends at byte {data_start + end}, beyond the end of the file ({data_start + data_size} bytes)")
    # Bound the element count by what the file can hold before multiplying further, so absurd shapes cost
    # neither time nor memory; zero dimensions still count as 1 toward torch's int64 size limit.
    numel, bound = 1, 1
    for dim in shape:
        numel = numel * dim if numel * dim <= data_size else data_size + 1
        bound *= max(dim, 1)
        if bound > _MAX_ELEMENTS:
            raise fail(f"shape {_short(shape)} is too large for torch (more than 2^63 - 1 elements)")
    needed = f"{numel * dtype.itemsize} bytes" if numel <= data_size else "more bytes than the file holds"
    if end - begin != numel * dtype.itemsize:
        raise fail(
            f"data_offsets [{begin}, {end}] span {end - begin} bytes, but {dtype_name} {_short(shape)} needs {needed}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_unicode(text: str) -> bool:
    # json.loads accepts lone surrogate escapes ("\ud800"), which no UTF-8 writer can encode back.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(value: object) -> str:
    # A hostile header can hold a list of millions of items; show a bounded prefix of it.
    return _SHORT_REPR.repr(value)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = 6
_SHORT_REPR.maxlevel = 2
_SHORT_REPR.maxstring = _SHORT_REPR.maxlong = 40
