"""deltakit: extract LoRA/DoRA adapters from fully fine-tuned checkpoints, and merge them back, streamed.

The names below load on first use (PEP 562), so ``import deltakit`` (and the CLI's ``--help``) does not import
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Adapter": "deltakit.adapters.peft_format",
    "read_adapter": "deltakit.adapters.peft_format",
    "BatchReport": "deltakit.ops.batch",
    "run_batch": "deltakit.ops.batch",
    "Checkpoint": "deltakit.io.checkpoint",
    "open_checkpoint": "deltakit.io.checkpoint",
    "DeltakitError": "deltakit.errors",
    "extract": "deltakit.ops.extract",
    "InspectReport": "deltakit.ops.inspect",
    "inspect": "deltakit.ops.inspect",
    "MergeReport": "deltakit.ops.merge",
    "merge": "deltakit.ops.merge",
    "unmerge": "deltakit.ops.merge",
    "ExtractReport": "deltakit.ops.report",
    "StackReport": "deltakit.ops.stack",
    "stack": "deltakit.ops.stack",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from deltakit.adapters.peft_format import Adapter, read_adapter
    from deltakit.errors import DeltakitError
    from deltakit.io.checkpoint import Checkpoint, open_checkpoint
    from deltakit.ops.batch import BatchReport, run_batch
    from deltakit.ops.extract import extract
    from deltakit.ops.inspect import InspectReport, inspect
    from deltakit.ops.merge import MergeReport, merge, unmerge
    from deltakit.ops.report import ExtractReport
    from deltakit.ops.stack import StackReport, stack


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deltakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
