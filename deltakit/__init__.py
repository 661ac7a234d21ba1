"""deltakit: extract LoRA/DoRA adapters from fully fine-tuned checkpoints, and merge them back, streamed."""

from .adapter import Adapter, read_adapter
from .batch import BatchReport, run_batch
from .checkpoint import Checkpoint, open_checkpoint
from .errors import DeltakitError
from .extract import extract
from .inspect_delta import InspectReport, inspect
from .merge import MergeReport, merge, unmerge
from .report import ExtractReport
from .stack import StackReport, stack

__all__ = [
    "Adapter", "BatchReport", "Checkpoint", "DeltakitError", "ExtractReport", "InspectReport", "MergeReport",
    "StackReport", "extract", "inspect", "merge", "open_checkpoint", "read_adapter", "run_batch", "stack", "unmerge",
]
