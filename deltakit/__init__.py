"""deltakit: extract LoRA/DoRA adapters from fully fine-tuned checkpoints, and merge them back, streamed."""

from .adapter import Adapter, read_adapter
from .checkpoint import Checkpoint, open_checkpoint
from .errors import DeltakitError
from .extract import extract
from .report import ExtractReport

__all__ = ["Adapter", "Checkpoint", "DeltakitError", "ExtractReport", "extract", "open_checkpoint", "read_adapter"]
