"""Check the types of an ``adapter_config.json`` before any of its values is used.

A hand-edited or foreign config can hold ``"r": "16"``, ``"lora_alpha": null`` or an invalid regex; used as they
are, those end in a traceback deep inside a merge. Every field deltakit reads is checked here, once, and a wrong
one is one line naming the file and the field. Fields deltakit does not read are left to PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from deltakit.errors import AdapterFormatError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and value == value and abs(value) != float("inf")


def _is_positive_int(value: object) -> bool:
    return _is_int(value) and value > 0


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# field -> (is the value right, what it must be); None is allowed only where the description says so.
_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "r": (_is_positive_int, "a positive integer"),
    "lora_alpha": (_is_number, "a finite number"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v),
                       "null, a regex string or a list of module names"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _is_str_list(v),
                        "null, a regex string or a list of module names"),
    "modules_to_save": (lambda v: v is None or _is_str_list(v), "null or a list of module names"),
    "layers_to_transform": (lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
                            "null, a layer index or a list of layer indices"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _is_str_list(v),
                       "null, a string or a list of strings"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), '"none", "all" or "lora_only"'),
}
# Pattern maps: regex key -> value, checked per entry.
_PATTERNS: dict[str, tuple[Callable[[object], bool], str]] = {
    "rank_pattern": (_is_positive_int, "a positive integer"),
    "alpha_pattern": (_is_number, "a finite number"),
}
# Fields whose string form is a regex PEFT compiles (a list of names is matched literally).
_REGEX_FIELDS = ("target_modules", "exclude_modules")


def check_adapter_config(config_path: Path, config: dict) -> None:
    """Check every field deltakit reads from an adapter config for its type (and regexes for validity).

    Args:
        config_path: the ``adapter_config.json``, for the message.
        config: its parsed content (a dict whose ``peft_type`` is already known to be LORA).

    Raises:
        AdapterFormatError: ``<config_path>: field 'r' is "16" (a string); it must be a positive integer``.
    """
    for name, (is_valid, expected) in _FIELDS.items():
        if name in config and not is_valid(config[name]):
            raise AdapterFormatError(f"field {name!r} is {_show(config[name])}; it must be {expected}",
                                     path=config_path)
    for name in _REGEX_FIELDS:
        if isinstance(config.get(name), str):
            _check_regex(config_path, name, config[name])
    for name, (is_valid, expected) in _PATTERNS.items():
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapterFormatError(f"field {name!r} is {_show(patterns)}; it must be an object of regex -> value",
                                     path=config_path)
        for key, value in patterns.items():
            _check_regex(config_path, f"{name}[{key!r}]", key)
            if not is_valid(value):
                raise AdapterFormatError(f"field {name}[{key!r}] is {_show(value)}; it must be {expected}",
                                         path=config_path)


def _check_regex(config_path: Path, field: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise AdapterFormatError(f"field {field} is not a valid regex ({e})", path=config_path) from e


def _show(value: object) -> str:
    kind = {type(None): "null", bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), "a number")
    text = repr(value) if not isinstance(value, (list, dict)) or len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return "null" if value is None else f"{text} ({kind})"
