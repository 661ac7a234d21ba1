"""Dtype names: safetensors' header codes and the names users give on the command line."""

from __future__ import annotations

import torch

from deltakit.defaults import STORED_DTYPES
from deltakit.errors import InvalidOptionError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
# The rest of the table safetensors.torch maps; older torch builds lack these dtypes.
SAFETENSORS_DTYPES.update(
    {
        name: getattr(torch, attr)
        for name, attr in [
            ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
            ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
            ("U16", "uint16"),
            ("U32", "uint32"),
            ("U64", "uint64"),
        ]
        if hasattr(torch, attr)
    }
)

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

# What --dtype accepts: the float dtypes deltakit stores factors and merged weights in.
DTYPES = {name: getattr(torch, attribute) for name, attribute in STORED_DTYPES.items()}


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """``--dtype`` text to a torch dtype; None stays None (keep the input's dtype)."""
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise InvalidOptionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
