"""Which of an adapter's modules PEFT applies: ``target_modules``, ``exclude_modules``, ``layers_to_transform``.

An adapter file can hold factors for more modules than its config targets (a hand-edited config, a file written
by another tool). ``PeftModel.from_pretrained`` creates LoRA layers only where the config says and ignores the
other keys, so ``merge_and_unload`` merges only those; merge must do the same. The rules below are PEFT 0.21.2's
``tuners_utils.check_target_module_exists``, applied to module names as PEFT sees them (the adapter's keys
without ``base_model.model.``); ``modules_to_save`` is handled by its own keys and never targeted.
"""

from __future__ import annotations

import re

from deltakit.names import ModuleName

# PEFT expands this target to every Linear/Conv1D layer but the output head when it creates the layers.
_ALL_LINEAR = "all-linear"
_OUTPUT_HEADS = ("lm_head",)


def is_targeted(config: dict, module: ModuleName) -> bool:
    """Whether PEFT, loading an adapter with this config, puts a LoRA layer on ``module``.

    Args:
        config: the adapter config (types checked by :func:`~deltakit.adapters.config_check.check_adapter_config`).
        module: the module's name in the model, e.g. ``model.layers.0.self_attn.q_proj``.

    Returns:
        False where PEFT would leave the module alone: excluded, saved whole, not targeted, or outside
        ``layers_to_transform``. A config without ``target_modules`` targets what the file holds.
    """
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str):
        if re.fullmatch(excluded, module):
            return False
    elif excluded and _names_match(excluded, module):
        return False
    if any(re.match(rf"(^|.*\.){saved}($|\..*)", module) for saved in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return True
    if isinstance(targets, str):
        if targets == _ALL_LINEAR:
            return module.rsplit(".", 1)[-1] not in _OUTPUT_HEADS
        # PEFT's match_target_against_key: the whole name must match.
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True  # a full name is taken as it is, whatever layers_to_transform says (PEFT's order of tests)
    return _names_match(targets, module) and _in_transformed_layers(config, module)


def _names_match(names: list[str], module: ModuleName) -> bool:
    return module in names or any(module.endswith(f".{name}") for name in names)


def _in_transformed_layers(config: dict, module: ModuleName) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    if not pattern:
        # The first numbered component (lazy): a nested index (an MoE expert) must not be taken for the layer.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for name in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers
