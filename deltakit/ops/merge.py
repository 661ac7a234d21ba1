"""``merge`` and ``unmerge``: fold PEFT LoRA/DoRA adapters into a base checkpoint, and take them out again.

A pipeline: :func:`~deltakit.ops.plan.plan_merge` checks everything from headers and the (small) adapters and
says what each adapter does to each base tensor; a transform (:class:`_Merge` or :class:`_Unmerge`) computes one
tensor's new value; :func:`~deltakit.io.mirror.write_mirror` streams the output (DESIGN.md §6): it mirrors the
base's shards, index, tensor order, dtypes and metadata, copies what no adapter touches file to file, and hands
each changed tensor's raw bytes to the transform. The transform works in blocks of rows of the (out, in) matrix:
every variant's step is row-local (:class:`~deltakit.adapters.variants.BlockStep`), so the fp32 working set is
one block (a weight stored (in, out), embedding or Conv1D, is walked by its stored rows where the steps are
element-wise, as LoRA's: its (out, in) rows are strided columns), and the result is written over the tensor's own
bytes when the dtype stays the same. Peak memory is the mirror's (about three of the largest tensor), a block, and
the adapters (held whole; they are small), whatever the shard or model size. The output is built in a staging
sibling and renamed into place only when complete.

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

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.adapters.layers import to_out_in
from deltakit.adapters.peft_format import Adapter, parse_weights, read_adapter
from deltakit.adapters.variants import BlockStep
from deltakit.errors import CheckpointFormatError, InvalidOptionError, NonFiniteError, ReceiptMissingError, shorten
from deltakit.io.checkpoint import Checkpoint, open_checkpoint, refuse_unsupported_weights
from deltakit.io.dtypes import parse_dtype
from deltakit.io.mirror import (
    MirrorResult,
    OtherFiles,
    Transform,
    copy_other_files,
    is_finite,
    mirror_order,
    write_index,
    write_mirror,
)
from deltakit.io.writer import refuse_overlap, staged_output
from deltakit.math.factorize import resolve_device
from deltakit.math.threads import one_cpu_thread
from deltakit.names import TensorName
from deltakit.ops.plan import FactorStep, MergePlan, TensorJob, plan_merge
from deltakit.ops.receipt import RECEIPT_DIR, Receipt, ReceiptWriter, read_receipt
from deltakit.ops.report import MergeReport, TensorChange, command_line, own_error

__all__ = ["RECEIPT_DIR", "MergeReport", "merge", "unmerge"]

# fp32 elements per block of rows. On CPU 1 MiB: the block stays in cache from the load through the LoRA product
# to the store, ~35 % faster than 16 MiB blocks (bf16 (5632, 2048) weight, rank 16, one core). On CUDA 64 MiB:
# each block costs two transfers, a few kernel launches and a synchronizing finiteness check.
_BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}


# --- the transforms: one tensor's new value ----------------------------------------------------------------------


def _apply_blocks(job: TensorJob, stored: torch.Tensor, out_dtype: torch.dtype, steps: list[BlockStep],
                  device: torch.device, *, inverse: bool) -> torch.Tensor:
    """Apply ``steps`` (or, with ``inverse``, undo them; give them in reverse order) to one weight, block by
    block of rows."""
    result = stored if out_dtype == stored.dtype else torch.empty(stored.shape, dtype=out_dtype)
    base_oi, result_oi = to_out_in(stored, job.kind), to_out_in(result, job.kind)  # views, (out, in)
    if not base_oi.is_contiguous():
        # Stored (in, out) (embeddings, Conv1D): a block of (out, in) rows would be columns strided across all of
        # memory. Element-wise steps run on the stored rows instead: a 32000×4096 bf16 embedding at rank 16 took
        # 1.8 s as (out, in) rows and 0.1 s as stored rows, on one core.
        transposed = [step.transposed() for step in steps]
        if None not in transposed:
            base_oi, result_oi, steps = base_oi.T, result_oi.T, transposed
    rows, cols = base_oi.shape
    # A step that reads W0 needs it kept when an earlier step changes the block.
    keep_base = not inverse and any(step.reads_base for step in steps[1:])
    block = max(1, _BLOCK_ELEMENTS[device.type] // max(cols, 1))
    scratch = torch.empty(min(rows, block) * cols, dtype=torch.float32, device=device)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        work = scratch[: (r1 - r0) * cols].view(r1 - r0, cols)
        work.copy_(base_oi[r0:r1])
        base_block = work.clone() if keep_base else work
        for step in steps:
            work = step.unmerge(work, slice(r0, r1)) if inverse else step.merge(work, base_block, slice(r0, r1))
        written = result_oi[r0:r1]
        written.copy_(work)
        # One check of what is stored decides: NaN and ±Inf survive the cast, and a finite fp32 value past the
        # stored dtype's range (fp16's 65504) becomes Inf. Only a failure looks at which of the two it was.
        if not is_finite(written):
            what = "unmerged" if inverse else "merged"
            if not is_finite(work):
                raise NonFiniteError(f"the {what} weight has NaN or Inf in rows {r0}–{r1 - 1}", tensor=job.tensor)
            raise NonFiniteError(f"the {what} weight does not fit in {_dtype_name(out_dtype)} (Inf once stored) in "
                                 f"rows {r0}–{r1 - 1}; choose a wider --dtype", tensor=job.tensor)
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Merge:
    """Merge's transform: the adapters' steps in order; what the inverse needs goes into the receipt."""

    def __init__(self, plan: MergePlan, adapters: list[Adapter], weights: list[float], device: torch.device,
                 receipt: ReceiptWriter) -> None:
        self.plan, self.adapters, self.weights, self.device, self.receipt = plan, adapters, weights, device, receipt

    def __call__(self, name: TensorName, stored: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        job = self.plan.jobs[name]
        if (replace := job.replacement) is not None:
            self.receipt.keep_base(name, stored)
            new_value = self.adapters[replace.adapter].weights.get(replace.key)
            result = _replaced_value(name, stored, new_value, self.weights[replace.adapter], out_dtype)
        else:
            steps = [s.variant.block_step(s.factors, self.weights[s.adapter], self.device) for s in job.steps]
            result = _apply_blocks(job, stored, out_dtype, steps, self.device, inverse=False)
            for step, block_step in zip(job.steps, steps):
                if block_step.state is not None:
                    self.receipt.keep_state(step.adapter, name, block_step.state)
        return result


class _Unmerge:
    """Unmerge's transform: the inverse steps in reverse order, with what the receipt kept (if any)."""

    def __init__(self, plan: MergePlan, weights: list[float], device: torch.device, receipt: Receipt | None,
                 where: Path) -> None:
        self.plan, self.weights, self.device, self.receipt, self.where = plan, weights, device, receipt, where

    def __call__(self, name: TensorName, stored: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        job = self.plan.jobs[name]
        if self.receipt is not None:
            self.receipt.check_written(name, stored, self.where)
        if job.replacement is not None:
            return self.receipt.base(name).to(out_dtype)
        steps = [s.variant.block_step(s.factors, self.weights[s.adapter], self.device,
                                      self.receipt.state(s.adapter, name) if s.variant.has_state else None)
                 for s in job.steps]
        return _apply_blocks(job, stored, out_dtype, steps[::-1], self.device, inverse=True)


def _replaced_value(name: TensorName, base_value: torch.Tensor, new_value: torch.Tensor, weight: float,
                    out_dtype: torch.dtype) -> torch.Tensor:
    if weight == 1.0:
        value = new_value.to(out_dtype)  # exact: the adapter's own value
    else:
        value = (base_value.float() + weight * (new_value.float() - base_value.float())).to(out_dtype)
    if not is_finite(value):
        raise NonFiniteError(f"the replaced value has NaN or Inf once stored as {_dtype_name(out_dtype)}",
                             tensor=name)
    return value


# --- the shared driver ---------------------------------------------------------------------------------------------


@dataclass
class _Output:
    """What was (or, in a dry run, would be) written besides the changed tensors."""

    mirrored: MirrorResult
    files: OtherFiles


def _write(ckpt: Checkpoint, plan: MergePlan, transform: Transform, staging_dir: Path, *, operation: str,
           dtype: torch.dtype | None, device: torch.device, progress: bool, hash_changed: bool = False) -> _Output:
    """The output checkpoint: ``ckpt`` mirrored with ``transform`` applied to the planned tensors (with
    ``hash_changed``, each one's SHA-256 as written), its index and its other files."""
    with one_cpu_thread(device):
        mirrored = write_mirror(ckpt, staging_dir, plan.jobs, transform, dtype=dtype, progress=progress,
                                desc=operation, hash_changed=hash_changed)
    write_index(ckpt, staging_dir, dtype)
    # A base's own receipt is not copied: it describes the base, not this output.
    return _Output(mirrored, copy_other_files(ckpt, staging_dir, dtype, replaced_dirs=(RECEIPT_DIR,)))


def _dry_run(ckpt: Checkpoint, plan: MergePlan, out_dir: Path, inputs: list[Path],
             out_dtype: torch.dtype | None) -> _Output:
    """What a real run would check and report about its output, without writing it."""
    refuse_overlap(out_dir, inputs)
    mirrored = MirrorResult(len(ckpt) - len(plan.jobs), [f.name for f in ckpt.files])
    return _Output(mirrored, copy_other_files(ckpt, None, out_dtype, replaced_dirs=(RECEIPT_DIR,)))


def _report(operation: str, checkpoint: str | Path, adapters: list[str], weights: list[float], out_dir: Path,
            changes: list[TensorChange], output: _Output, *, dry_run: bool, receipt: str, notes: list[str],
            seconds: float = 0.0, adapter_errors: list[float | None] | None = None) -> MergeReport:
    return MergeReport(
        operation, str(checkpoint), adapters, weights, str(out_dir), dry_run=dry_run, changed=changes,
        unchanged=output.mirrored.unchanged, weight_files=output.mirrored.weight_files,
        other_files=output.files.copied, skipped_files=output.files.skipped, receipt=receipt,
        bytes_written=output.mirrored.bytes_written, seconds=seconds, command=command_line(), notes=notes,
        requantized=output.mirrored.requantized, adapter_errors=adapter_errors or [])


def _open_inputs(checkpoint: str | Path, adapters: list[str | Path]) -> tuple[Checkpoint, list[Adapter]]:
    ckpt = open_checkpoint(checkpoint)
    refuse_unsupported_weights(ckpt)
    legacy = [f.name for f in ckpt.files if f.suffix == ".bin"]
    if legacy:
        raise CheckpointFormatError(f"legacy weights ({shorten(legacy)}): merged output mirrors safetensors shards; "
                                    "convert the checkpoint to safetensors first", path=ckpt.path)
    return ckpt, [read_adapter(a) for a in adapters]


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
    plan = plan_merge(ckpt, opened, is_base=True)
    names, changes, notes = [str(a) for a in adapters], plan.changes(ckpt, reverse=False), list(plan.notes)
    if (ckpt.files[0].parent / RECEIPT_DIR).is_dir():
        notes.append(f"the base holds the {RECEIPT_DIR}/ of an earlier merge; it is not carried over, so that "
                     "merge can be undone only from the base as it is now")
    if dry_run:
        output = _dry_run(ckpt, plan, out_dir, inputs, out_dtype)
        if out_dir.exists() and not overwrite:
            notes.append(f"{out_dir} exists: a real run needs --overwrite")
        return _report("merge", base, names, weights, out_dir, changes, output, dry_run=True, receipt="",
                       notes=notes)

    with staged_output(out_dir, overwrite=overwrite, inputs=inputs) as staging_dir:
        with ReceiptWriter(staging_dir, ckpt, plan, mirror_order(ckpt, out_dtype)) as receipt:
            output = _write(ckpt, plan, _Merge(plan, opened, weights, math_device, receipt), staging_dir,
                            operation="merge", dtype=out_dtype, device=math_device, progress=progress,
                            hash_changed=True)
            receipt.bind(output.mirrored.written_sha256)
            receipt_line = receipt.finish(str(base), names, opened, weights, dtype)
        seconds = time.perf_counter() - started
    # Beside the requantization error of an FP8 merge, each adapter's own error (from its extract report).
    own = [own_error(a.path) for a in opened] if output.mirrored.requantized else None
    return _report("merge", base, names, weights, out_dir, changes, output, dry_run=False, receipt=receipt_line,
                   notes=notes, seconds=seconds, adapter_errors=own)


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
    receipt, receipt_state = read_receipt(ckpt, opened, [str(a) for a in adapters])
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
    plan = plan_merge(ckpt, ordered, is_base=False)
    if receipt is None:
        for job in plan.jobs.values():
            needy = [s for s in job.steps if not isinstance(s, FactorStep) or s.variant.has_state]
            if needy:
                what = f"is {needy[0].variant.label}" if isinstance(needy[0], FactorStep) else "replaced this tensor"
                raise ReceiptMissingError(
                    f"adapter {adapter_names[needy[0].adapter]} {what}, and {receipt_state} matches these adapters; "
                    "only the receipt that merge writes can undo that", path=ckpt.path, tensor=job.tensor)
    changes = plan.changes(ckpt, reverse=True)
    receipt_line = "used" if receipt is not None else f"none used ({receipt_state}); LoRA subtracted"
    if dry_run:
        output = _dry_run(ckpt, plan, out_dir, inputs, out_dtype)
        return _report("unmerge", merged, adapter_names, weights, out_dir, changes, output, dry_run=True,
                       receipt=receipt_line, notes=plan.notes)

    with staged_output(out_dir, overwrite=overwrite, inputs=inputs) as staging_dir:
        output = _write(ckpt, plan, _Unmerge(plan, weights, math_device, receipt, ckpt.path), staging_dir,
                        operation="unmerge", dtype=out_dtype, device=math_device, progress=progress)
        seconds = time.perf_counter() - started
    return _report("unmerge", merged, adapter_names, weights, out_dir, changes, output, dry_run=False,
                   receipt=receipt_line, notes=plan.notes, seconds=seconds)
