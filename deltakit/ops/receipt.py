"""The merge receipt: what ``merge`` writes into its output so that ``unmerge`` can restore the base exactly.

``deltakit_merge_receipt/receipt.json`` records each adapter's content hash, merge weight and variant keys;
``receipt.safetensors`` holds, in the order the merge produces them, the per-row state of every step whose
variant has one (DoRA's row norms n_k, fp32) and the base value of every replaced tensor.

A receipt is bound to the merge that wrote it: the JSON records the SHA-256 of every tensor the merge wrote, and
a seal (SHA-256 of the JSON's other content and of ``receipt.safetensors``). ``unmerge`` refuses a receipt whose
seal does not match (edited, or its tensors swapped) and a merged tensor whose bytes are not those the merge
wrote (changed afterwards, or a receipt copied from another merge): either would restore a wrong base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.adapters.peft_format import Adapter
from deltakit.adapters.variants import variant_of
from deltakit.errors import CheckpointFormatError, ReceiptMismatchError, shorten
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.mirror import tensor_sha256
from deltakit.io.writer import SafetensorsWriter, write_json
from deltakit.names import TensorName
from deltakit.ops.plan import FactorStep, MergePlan

RECEIPT_DIR = "deltakit_merge_receipt"
RECEIPT_JSON = "receipt.json"
RECEIPT_TENSORS = "receipt.safetensors"
_RECEIPT_FORMAT = "deltakit-merge-receipt/2"
_UNBOUND_FORMAT = "deltakit-merge-receipt/1"  # before receipts were bound to their merge: read, not verified
# Key prefixes in receipt.safetensors; "norms" names a variant's per-row state (DoRA's row norms, the only one).
_STATE, _BASE = "norms", "base"


def adapter_hash(adapter: Adapter) -> str:
    """SHA-256 of an adapter's config (canonical JSON) and weight bytes: what a receipt records to match it."""
    digest = hashlib.sha256(json.dumps(adapter.config, sort_keys=True).encode("utf-8"))
    for path in adapter.weights.files:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _state_key(adapter: int, tensor: TensorName) -> str:
    return f"{_STATE}.{adapter}.{tensor}"


def _base_key(tensor: TensorName) -> str:
    return f"{_BASE}.{tensor}"


class ReceiptWriter:
    """Writes the receipt of one merge: its tensors as the merge produces them, then the JSON.

    As a context manager, an exception discards the tensors file (the staging directory goes anyway)."""

    def __init__(self, out_dir: Path, ckpt: Checkpoint, plan: MergePlan, order: list[TensorName]) -> None:
        """``order``: the tensors in the order the merge meets them (:func:`~deltakit.io.mirror.mirror_order`)."""
        self.dir = out_dir / RECEIPT_DIR
        self.dir.mkdir()
        self.specs = []  # in the order the merge produces them: ``order``, then step order
        for name in order:
            job = plan.jobs.get(name)
            for step in job.steps if job else []:
                if not isinstance(step, FactorStep):
                    info = ckpt.info(name)
                    self.specs.append((_base_key(name), info.dtype, tuple(info.shape)))
                elif step.variant.has_state:
                    self.specs.append((_state_key(step.adapter, name), torch.float32, (step.factors.b.shape[0],)))
        self._tensors = SafetensorsWriter(self.dir / RECEIPT_TENSORS, self.specs, {"format": "pt"})
        self.written: dict[TensorName, str] = {}  # SHA-256 of each tensor the merge wrote, as stored
        # An FP8 weight is written requantized (its codes, not the transform's values) and read back dequantized:
        # no hash of the transform's output would match it, so those go unbound.
        self._requantized = {name for name, info in ckpt.tensors.items() if info.scale is not None}

    def __enter__(self) -> ReceiptWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tensors.__exit__(*exc)

    def keep_state(self, adapter: int, tensor: TensorName, state: torch.Tensor) -> None:
        self._tensors.write(_state_key(adapter, tensor), state)

    def keep_base(self, tensor: TensorName, value: torch.Tensor) -> None:
        self._tensors.write(_base_key(tensor), value)

    def bind(self, written_sha256: dict[TensorName, str]) -> None:
        """Record the SHA-256 of the bytes the merge wrote for each tensor, which unmerge checks before undoing
        it."""
        self.written.update((name, digest) for name, digest in written_sha256.items() if name not in self._requantized)

    def finish(self, base: str, adapter_paths: list[str], adapters: list[Adapter], weights: list[float],
               dtype: str | None) -> str:
        """Close the tensors, write the JSON; returns the report's line about the receipt."""
        self._tensors.close()
        content = {
            "format": _RECEIPT_FORMAT,
            "base": base,
            "adapters": [{"path": path, "sha256": adapter_hash(a), "weight": w, **variant_of(a).config()}
                         for path, a, w in zip(adapter_paths, adapters, weights)],
            "dtype": dtype,
            "dora_norms": sum(1 for name, _, _ in self.specs if name.startswith(f"{_STATE}.")),
            "replaced": [name.removeprefix(f"{_BASE}.") for name, _, _ in self.specs if name.startswith(f"{_BASE}.")],
            "written_sha256": self.written,
        }
        write_json(self.dir / RECEIPT_JSON, {**content, "seal": _seal(content, self.dir / RECEIPT_TENSORS)})
        return (f"{RECEIPT_DIR}/ ({len(self.specs)} tensor(s): DoRA row norms and replaced base values)"
                if self.specs else f"{RECEIPT_DIR}/ (adapter hashes and weights)")


@dataclass
class Receipt:
    """What ``unmerge`` reads back from a merged checkpoint's receipt, in the order the adapters were merged."""

    order: list[int]  # merge position → position in the caller's adapter list
    weights: list[float]  # by merge position
    tensors: Checkpoint
    written: dict[TensorName, str] | None  # SHA-256 of each tensor the merge wrote; None: an unbound receipt

    def check_written(self, tensor: TensorName, stored: torch.Tensor, where: Path) -> None:
        """Raise ReceiptMismatchError unless ``stored`` holds the bytes the merge wrote for ``tensor``."""
        if self.written is not None and tensor in self.written and self.written[tensor] != tensor_sha256(stored):
            raise ReceiptMismatchError("differs from what the merge wrote (the receipt's SHA-256): the checkpoint "
                                       "changed after the merge, or the receipt belongs to another merge; unmerge "
                                       "cannot restore its base", path=where, tensor=tensor)

    def state(self, adapter: int, tensor: TensorName) -> torch.Tensor:
        return self.tensors.get(_state_key(adapter, tensor))

    def base(self, tensor: TensorName) -> torch.Tensor:
        return self.tensors.get(_base_key(tensor))


def _seal(content: dict, tensors_path: Path) -> str:
    """SHA-256 of what the receipt says (but the paths, which only name the inputs: a merge in another folder
    gives the same seal) and of its tensors."""
    sealed = {**content, "adapters": [{k: v for k, v in entry.items() if k != "path"} for entry in content["adapters"]]}
    sealed.pop("base", None)
    digest = hashlib.sha256(json.dumps(sealed, sort_keys=True).encode("utf-8"))
    with open(tensors_path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_receipt(ckpt: Checkpoint, adapters: list[Adapter], names: list[str]) -> tuple[Receipt | None, str]:
    """The merged checkpoint's receipt if it records exactly these adapters, else None and why not.

    Args:
        ckpt: the merged checkpoint.
        adapters: the adapters to take out, and ``names``, how the user gave them (for messages).

    Raises:
        ReceiptMismatchError: the receipt was altered (its seal does not match), or an adapter is not one that
            it records: that adapter was never merged into this checkpoint.
        CheckpointFormatError: the receipt is not one deltakit wrote.
    """
    receipt_dir = ckpt.files[0].parent / RECEIPT_DIR
    receipt_path = receipt_dir / RECEIPT_JSON
    if not receipt_path.is_file():
        return None, "no merge receipt"
    try:
        data = json.loads(receipt_path.read_text(encoding="utf-8"))
        recorded = [(entry["sha256"], float(entry["weight"])) for entry in data["adapters"]]
        recorded_paths = [str(entry.get("path")) for entry in data["adapters"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointFormatError(f"not a deltakit merge receipt ({e})", path=receipt_path) from e
    if data.get("format") not in (_RECEIPT_FORMAT, _UNBOUND_FORMAT):
        raise CheckpointFormatError(f"unknown receipt format {data.get('format')!r}", path=receipt_path)
    written = None
    if data["format"] == _RECEIPT_FORMAT:
        content = {key: value for key, value in data.items() if key != "seal"}
        if not (receipt_dir / RECEIPT_TENSORS).is_file() or data.get("seal") != _seal(content, receipt_dir / RECEIPT_TENSORS):
            raise ReceiptMismatchError("the merge receipt was altered after the merge (its seal does not match its "
                                       "content); unmerge cannot trust it to restore the base", path=receipt_dir)
        written = data.get("written_sha256")
        if not isinstance(written, dict):
            raise CheckpointFormatError("not a deltakit merge receipt (no written_sha256)", path=receipt_path)
    hashes = [adapter_hash(a) for a in adapters]
    recorded_hashes = {h for h, _ in recorded}
    for name, h in zip(names, hashes):
        if h not in recorded_hashes:
            raise ReceiptMismatchError(f"adapter {name} was not merged into this checkpoint: its merge receipt "
                                       f"records {shorten(recorded_paths)}", path=ckpt.path)
    if sorted(hashes) != sorted(h for h, _ in recorded):
        return None, f"the merge receipt records {len(recorded)} adapter(s), {len(recorded) - len(hashes)} more"
    order, free = [], list(range(len(adapters)))
    for h, _ in recorded:
        position = next(i for i in free if hashes[i] == h)
        free.remove(position)
        order.append(position)
    return Receipt(order, [w for _, w in recorded], open_checkpoint(receipt_dir / RECEIPT_TENSORS), written), "used"
