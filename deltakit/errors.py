"""Every error deltakit raises on purpose.

Each message is one line, ``<file or tensor>: <what is wrong>; <what to do>``, and ``str(error)`` is
exactly what the CLI prints. Subclasses are split by what the user has to fix; each carries the path
and/or tensor name it is about, and the exit code the CLI uses.

Exit codes: 1 bad input or data, 2 bad usage or option, 3 environment (device, network, cache).
"""

from __future__ import annotations

from pathlib import Path


class DeltakitError(Exception):
    """Base class: an error meant to be shown to the user as one line."""

    exit_code: int = 1

    def __init__(self, message: str, *, path: str | Path | None = None, tensor: str | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.tensor = tensor
        self.message = message
        subject = ": ".join(str(s) for s in (path, tensor) if s is not None)
        super().__init__(f"{subject}: {message}" if subject else message)


class CheckpointNotFoundError(DeltakitError, FileNotFoundError):
    """A named checkpoint or adapter does not exist, or holds no weights."""


class CheckpointFormatError(DeltakitError):
    """A weights file is corrupt or malformed (header, offsets, dtype, truncated data)."""


class CheckpointLayoutError(DeltakitError):
    """The files of a checkpoint disagree (index vs shards, a tensor in two shards)."""


class UnsupportedWeightsError(DeltakitError):
    """Weights deltakit cannot do arithmetic on correctly: quantized (integer codes, FP8 with scales, any
    ``quantization_config``), complex or 8-bit float. Refused from the headers, before any math.

    Example: ``ft/model.safetensors: model.layers.0.mlp.up_proj.weight: dtype I8: integer weights ...``.
    """


class TensorMismatchError(DeltakitError):
    """Base and fine-tuned (or adapter and base) tensors do not fit together."""


class TensorMissingError(TensorMismatchError, KeyError):
    """A tensor is present on one side and absent on the other, where it is needed."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return Exception.__str__(self)


class NonFiniteError(DeltakitError):
    """NaN or Inf in an input tensor or a computed delta."""


class NothingToExtractError(DeltakitError):
    """The fine-tuned checkpoint is identical to its base (for the selected tensors)."""


class AdapterFormatError(DeltakitError):
    """An adapter directory is not a PEFT LoRA adapter deltakit can read."""


class ReceiptMissingError(DeltakitError):
    """A DoRA (or replacing) adapter cannot be unmerged without the receipt that merge writes."""


class ReceiptMismatchError(DeltakitError):
    """A merge receipt that does not belong to the checkpoint and adapters given: altered, copied from another
    merge, or naming other adapters. Unmerging with it would restore a wrong base."""


class OutputExistsError(DeltakitError):
    """The output path exists and --overwrite was not given."""

    exit_code = 2


class InvalidOptionError(DeltakitError, ValueError):
    """An option value is invalid, or options conflict."""

    exit_code = 2


class OutputWriteError(DeltakitError, OSError):
    """The output could not be written: the disk is full, a quota or the file-size limit was hit.

    Example: ``out/model-00002-of-00003.safetensors: cannot write: no space left on device; free some space
    or choose another --out``. The partial output is removed; earlier output under the final name is kept.
    """


class CalibrationError(DeltakitError):
    """Calibration input that cannot be used: a missing or empty text, a bad JSONL line, no tokenizer in the
    fine-tuned checkpoint, an architecture the block-wise calibration pass does not support."""


class ExtraMissingError(DeltakitError):
    """A feature needs an optional extra that is not installed (e.g. ``--calib`` needs ``deltakit[calib]``)."""

    exit_code = 3


class FactorizationError(DeltakitError):
    """Every SVD route (drivers, fp64) failed for a tensor."""


class DeviceUnavailableError(DeltakitError):
    """The requested compute device is not available."""

    exit_code = 3


class HubError(DeltakitError):
    """A Hub repository, revision or file could not be resolved."""


class HubUnavailableError(HubError):
    """The Hub cannot be reached (offline, or no network) and the cache lacks what is needed."""

    exit_code = 3


def shorten(items: list[str], limit: int = 3) -> str:
    """Join at most ``limit`` items for a one-line message, then say how many more there are."""
    shown = ", ".join(items[:limit])
    return f"{shown} ({len(items) - limit} more)" if len(items) > limit else shown
