"""The three kinds of name deltakit handles, and the string rules that relate them (no I/O, no torch).

- ``TensorName``: a key in a checkpoint, e.g. ``model.layers.0.mlp.up_proj.weight``;
- ``ModuleName``: the module that owns it, e.g. ``model.layers.0.mlp.up_proj``;
- ``PeftKey``: a key in a PEFT adapter file, e.g. ``base_model.model.model.layers.0.mlp.up_proj.lora_A.weight``.
"""

from __future__ import annotations

import re

TensorName = str
ModuleName = str
PeftKey = str


def split_tensor_name(name: TensorName) -> tuple[ModuleName, str]:
    """``'a.b.weight'`` → ``('a.b', 'weight')``; a top-level parameter has module ``''``."""
    module, _, param = name.rpartition(".")
    return module, param


def matches_peft_pattern(key: str, module: ModuleName) -> bool:
    """PEFT's rule for ``rank_pattern`` keys (``utils/other.py::get_pattern_key``)."""
    return re.match(rf"(.*\.)?({key})$", module) is not None
