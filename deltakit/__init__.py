"""deltakit: extract LoRA/DoRA adapters from fully fine-tuned checkpoints, and merge them back, streamed."""

from deltakit.adapters.peft_format import Adapter, read_adapter
from deltakit.ops.batch import BatchReport, run_batch
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.errors import DeltakitError
from deltakit.ops.extract import extract
from deltakit.ops.inspect import InspectReport, inspect
from deltakit.ops.merge import MergeReport, merge, unmerge
from deltakit.ops.report import ExtractReport
from deltakit.ops.stack import StackReport, stack

__all__ = [
    "Adapter", "BatchReport", "Checkpoint", "DeltakitError", "ExtractReport", "InspectReport", "MergeReport",
    "StackReport", "extract", "inspect", "merge", "open_checkpoint", "read_adapter", "run_batch", "stack", "unmerge",
]
