"""``merge`` and ``unmerge``: fold PEFT LoRA/DoRA adapters into a base checkpoint, and take them out again.

Streaming (DESIGN.md §6). The output mirrors the base: the same shard file names, index, tensor order, dtypes and
``__metadata__``; every other top-level file (config, tokenizer, generation config, ...) is copied. Without a
``dtype`` override each output shard has the base shard's header bytes and layout, so what no adapter touches
(the header, unchanged tensors) is copied file to file by the kernel (``copy_file_range``) and never enters this
process. A changed tensor is read as raw bytes into one of two reused buffers and processed in blocks of rows of
its (out, in) matrix: every operation here (LoRA's ΔW, DoRA's per-row norm and rescaling) is row-local, so the
fp32 working set is one block, and the result is written over the tensor's own bytes when the dtype stays the
same, then written out on a background thread while the next is read (each shard's closing fsync too). With a
``dtype`` override every tensor goes that way (cast) into a header-first :class:`~deltakit.writer.SafetensorsWriter`.
Peak memory is the two buffers (twice the largest tensor read), a block, and the adapters (held whole; they are
small), whatever the shard or model size. The output is built in a staging sibling and renamed into place only
when complete.

Semantics, with W0 the base weight, ΔW_k = w_k · s_k · B_k @ A_k (w_k the merge weight, s_k the adapter's
scaling for that module) in PEFT's (out, in) orientation:

- LoRA: W ← W + ΔW_k. LoRA adapters commute with each other.
- DoRA, as PEFT 0.21's ``merge_and_unload`` does it (``DoraLinearVariant.merge_unsafe`` with
  ``_unmerged_base_weight``): the row norms are those of the *unmerged base* plus this adapter,
  n_k = ‖W0 + ΔW_k‖ per row, and W ← (m_k / n_k) ⊙ (W + ΔW_k). So adapters are applied in the order given, and
  a DoRA adapter's rescaling also applies to everything merged before it, not to what comes after.
- A merge weight scales ΔW_k only, never the DoRA magnitude (PEFT's ``set_scale``).
- ``modules_to_save`` params and ``base_layer.bias`` (PEFT ``bias="lora_only"``) replace the base tensor; with a
  merge weight w ≠ 1 the change is interpolated like a delta, W0 + w · (saved − W0). A replaced tensor may not
  also be changed by another adapter (the result would depend on the order): that is refused.
- A targeted layer's own weight saved in the adapter (``M.base_layer.weight``, PEFT's ``save_embedding_layers``)
  is a copy of the base layer: checked equal to the base, then ignored (refused if it differs).
- An output head tied to the input embedding (``tie_word_embeddings``; the base stores only the embedding) IS
  the embedding: its factors, which extract stores as the embedding's transposed, are checked to be exactly
  that and skipped, so ΔE is applied once (PEFT 0.21's ``merge_and_unload`` applies it twice, once through each
  LoRA, into the shared tensor). Other factors for such a head are refused. A base that stores both tensors
  gets each its own factors.

Receipt. ``merge`` writes ``deltakit_merge_receipt/`` into its output: each adapter's content hash and merge
weight, each DoRA step's row norms n_k (fp32), and the base value of every replaced tensor. ``unmerge`` with
the same adapters applies the inverses in reverse order: W ← W − ΔW_k (LoRA), W ← W ⊙ n_k / m_k − ΔW_k (DoRA),
replaced tensors restored from the receipt byte for byte. Without a matching receipt only LoRA adapters that
replace nothing can be unmerged (DoRA's norms are one unknown per row; replaced values are gone).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from deltakit.adapters.peft_format import (
    WEIGHTS_FILE,
    Adapter,
    ModuleFactors,
    check_supported,
    parse_weights,
    read_adapter,
)
from deltakit.io.checkpoint import Checkpoint, SafetensorsHeader, TensorInfo, open_checkpoint
from deltakit.io.fp8 import dequantize, quantize
from deltakit.math.dora import row_norms, unapply_dora
from deltakit.errors import (
    AdapterFormatError,
    CheckpointFormatError,
    InvalidOptionError,
    NonFiniteError,
    ReceiptMissingError,
    TensorMismatchError,
    TensorMissingError,
    shorten,
)
from deltakit.io.dtypes import parse_dtype
from deltakit.math.factorize import resolve_device
from deltakit.names import TensorName
from deltakit.adapters.layers import (
    TiedHead,
    WeightKind,
    find_tied_head,
    out_in_shape,
    to_out_in,
    transpose_embedding_factors,
    weight_kind,
)
from deltakit.ops.report import EXTRACT_REPORT_FILE, command_line, format_bytes
from deltakit.io.writer import SafetensorsWriter, no_room_as_error, refuse_overlap, staged_output, write_json

RECEIPT_DIR = "deltakit_merge_receipt"
RECEIPT_JSON = "receipt.json"
RECEIPT_TENSORS = "receipt.safetensors"
_RECEIPT_FORMAT = "deltakit-merge-receipt/1"
# Files beside the weights that are themselves weights in another format (or their index): copying them would
# ship stale, unmerged weights next to the merged ones, so they are skipped and reported.
_OTHER_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# fp32 elements per block of rows. On CPU 1 MiB: the block stays in cache from the load through the LoRA product
# to the store, ~35 % faster than 16 MiB blocks (bf16 (5632, 2048) weight, rank 16, one core). On CUDA 64 MiB:
# each block costs two transfers, a few kernel launches and a synchronizing finiteness check.
_BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}


@dataclass(frozen=True)
class _Step:
    """One adapter's operation on one base tensor."""

    adapter: int  # position in the adapter list
    op: str  # "lora", "dora" or "replace"
    factors: ModuleFactors | None = None  # lora, dora
    key: str | None = None  # replace: the adapter key that holds the new value


@dataclass
class _Job:
    tensor: TensorName
    kind: WeightKind
    steps: list[_Step]


@dataclass
class TensorChange:
    """A tensor the operation changes, and how: ``steps`` lists (adapter number from 1, op) in application order."""

    tensor: TensorName
    steps: list[tuple[int, str]]

    def describe(self) -> str:
        return " then ".join(f"{op} #{k}" for k, op in self.steps)


@dataclass
class RequantizedTensor:
    """An FP8 weight a merge changed and stored again as FP8 codes with fresh block scales."""

    tensor: TensorName
    delta_norm: float  # ‖W' − W‖, the change the adapters make (dequantized)
    relative_to_delta: float  # ‖Q(W') − W'‖ / ‖W' − W‖: how much of that change the requantization loses
    relative_to_weight: float  # ‖Q(W') − W'‖ / ‖W'‖: FP8's own precision (e4m3: a few percent)


@dataclass
class MergeReport:
    """What a merge or unmerge did (or, with ``dry_run``, would do)."""

    operation: str  # "merge" or "unmerge"
    base: str  # the checkpoint read: the base for merge, the merged checkpoint for unmerge
    adapters: list[str]
    weights: list[float]
    out: str
    dry_run: bool = False
    changed: list[TensorChange] = field(default_factory=list)
    unchanged: int = 0  # tensors copied byte for byte (or only cast with ``dtype``)
    weight_files: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)  # copied as they are
    skipped_files: list[str] = field(default_factory=list)  # beside the weights but not copied, with the reason
    receipt: str = ""  # what happened to the receipt
    bytes_written: int = 0
    seconds: float = 0.0
    command: str = ""
    notes: list[str] = field(default_factory=list)
    requantized: list[RequantizedTensor] = field(default_factory=list)  # FP8 weights written as FP8 again
    adapter_errors: list[float | None] = field(default_factory=list)  # each adapter's own worst error, if known

    def to_json(self) -> dict:
        data = asdict(self)
        data["changed"] = [{"tensor": c.tensor, "steps": [list(s) for s in c.steps]} for c in self.changed]
        return data

    def summary_lines(self) -> list[str]:
        """The human summary the CLI prints."""
        ops: dict[str, int] = {}
        for change in self.changed:
            for _, op in change.steps:
                ops[op] = ops.get(op, 0) + 1
        verb = "would write" if self.dry_run else "wrote"
        lines = [f"{verb} {self.out}"]
        lines += [f"  adapter #{i + 1}         : {a} (weight {w:g})"
                  for i, (a, w) in enumerate(zip(self.adapters, self.weights))]
        lines.append(f"  tensors changed    : {len(self.changed)}"
                     + (f" ({', '.join(f'{op} {n}' for op, n in sorted(ops.items()))})" if ops else ""))
        lines.append(f"  tensors unchanged  : {self.unchanged}")
        lines.append(f"  weight files       : {len(self.weight_files)}; other files copied: {len(self.other_files)}")
        if self.receipt:
            lines.append(f"  receipt            : {self.receipt}")
        if self.dry_run:
            lines += [f"    {c.tensor}: {c.describe()}" for c in self.changed[:20]]
            if len(self.changed) > 20:
                lines.append(f"    ... {len(self.changed) - 20} more")
        else:
            rate = self.bytes_written / self.seconds if self.seconds > 0 else 0.0
            lines.append(f"  written            : {format_bytes(self.bytes_written)} in {self.seconds:.1f} s "
                         f"({format_bytes(rate)}/s)")
        if self.requantized:
            worst = max(self.requantized, key=lambda r: r.relative_to_delta)
            own = [e for e in self.adapter_errors if e is not None]
            lines.append(f"  FP8 requantized    : {len(self.requantized)} weight(s); error ‖Q(W')−W'‖ worst "
                         f"{worst.relative_to_delta:.4f} of ‖ΔW‖ ({worst.tensor}), "
                         f"{max(r.relative_to_weight for r in self.requantized):.4f} of ‖W'‖"
                         + (f"; the adapter's own error (extract report): worst {max(own):.4f} of ‖ΔW‖" if own else ""))
        lines += [f"  skipped: {s}" for s in self.skipped_files]
        lines += [f"  note: {n}" for n in self.notes]
        return lines


# --- planning: every check from headers (and the small adapters) before anything is written --------------------


def _name_map(adapter: Adapter, ckpt: Checkpoint, tied: TiedHead | None):
    """How the adapter's module names map onto the checkpoint's tensor names.

    PEFT names modules as in the transformers model class (``transformer.h.0.attn.c_attn``), while some
    checkpoints on the Hub store the inner model without its prefix (``h.0.attn.c_attn.weight``, the original
    GPT-2): when nothing resolves as is but everything does without the first component, that is used. A tied
    head (``tied``) has no tensors of its own to resolve.
    """
    modules = [(m, e) for m, e in adapter.modules.items() if tied is None or m != tied.head]
    wanted = [f"{m}.weight" for m, e in modules if e.key_a is not None]
    wanted += [f"{m}.bias" for m, e in modules if e.base_bias_key is not None]
    wanted += [_unwrapped(name) for name in adapter.saved]

    def identity(name: str) -> str:
        return name

    def strip_first(name: str) -> str:
        return name.partition(".")[2]

    if all(n in ckpt for n in wanted) or not wanted:
        return identity
    if all("." in n and strip_first(n) in ckpt for n in wanted):
        return strip_first
    return identity


def _unwrapped(name: TensorName) -> TensorName:
    """``M.base_layer.weight`` → ``M.weight``: PEFT's name for a targeted layer's own params inside its wrapper."""
    return name.replace(".base_layer.", ".")


def _factor_kind(adapter: Adapter, module: str, tensor: TensorName, stored: tuple[int, ...],
                 a_shape: tuple[int, ...], b_shape: tuple[int, ...], is_embedding: bool,
                 model_type: str | None) -> WeightKind:
    """The kind of a targeted weight, from the factor shapes, the stored shape, ``fan_in_fan_out`` and the name.

    Factors are (out, in): A (r, in), B (out, r). Linear stores (out, in); Conv1D and embeddings store (in, out).
    PEFT decides Linear vs Conv1D by the layer class (and corrects ``fan_in_fan_out`` to match), which a
    checkpoint does not record; here a non-square weight's shape decides when the config flag or the name agrees
    with it, and a square one follows the flag when the name does not contradict it. Anything else is refused.
    """
    where = adapter.path / WEIGHTS_FILE
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise AdapterFormatError(f"module {module}: factors of shape {list(a_shape)}, {list(b_shape)}; only 2-D "
                                 "(Linear, Conv1D, Embedding) LoRA can be merged", path=where)
    if a_shape[0] != b_shape[1]:
        raise AdapterFormatError(f"module {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} disagree on "
                                 "the rank", path=where)
    out, inp = b_shape[0], a_shape[1]
    mismatch = (f"adapter {adapter.path} module {module}: factors give (out, in) = ({out}, {inp}) but the base "
                f"weight is {list(stored)}; is this adapter for this base model?")
    if len(stored) != 2:
        raise TensorMismatchError(mismatch, tensor=tensor)
    if is_embedding:
        if out_in_shape(stored, WeightKind.EMBEDDING) != (out, inp):
            raise TensorMismatchError(mismatch, tensor=tensor)
        return WeightKind.EMBEDDING
    by_flag = WeightKind.CONV1D if adapter.fan_in_fan_out else WeightKind.LINEAR
    by_name = weight_kind(tensor, stored, model_type)
    by_name = WeightKind.CONV1D if by_name is WeightKind.CONV1D else WeightKind.LINEAR
    fits = [k for k in (WeightKind.LINEAR, WeightKind.CONV1D) if out_in_shape(stored, k) == (out, inp)]
    if not fits:
        raise TensorMismatchError(mismatch, tensor=tensor)
    if len(fits) == 1 and fits[0] in (by_flag, by_name):
        return fits[0]
    if len(fits) == 2 and by_flag is by_name:
        return by_flag
    raise TensorMismatchError(
        f"adapter {adapter.path} module {module}: cannot tell whether the {list(stored)} weight is Linear or Conv1D "
        f"(fan_in_fan_out={adapter.fan_in_fan_out}, the name suggests {by_name.value}, the shapes fit "
        f"{' or '.join(k.value for k in fits)})", tensor=tensor)


def _require(ckpt: Checkpoint, adapter: Adapter, tensor: TensorName, what: str,
             shape: tuple[int, ...] | None, tied: TiedHead | None) -> TensorInfo:
    if tensor not in ckpt:
        if tied is not None and tensor == f"{tied.head}.weight":
            # The tensor is the input embedding's; replacing it would change the embedding as well.
            raise TensorMissingError(f"adapter {adapter.path} has {what}, but the base ties {tied.head} to "
                                     f"{tied.embedding} and stores no weight of its own; deltakit cannot merge a "
                                     "tied head's own update", path=ckpt.path, tensor=tensor)
        raise TensorMissingError(f"adapter {adapter.path} has {what}, but the base has no such tensor; is this "
                                 "adapter for this base model?", path=ckpt.path, tensor=tensor)
    info = ckpt.info(tensor)
    if shape is not None and tuple(info.shape) != tuple(shape):
        raise TensorMismatchError(f"adapter {adapter.path} has {what} of shape {list(shape)}, the base's is "
                                  f"{list(info.shape)}", path=ckpt.path, tensor=tensor)
    if not info.dtype.is_floating_point:
        raise TensorMismatchError(f"adapter {adapter.path} has {what}, but the base tensor is {info.dtype}",
                                  path=ckpt.path, tensor=tensor)
    return info


def _check_layer_copy(ckpt: Checkpoint, adapter: Adapter, tensor: TensorName, key: str) -> None:
    """A targeted layer's own weight saved in the adapter (PEFT's ``save_embedding_layers``): a copy of the base
    layer that PEFT loads back before applying LoRA. Nothing to do when it equals the base; refused otherwise."""
    saved, base_value = adapter.weights.get(key), ckpt.get(tensor)
    if not torch.equal(saved.to(base_value.dtype), base_value):
        raise AdapterFormatError(f"{key} differs from the base's {tensor}; the adapter was trained on another base "
                                 "(merge that base layer first)", path=adapter.path / WEIGHTS_FILE)


def _check_tied_head(adapter: Adapter, module: str, tied: TiedHead, to_base: Callable[[str], str]) -> None:
    """A tied head's factors must be the embedding's, transposed (what extract stores, and what PEFT's
    ``ensure_weight_tying`` shares), with the same scaling: then the embedding's update, merged once into the one
    tensor the base stores, is the head's update too.

    Raises:
        TensorMissingError: anything else, which would need a head weight of its own.
    """
    entries = adapter.modules
    embedding = next((m for m, e in entries.items()
                      if e.key_a is not None and to_base(f"{m}.weight") == f"{tied.embedding}.weight"), None)
    if embedding is None:
        problem = f"the adapter has no factors for {tied.embedding} to share with it"
    elif adapter.use_dora:
        problem = "a DoRA magnitude cannot be shared between the two"
    else:
        head_a, head_b = (adapter.weights.get(entries[module].key_a), adapter.weights.get(entries[module].key_b))
        embedding_a, embedding_b = (adapter.weights.get(entries[embedding].key_a),
                                    adapter.weights.get(entries[embedding].key_b))
        expected_a, expected_b = transpose_embedding_factors(embedding_a, embedding_b)
        if not (entries[embedding].is_embedding and torch.equal(head_a, expected_a)
                and torch.equal(head_b, expected_b)):
            problem = f"its factors are not {embedding}'s transposed"
        elif adapter.scaling(module) != adapter.scaling(embedding):
            problem = f"its scaling {adapter.scaling(module):g} differs from {embedding}'s"
        else:
            return
    raise TensorMissingError(f"module {module}: the base ties this head to {tied.embedding} and stores no weight "
                             f"of its own, and {problem}; merging it would change the input embedding as well",
                             path=adapter.path / WEIGHTS_FILE, tensor=f"{module}.weight")


def _plan(ckpt: Checkpoint, adapters: list[Adapter], *,
          is_base: bool) -> tuple[dict[TensorName, _Job], list[str]]:
    """Every step of every adapter, by base tensor, in adapter order; all input errors raised here.

    ``is_base``: ``ckpt`` is the base (merge), so the layer copies an adapter carries can be checked against it.
    An output head tied to the input embedding (stored once, under the embedding's name) gets no step of its
    own: its factors are checked to be the embedding's, whose step then covers it; its bias, where saved under
    another module's name (BERT's ``cls.predictions.bias``), is that tensor.

    Returns:
        The jobs by tensor name, and notes for the report.

    Raises:
        AdapterFormatError, TensorMissingError, TensorMismatchError, InvalidOptionError.
    """
    model_type = (ckpt.config or {}).get("model_type")
    tied = find_tied_head(ckpt, ckpt.config or {})
    jobs: dict[TensorName, _Job] = {}
    notes: list[str] = []

    def add(tensor: TensorName, kind: WeightKind, step: _Step) -> None:
        jobs.setdefault(tensor, _Job(tensor, kind, [])).steps.append(step)

    for k, adapter in enumerate(adapters):
        check_supported(adapter)
        to_base = _name_map(adapter, ckpt, tied)
        where = adapter.path / WEIGHTS_FILE
        for module, entry in adapter.modules.items():
            is_tied_head = tied is not None and module == tied.head
            if entry.key_a is None:
                if entry.magnitude_key is not None:
                    raise AdapterFormatError(f"module {module} has a DoRA magnitude but no LoRA factors", path=where)
            elif is_tied_head:
                _check_tied_head(adapter, module, tied, to_base)
                notes.append(f"adapter #{k + 1}: {module} is tied to {tied.embedding} (the base stores no "
                             f"{module}.weight) and its factors are the embedding's, transposed: the embedding's "
                             "update, merged once, is the head's")
            else:
                tensor = to_base(f"{module}.weight")
                info = _require(ckpt, adapter, tensor, f"LoRA factors for module {module}", None, tied)
                a_shape = adapter.weights.info(entry.key_a).shape
                b_shape = adapter.weights.info(entry.key_b).shape
                kind = _factor_kind(adapter, module, tensor, info.shape, a_shape, b_shape, entry.is_embedding,
                                    model_type)
                if adapter.use_dora != (entry.magnitude_key is not None):
                    state = "has no" if adapter.use_dora else "has a"
                    raise AdapterFormatError(f"module {module} {state} lora_magnitude_vector but use_dora is "
                                             f"{str(adapter.use_dora).lower()}", path=where)
                if entry.magnitude_key is not None:
                    magnitude_shape = adapter.weights.info(entry.magnitude_key).shape
                    if tuple(magnitude_shape) != (b_shape[0],):
                        raise AdapterFormatError(f"module {module}: lora_magnitude_vector has shape "
                                                 f"{list(magnitude_shape)}, expected [{b_shape[0]}]", path=where)
                factors = adapter.factors(module, kind)
                add(tensor, kind, _Step(k, "dora" if adapter.use_dora else "lora", factors))
            if entry.base_bias_key is not None:
                tensor = tied.bias if is_tied_head and tied.bias is not None else to_base(f"{module}.bias")
                shape = adapter.weights.info(entry.base_bias_key).shape
                _require(ckpt, adapter, tensor, f"a base_layer.bias for module {module}", shape, tied)
                add(tensor, WeightKind.OTHER, _Step(k, "replace", key=entry.base_bias_key))
        for name, key in adapter.saved.items():
            tensor = to_base(_unwrapped(name))
            _require(ckpt, adapter, tensor, f"modules_to_save param {name}", adapter.weights.info(key).shape, tied)
            if name != _unwrapped(name):
                if is_base:
                    _check_layer_copy(ckpt, adapter, tensor, key)
            else:
                add(tensor, WeightKind.OTHER, _Step(k, "replace", key=key))

    for job in jobs.values():
        replacing = [s for s in job.steps if s.op == "replace"]
        if replacing and ckpt.info(job.tensor).scale is not None:
            raise AdapterFormatError(
                f"adapter #{replacing[0].adapter + 1} replaces this FP8 block-scaled weight whole (modules_to_save); "
                "deltakit merges only LoRA/DoRA factors into FP8 weights", path=ckpt.path, tensor=job.tensor)
        if replacing and len(job.steps) > 1:
            others = sorted({s.adapter + 1 for s in job.steps if s is not replacing[0]})
            raise InvalidOptionError(
                f"adapter #{replacing[0].adapter + 1} replaces this tensor and adapter(s) #"
                f"{', #'.join(map(str, others))} also change it; the result would depend on the order: merge them "
                "in separate runs", path=ckpt.path, tensor=job.tensor)
    return jobs, notes


def _changes(jobs: dict[TensorName, _Job], ckpt: Checkpoint, reverse: bool) -> list[TensorChange]:
    changes = []
    for name in ckpt:
        if name in jobs:
            steps = [(s.adapter + 1, s.op) for s in jobs[name].steps]
            changes.append(TensorChange(name, steps[::-1] if reverse else steps))
    return changes


# --- the per-tensor math -----------------------------------------------------------------------------------------


def _dora_factor(norms: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m / n per row; a zero-norm row gets 0 instead of NaN (as :func:`deltakit.dora.apply_dora`)."""
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return torch.where(norms > 0, magnitude / safe, torch.zeros_like(norms))


class _Factors:
    """A step's factors on the math device, in fp32, with its weighted scaling."""

    def __init__(self, step: _Step, weight: float, device: torch.device) -> None:
        f = step.factors
        self.scale = weight * f.scaling
        self.a = f.a.to(device, torch.float32)  # (r, in)
        self.b = f.b.to(device, torch.float32)  # (out, r)
        self.magnitude = f.magnitude.to(device, torch.float32) if f.magnitude is not None else None  # (out,)

    def delta(self, r0: int, r1: int) -> torch.Tensor:
        return (self.b[r0:r1] @ self.a).mul_(self.scale)  # (rows, in)


def _transform_factorized(job: _Job, stored: torch.Tensor, out_dtype: torch.dtype, weights: list[float],
                          device: torch.device, norms: dict[int, torch.Tensor], inverse: bool) -> torch.Tensor:
    """Apply (or, with ``inverse``, undo in reverse order) the LoRA/DoRA steps of one weight, block by block.

    ``norms`` maps step index → (out,) row norms: filled in by a merge, read by an unmerge.
    """
    result = stored if out_dtype == stored.dtype else torch.empty(stored.shape, dtype=out_dtype)
    base_oi, result_oi = to_out_in(stored, job.kind), to_out_in(result, job.kind)  # views, (out, in)
    rows, cols = base_oi.shape
    steps = list(enumerate(job.steps))
    if inverse:
        steps.reverse()
    factors = {i: _Factors(step, weights[step.adapter], device) for i, step in steps}
    if not inverse:
        for i, step in steps:
            if step.op == "dora":
                norms[i] = torch.empty(rows, dtype=torch.float32)
    # A DoRA step's norms are taken from W0 + ΔW_k, so W0 must be kept when an earlier step changes the block.
    keep_base = not inverse and any(step.op == "dora" for _, step in steps[1:])
    block = max(1, _BLOCK_ELEMENTS[device.type] // max(cols, 1))
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        work = torch.empty((r1 - r0, cols), dtype=torch.float32, device=device)
        work.copy_(base_oi[r0:r1])
        base_block = work.clone() if keep_base else work
        for i, step in steps:
            f = factors[i]
            if step.op == "lora":
                work.addmm_(f.b[r0:r1], f.a, alpha=-f.scale if inverse else f.scale)
            elif inverse:
                work = unapply_dora(work, f.delta(r0, r1), f.magnitude[r0:r1], norms[i][r0:r1].to(device))
            else:
                delta = f.delta(r0, r1)
                block_norms = row_norms(base_block + delta)
                norms[i][r0:r1] = block_norms.cpu()
                work.add_(delta).mul_(_dora_factor(block_norms, f.magnitude[r0:r1])[:, None])
                del delta
        # A NaN or ±Inf anywhere makes the sum non-finite: one pass, a third of aminmax's time. Only then look
        # closer, as finite values can sum to ±Inf; aminmax shows NaN and ±Inf without full-size temporaries.
        if not torch.isfinite(work.sum()) and not all(bool(torch.isfinite(x)) for x in torch.aminmax(work)):
            raise NonFiniteError(f"the {'unmerged' if inverse else 'merged'} weight has NaN or Inf in rows "
                                 f"{r0}–{r1 - 1}", tensor=job.tensor)
        result_oi[r0:r1].copy_(work)
    return result


def _replaced_value(base_value: torch.Tensor, new_value: torch.Tensor, weight: float,
                    out_dtype: torch.dtype) -> torch.Tensor:
    if weight == 1.0:
        return new_value.to(out_dtype)  # exact: the adapter's own value
    return (base_value.float() + weight * (new_value.float() - base_value.float())).to(out_dtype)


# --- files --------------------------------------------------------------------------------------------------------


def _out_dtype(info: TensorInfo, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and info.dtype.is_floating_point else info.dtype


def _copy_other_files(ckpt: Checkpoint, staging_dir: Path | None, dtype: torch.dtype | None,
                      report: MergeReport) -> None:
    """Copy the checkpoint directory's non-weight files (config, tokenizer, ...) into ``staging_dir`` (None: only
    list them); skip weights in other formats and subdirectories (a receipt among them), listing each."""
    if not ckpt.path.is_dir():
        return
    own = {p.name for p in ckpt.files} | ({ckpt.index_path.name} if ckpt.index_path else set())
    for path in sorted(ckpt.path.iterdir()):
        if path.name in own:
            continue
        if path.is_dir():
            if path.name != RECEIPT_DIR:  # a merged base's receipt is replaced by this run's (or by none)
                report.skipped_files.append(f"{path.name}/ (a directory; not copied)")
        elif path.name.endswith(_OTHER_WEIGHT_SUFFIXES):
            report.skipped_files.append(f"{path.name} (weights in another format; they would not hold the merge)")
        elif staging_dir is None:
            report.other_files.append(path.name)
        elif path.name == "config.json" and dtype is not None:
            config = json.loads(path.read_text(encoding="utf-8"))
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = str(dtype).removeprefix("torch.")
            if ckpt.fp8 is not None:
                del config["quantization_config"]  # the weights are written dequantized
            write_json(staging_dir / path.name, config)
            report.other_files.append(path.name)
        elif path.is_file():
            shutil.copyfile(path, staging_dir / path.name)
            report.other_files.append(path.name)


def _write_index(ckpt: Checkpoint, staging_dir: Path, dtype: torch.dtype | None) -> None:
    if ckpt.index_path is None:
        return
    target = staging_dir / ckpt.index_path.name
    if dtype is None:
        shutil.copyfile(ckpt.index_path, target)
        return
    index = json.loads(ckpt.index_path.read_text(encoding="utf-8"))
    if ckpt.fp8 is not None:  # a plain output: block scales are gone
        index["weight_map"] = {name: shard for name, shard in index["weight_map"].items() if name in ckpt}
    if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
        total = 0
        for info in ckpt.tensors.values():
            total += info.numel * _out_dtype(info, dtype).itemsize
        index["metadata"]["total_size"] = total
    write_json(target, index)


def _own_error(adapter: Adapter) -> float | None:
    """The adapter's worst relative error of ΔW, from the report extract wrote beside it (None if none)."""
    try:
        report = json.loads((adapter.path / EXTRACT_REPORT_FILE).read_text(encoding="utf-8"))
        return float(report["summary"]["max_relative_error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def adapter_hash(adapter: Adapter) -> str:
    """SHA-256 of an adapter's config (canonical JSON) and weight bytes: what a receipt records to match it."""
    digest = hashlib.sha256(json.dumps(adapter.config, sort_keys=True).encode("utf-8"))
    for path in adapter.weights.files:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Receipt:
    """What ``unmerge`` reads back from a merged checkpoint's receipt, in the order the adapters were merged."""

    order: list[int]  # merge position → position in the caller's adapter list
    weights: list[float]  # by merge position
    tensors: Checkpoint


def _norms_key(adapter: int, tensor: TensorName) -> str:
    return f"norms.{adapter}.{tensor}"


def _base_key(tensor: TensorName) -> str:
    return f"base.{tensor}"


def _receipt_specs(ckpt: Checkpoint, jobs: dict[TensorName, _Job],
                   is_plain: bool) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The receipt's tensors, in the order the merge produces them (file order, then step order). An FP8 weight
    comes up with the first of its codes and its scales when they are written again (``is_plain`` False), else
    where its codes lie."""
    specs = []
    owner = {} if is_plain else {info.scale: name for name, info in ckpt.tensors.items() if info.scale is not None}
    stored_order = (owner.get(name, name) for file in ckpt.files for name in ckpt.header(file).tensors)
    for name in dict.fromkeys(stored_order):
        job = jobs.get(name)
        for step in job.steps if job else []:
            info = ckpt.info(name)
            if step.op == "dora":
                specs.append((_norms_key(step.adapter, name), torch.float32, (step.factors.b.shape[0],)))
            elif step.op == "replace":
                specs.append((_base_key(name), info.dtype, tuple(info.shape)))
    return specs


# --- the shared driver ---------------------------------------------------------------------------------------------


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the CPU math on one thread. Each 1 MiB block is too small to split: with torch's default pool, a
    2 GB merge on 2 busy cores took 41 CPU-seconds of OpenMP threads spinning for each other, against 0.6 on one
    thread, which already outpaces the disk."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    """An output shard laid out exactly as its base shard (the same header bytes, tensor offsets and size), for
    a run that changes no dtype. Written front to back: what stays as it is (the header, unchanged tensors) is
    copied file to file by the kernel, never through this process's memory; a changed tensor's bytes are written
    at its own offset. As a context manager, an exception closes without syncing (the staging directory is
    removed anyway)."""

    def __init__(self, base_path: Path, out_path: Path, header: SafetensorsHeader) -> None:
        self._header = header
        self._out_path = out_path
        self._end = max((info.end for info in header.tensors.values()), default=header.data_start)
        self._base = open(base_path, "rb", buffering=0)
        try:
            self._out = open(out_path, "xb", buffering=0)
        except BaseException:
            self._base.close()
            raise
        self._written = 0  # the output holds the base's layout up to here

    def __enter__(self) -> _MirroredShard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._base.close()
            self._out.close()

    def write(self, name: TensorName, tensor: torch.Tensor) -> None:
        """Copy the base up to this tensor, then write its new bytes (same dtype and shape)."""
        info = self._header.tensors[name]
        with no_room_as_error(self._out_path):
            self._copy_until(info.start)
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            while view:  # unbuffered writes may be partial
                view = view[self._out.write(view):]
        self._written = info.end

    def close(self) -> None:
        """Copy the rest of the base, sync to disk and close (once)."""
        if self._out.closed:
            return
        with no_room_as_error(self._out_path):
            self._copy_until(self._end)
            os.fsync(self._out.fileno())
            self._out.close()
        self._base.close()

    def _copy_until(self, end: int) -> None:
        while self._written < end:
            copied = _copy_range(self._base.fileno(), self._out.fileno(), self._written, end - self._written)
            if not copied:
                raise CheckpointFormatError(f"file ends at byte {self._written}, before {self._end}; it changed "
                                            "since it was opened", path=self._base.name)
            self._written += copied


# copy_file_range may be refused between filesystems (older kernels), by a filesystem without support, or by a
# seccomp filter (EPERM: container runtimes that predate the syscall).
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def _copy_range(source: int, target: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes of ``source`` from ``offset`` to ``target`` at its position; return how many
    (0: end of file). In the kernel where it can (a reflink on filesystems that share extents), else through a
    64 MiB buffer."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(source, target, count, offset)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
    os.lseek(source, offset, os.SEEK_SET)  # the source is this shard's own handle
    data = os.read(source, min(count, 1 << 26))
    view = memoryview(data)
    while view:
        view = view[os.write(target, view):]
    return len(data)


def _run(ckpt: Checkpoint, jobs: dict[TensorName, _Job], staging_dir: Path, *, weights: list[float],
         dtype: torch.dtype | None, device: torch.device, adapters: list[Adapter], report: MergeReport,
         receipt_writer: SafetensorsWriter | None, receipt: _Receipt | None, progress: bool) -> None:
    """Write every shard of ``ckpt`` into ``staging_dir``, transforming the tensors that have jobs.

    Without ``dtype`` each shard is a :class:`_MirroredShard`: unchanged tensors never enter this process. With
    ``dtype`` every tensor is read, cast and written by a :class:`SafetensorsWriter`. Tensors are read into two
    reused buffers the size of the largest one read, alternately: one is being written out on a background
    thread (as is each shard's closing sync) while the next tensor is read and computed in the other. Fresh
    memory for each tensor would instead cost a page fault and the kernel's zero-fill per page, about a third of
    the read time.
    """
    inverse = report.operation == "unmerge"
    total = sum(info.nbytes for file in ckpt.files for info in ckpt.header(file).tensors.values())
    fp8 = _Fp8Weights(ckpt, jobs, dtype, report)
    largest = max((info.nbytes for name, info in ckpt.tensors.items()
                   if info.scale is None and (dtype is not None or name in jobs)), default=0)
    buffers = [torch.empty(largest, dtype=torch.uint8) for _ in range(2)]
    with _one_cpu_thread(device), ThreadPoolExecutor(max_workers=1) as pool, ExitStack() as sinks, \
            tqdm(total=total, unit="B", unit_scale=True, desc=report.operation, disable=not progress,
                 dynamic_ncols=True) as bar:
        writes = _WriteBehind(pool)
        reads = done = 0
        try:
            for shard_path in ckpt.files:
                header = ckpt.header(shard_path)
                out_path = staging_dir / shard_path.name
                if dtype is None:
                    sink = sinks.enter_context(_MirroredShard(shard_path, out_path, header))
                else:
                    specs = [(name, _out_dtype(info, dtype), tuple(info.shape))
                             for name, info in header.tensors.items() if name not in fp8.owner]
                    sink = sinks.enter_context(SafetensorsWriter(out_path, specs, header.metadata))
                with open(shard_path, "rb", buffering=0) as shard:
                    for name, info in header.tensors.items():
                        done += 1
                        bar.update(info.nbytes)
                        bar.set_postfix_str(f"{done}/{len(ckpt)} tensors", refresh=False)
                        if fp8.is_fp8(name):
                            result = fp8.result(name, lambda job, w: _transform(
                                job, w, torch.float32, weights, device, adapters, receipt_writer, receipt, inverse))
                            if result is not None:
                                writes.submit(sink.write, name, result)
                            continue
                        job = jobs.get(name)
                        if job is None and dtype is None:
                            report.unchanged += 1  # the sink copies it
                            continue
                        # The write in flight uses the other buffer (or a tensor of its own).
                        stored = _read_raw(shard, info, buffers[reads % 2])
                        reads += 1
                        out_dtype = _out_dtype(info, dtype)
                        if job is None:
                            report.unchanged += 1
                            result = stored.to(out_dtype)
                        else:
                            result = _transform(job, stored, out_dtype, weights, device, adapters, receipt_writer,
                                                receipt, inverse)
                        writes.submit(sink.write, name, result)
                writes.submit(sink.close)  # syncs while the next shard is read and computed
                report.weight_files.append(shard_path.name)
        finally:
            writes.wait()  # a sink is discarded (on error) only when nothing is in flight
    report.bytes_written += sum((staging_dir / name).stat().st_size for name in report.weight_files)


class _Fp8Weights:
    """The FP8 block-scaled weights of a merge's input (io/fp8.py), each two stored tensors: codes and scales.

    A changed weight is dequantized to fp32, transformed, and requantized with fresh block scales (blocks left
    as they were keep their bytes); with a ``dtype`` it is written plain and its scales are dropped. Both stored
    tensors are computed when the first of them comes up in file order; the other waits in ``pending`` (codes
    are one byte per element) until its own turn. The requantization error of each changed weight is reported:
    ‖Q(W') − W'‖ against ‖ΔW‖ = ‖W' − W‖, the change it was asked to keep, and against ‖W'‖.
    """

    def __init__(self, ckpt: Checkpoint, jobs: dict[TensorName, _Job], dtype: torch.dtype | None,
                 report: MergeReport) -> None:
        self.ckpt, self.jobs, self.dtype, self.report = ckpt, jobs, dtype, report
        self.owner = {info.scale: name for name, info in ckpt.tensors.items() if info.scale is not None}
        self.pending: dict[TensorName, torch.Tensor] = {}

    def is_fp8(self, name: TensorName) -> bool:
        return name in self.owner or (name in self.ckpt and self.ckpt.info(name).scale is not None)

    def result(self, name: TensorName, transform: Callable[[_Job, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """What to write under the stored name ``name``; None: nothing (the sink copies it, or it is dropped)."""
        weight = self.owner.get(name, name)
        job = self.jobs.get(weight)
        if name in self.pending:
            return self.pending.pop(name)
        if self.dtype is None and job is None:
            self.report.unchanged += name == weight  # copied byte for byte with its scales
            return None
        if self.dtype is not None and name != weight:
            return None  # a plain output has no scales
        scale = self.ckpt.info(weight).scale
        codes, scale_inv = self.ckpt.get_stored(weight), self.ckpt.get_stored(scale)
        merged = dequantize(codes, scale_inv, self.ckpt.fp8)  # (out, in) fp32
        if job is None:
            self.report.unchanged += 1
        else:
            merged = transform(job, merged)
        if self.dtype is not None:
            return merged.to(self.dtype)
        new_codes, new_scale = quantize(merged, self.ckpt.fp8, previous=(codes, scale_inv))
        before = dequantize(codes, scale_inv, self.ckpt.fp8)
        delta_norm = float(torch.linalg.vector_norm(merged - before, dtype=torch.float64))
        del before
        error = float(torch.linalg.vector_norm(dequantize(new_codes, new_scale, self.ckpt.fp8) - merged,
                                               dtype=torch.float64))
        weight_norm = float(torch.linalg.vector_norm(merged, dtype=torch.float64))
        self.report.requantized.append(RequantizedTensor(
            weight, delta_norm, error / delta_norm if delta_norm > 0 else 0.0,
            error / weight_norm if weight_norm > 0 else 0.0))
        if name == weight:
            self.pending[scale] = new_scale
            return new_codes
        self.pending[weight] = new_codes
        return new_scale


def _read_raw(shard, info: TensorInfo, buffer: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as they are in the file (no decode), in ``buffer``, viewed with its dtype and shape."""
    data = buffer[: info.nbytes]
    view = memoryview(data.numpy())
    shard.seek(info.start)
    filled = 0
    while filled < info.nbytes:  # one read() moves at most ~2 GiB on Linux
        count = shard.readinto(view[filled:])
        if not count:
            raise CheckpointFormatError(f"file ends after {filled} of {info.nbytes} bytes of this tensor; it changed "
                                        "since it was opened", path=info.file, tensor=info.name)
        filled += count
    return data.view(info.dtype).view(info.shape)


def _transform(job: _Job, stored: torch.Tensor, out_dtype: torch.dtype, weights: list[float], device: torch.device,
               adapters: list[Adapter], receipt_writer: SafetensorsWriter | None, receipt: _Receipt | None,
               inverse: bool) -> torch.Tensor:
    if job.steps[0].op == "replace":  # the planner allows no other step beside a replacement
        step = job.steps[0]
        if inverse:
            return receipt.tensors.get(_base_key(job.tensor)).to(out_dtype)
        receipt_writer.write(_base_key(job.tensor), stored)
        new_value = adapters[step.adapter].weights.get(step.key)
        return _replaced_value(stored, new_value, weights[step.adapter], out_dtype)
    norms: dict[int, torch.Tensor] = {}
    if inverse:
        for i, step in enumerate(job.steps):
            if step.op == "dora":
                norms[i] = receipt.tensors.get(_norms_key(step.adapter, job.tensor))
    result = _transform_factorized(job, stored, out_dtype, weights, device, norms, inverse)
    if not inverse and receipt_writer is not None:
        for i in sorted(norms):
            receipt_writer.write(_norms_key(job.steps[i].adapter, job.tensor), norms[i])
    return result


def _open_inputs(checkpoint: str | Path, adapters: list[str | Path]) -> tuple[Checkpoint, list[Adapter]]:
    ckpt = open_checkpoint(checkpoint)
    legacy = [f.name for f in ckpt.files if f.suffix == ".bin"]
    if legacy:
        raise CheckpointFormatError(f"legacy weights ({shorten(legacy)}): merged output mirrors safetensors shards; "
                                    "convert the checkpoint to safetensors first", path=ckpt.path)
    return ckpt, [read_adapter(a) for a in adapters]


def _dry_run(report: MergeReport, ckpt: Checkpoint, out_dir: Path, inputs: list[Path],
             out_dtype: torch.dtype | None) -> None:
    """What a real run would check and report about its output, without writing it."""
    refuse_overlap(out_dir, inputs)
    report.unchanged = len(ckpt) - len(report.changed)
    report.weight_files = [f.name for f in ckpt.files]
    _copy_other_files(ckpt, None, out_dtype, report)


def merge(
    base: str | Path,
    adapters: list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    dry_run: bool = False,
) -> MergeReport:
    """Merge PEFT LoRA/DoRA adapters into a base checkpoint: W = W0 + Σ_k w_k · s_k · B_k A_k (LoRA).

    DoRA adapters are applied in the order given, each as PEFT 0.21's ``merge_and_unload`` does it: norms of the
    unmerged base plus this adapter, n_k = ‖W0 + ΔW_k‖ per row, then W ← (m_k / n_k) ⊙ (W + ΔW_k), which also
    rescales whatever was merged before it. LoRA adapters commute with each other. Math is fp32 on ``device``;
    each result is cast back to its base tensor's dtype (or ``dtype``). ``modules_to_save`` params and
    ``base_layer.bias`` replace the base tensors (weight w ≠ 1: W0 + w · (saved − W0)). An output head tied to
    the input embedding and absent from the base takes no update of its own: its factors must be the
    embedding's, transposed (as extract stores them), and the embedding's update, applied once, is the head's.
    The output mirrors the base's shards, index, tensor order, dtypes and metadata, copies its other top-level
    files, and holds a ``deltakit_merge_receipt/`` that lets :func:`unmerge` restore the base exactly.

    Args:
        base: the base checkpoint (a directory, or one ``.safetensors`` file).
        adapters: PEFT adapter directories, applied in this order.
        out: the output directory (built in a staging sibling, renamed into place when complete).
        weights: one merge weight per adapter (default 1.0 each); it scales ΔW_k, not a DoRA magnitude.
        dtype: store every floating-point tensor in this dtype (``float32``, ``float16``, ``bfloat16``);
            default: each base tensor's own dtype.
        device: where the math runs: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``.
        overwrite: replace ``out`` if it exists.
        progress: show a progress bar on stderr.
        dry_run: check everything and return the plan (which tensors change, and how) without writing.

    Returns:
        The :class:`MergeReport`.

    Raises:
        TensorMissingError, TensorMismatchError: an adapter module is not in the base, its shapes do not fit,
            or it is a tied head whose factors are not its embedding's (raised before anything is written,
            naming the module and tensor).
        AdapterFormatError: an adapter is malformed or uses a PEFT feature deltakit cannot merge.
        InvalidOptionError: bad weights or dtype, adapters that conflict over a replaced tensor, or an ``out``
            that is, lies inside or contains an input (refused by a dry run too).
        NonFiniteError: a merged tensor holds NaN or Inf.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    started = time.perf_counter()
    out_dir = Path(out)
    out_dtype, math_device = parse_dtype(dtype), resolve_device(device)
    weights = parse_weights(weights, len(adapters))
    ckpt, opened = _open_inputs(base, adapters)
    inputs = [ckpt.path, *(a.path for a in opened)]
    jobs, notes = _plan(ckpt, opened, is_base=True)
    report = MergeReport("merge", str(base), [str(a) for a in adapters], weights, str(out_dir), dry_run=dry_run,
                         command=command_line(), notes=notes)
    report.changed = _changes(jobs, ckpt, reverse=False)
    if ckpt.fp8 is not None:
        report.adapter_errors = [_own_error(a) for a in opened]
    if (ckpt.files[0].parent / RECEIPT_DIR).is_dir():
        report.notes.append(f"the base holds the {RECEIPT_DIR}/ of an earlier merge; it is not carried over, so "
                            "that merge can be undone only from the base as it is now")
    if dry_run:
        _dry_run(report, ckpt, out_dir, inputs, out_dtype)
        if out_dir.exists() and not overwrite:
            report.notes.append(f"{out_dir} exists: a real run needs --overwrite")
        return report

    hashes = [adapter_hash(a) for a in opened]
    with staged_output(out_dir, overwrite=overwrite, inputs=inputs) as staging_dir:
        receipt_dir = staging_dir / RECEIPT_DIR
        receipt_dir.mkdir()
        specs = _receipt_specs(ckpt, jobs, is_plain=out_dtype is not None)
        with SafetensorsWriter(receipt_dir / RECEIPT_TENSORS, specs, {"format": "pt"}) as receipt_writer:
            _run(ckpt, jobs, staging_dir, weights=weights, dtype=out_dtype, device=math_device, adapters=opened,
                 report=report, receipt_writer=receipt_writer, receipt=None, progress=progress)
        write_json(receipt_dir / RECEIPT_JSON, {
            "format": _RECEIPT_FORMAT,
            "base": str(base),
            "adapters": [{"path": str(a), "sha256": h, "weight": w, "use_dora": o.use_dora}
                         for a, h, w, o in zip(adapters, hashes, weights, opened)],
            "dtype": dtype,
            "dora_norms": sum(1 for name, _, _ in specs if name.startswith("norms.")),
            "replaced": [name.removeprefix("base.") for name, _, _ in specs if name.startswith("base.")],
        })
        _write_index(ckpt, staging_dir, out_dtype)
        _copy_other_files(ckpt, staging_dir, out_dtype, report)
        report.receipt = (f"{RECEIPT_DIR}/ ({len(specs)} tensor(s): DoRA row norms and replaced base values)"
                          if specs else f"{RECEIPT_DIR}/ (adapter hashes and weights)")
        report.seconds = time.perf_counter() - started
    return report


def _read_receipt(ckpt: Checkpoint, adapters: list[Adapter]) -> tuple[_Receipt | None, str]:
    """The merged checkpoint's receipt if it records exactly these adapters, else None and why not."""
    receipt_dir = ckpt.files[0].parent / RECEIPT_DIR
    receipt_path = receipt_dir / RECEIPT_JSON
    if not receipt_path.is_file():
        return None, "no merge receipt"
    try:
        data = json.loads(receipt_path.read_text(encoding="utf-8"))
        recorded = [(entry["sha256"], float(entry["weight"])) for entry in data["adapters"]]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointFormatError(f"not a deltakit merge receipt ({e})", path=receipt_path) from e
    if data.get("format") != _RECEIPT_FORMAT:
        raise CheckpointFormatError(f"unknown receipt format {data.get('format')!r}", path=receipt_path)
    hashes = [adapter_hash(a) for a in adapters]
    if sorted(hashes) != sorted(h for h, _ in recorded):
        return None, f"the merge receipt records {len(recorded)} other adapter(s)"
    order, free = [], list(range(len(adapters)))
    for h, _ in recorded:
        position = next(i for i in free if hashes[i] == h)
        free.remove(position)
        order.append(position)
    return _Receipt(order, [w for _, w in recorded], open_checkpoint(receipt_dir / RECEIPT_TENSORS)), "used"


def unmerge(
    merged: str | Path,
    adapters: list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    dtype: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    dry_run: bool = False,
) -> MergeReport:
    """Take adapters back out of a checkpoint that :func:`merge` made: the inverse steps in reverse order.

    With the receipt merge wrote (matched by the adapters' content hashes; their order and weights come from
    it), LoRA is undone up to rounding, DoRA exactly as merged (W ← W ⊙ n_k / m_k − ΔW_k with the recorded row
    norms) and replaced tensors are restored byte for byte. Without a matching receipt, LoRA adapters that
    replace no tensor can still be unmerged (W ← W − Σ_k w_k ΔW_k); anything else is refused. The output has
    no receipt.

    Args:
        merged: the merged checkpoint directory.
        adapters: the adapters that were merged into it.
        out: the output directory.
        weights: the merge weights, when there is no receipt (default 1.0 each); with a receipt they must
            equal the recorded ones or be omitted.
        dtype, device, overwrite, progress, dry_run: as for :func:`merge`.

    Returns:
        The :class:`MergeReport`.

    Raises:
        ReceiptMissingError: DoRA adapters or replaced tensors and no receipt that records these adapters.
        InvalidOptionError: weights that contradict the receipt; and as for :func:`merge`.
    """
    started = time.perf_counter()
    out_dir = Path(out)
    out_dtype, math_device = parse_dtype(dtype), resolve_device(device)
    if weights is not None:
        weights = parse_weights(weights, len(adapters))
    ckpt, opened = _open_inputs(merged, adapters)
    receipt, receipt_state = _read_receipt(ckpt, opened)
    if receipt is not None:
        # From here on adapters are in merge order, so step positions are the receipt's positions.
        if weights is not None and [weights[i] for i in receipt.order] != receipt.weights:
            raise InvalidOptionError(f"the merge receipt records weights {receipt.weights} (in merge order), not "
                                     f"{list(weights)}; omit the weights to use the receipt's", path=ckpt.path)
        weights = receipt.weights
        ordered = [opened[i] for i in receipt.order]
        adapter_names = [str(adapters[i]) for i in receipt.order]
    else:
        weights = parse_weights(weights, len(adapters))
        ordered, adapter_names = opened, [str(a) for a in adapters]
    inputs = [ckpt.path, *(a.path for a in ordered)]
    jobs, notes = _plan(ckpt, ordered, is_base=False)
    if receipt is None:
        for job in jobs.values():
            needy = [s for s in job.steps if s.op != "lora"]
            if needy:
                what = "is DoRA" if needy[0].op == "dora" else "replaced this tensor"
                raise ReceiptMissingError(
                    f"adapter {adapter_names[needy[0].adapter]} {what}, and {receipt_state} matches these adapters; "
                    "only the receipt that merge writes can undo that", path=ckpt.path, tensor=job.tensor)
    report = MergeReport("unmerge", str(merged), adapter_names, weights, str(out_dir), dry_run=dry_run,
                         command=command_line(), notes=notes)
    report.changed = _changes(jobs, ckpt, reverse=True)
    report.receipt = "used" if receipt is not None else f"none used ({receipt_state}); LoRA subtracted"
    if dry_run:
        _dry_run(report, ckpt, out_dir, inputs, out_dtype)
        return report

    with staged_output(out_dir, overwrite=overwrite, inputs=inputs) as staging_dir:
        _run(ckpt, jobs, staging_dir, weights=weights, dtype=out_dtype, device=math_device, adapters=ordered,
             report=report, receipt_writer=None, receipt=receipt, progress=progress)
        _write_index(ckpt, staging_dir, out_dtype)
        _copy_other_files(ckpt, staging_dir, out_dtype, report)
        report.seconds = time.perf_counter() - started
    return report
