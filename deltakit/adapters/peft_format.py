"""PEFT LoRA/DoRA adapters on disk: the config, the factor keys, writing and reading.

The format is PEFT's (PEFT_FORMAT.md): ``adapter_config.json`` and one ``adapter_model.safetensors``. Ranks and
alphas that differ from the config's ``r``/``lora_alpha`` are written as ``^``-anchored full module names in
``rank_pattern``/``alpha_pattern`` (PEFT takes the first key that matches, so loose keys would be a trap);
``target_modules`` is an anchored regex that selects exactly the factorized modules.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltakit.adapters.config_check import check_adapter_config
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.errors import AdapterFormatError, CheckpointNotFoundError, InvalidOptionError
from deltakit.io.hub import ResolvedRepo, local_path
from deltakit.names import ModuleName, PeftKey, matches_peft_pattern
from deltakit.adapters.layers import WeightKind, lora_keys, magnitude_key, module_pattern, parse_peft_key
from deltakit.io.writer import SafetensorsWriter, TensorSpec, safetensors_size, write_json
from deltakit.math.quantize import FactorCodec, product_distance

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's ``LoraLayer.update_layer``: alpha / r, or alpha / √r with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass
class ModuleFactors:
    """One module's low-rank update, ΔW = scaling · b @ a in (out, in) orientation, plus DoRA's magnitude."""

    module: ModuleName
    kind: WeightKind
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    alpha: float
    scaling: float
    magnitude: torch.Tensor | None = None  # (out,) with DoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """scaling · B @ A in fp32, (out, in)."""
        return self.scaling * (self.b.float() @ self.a.float())


def encode_factors(factors: ModuleFactors, codec: FactorCodec) -> tuple[ModuleFactors, float]:
    """The factors as ``codec`` stores them. An 8-bit codec's scales s_B·s_A multiply the module's ``lora_alpha``
    (written to ``alpha_pattern``), so PEFT's scaling·B_q@A_q is the stored approximation of scaling·B@A and
    PEFT loads the file as it is (it copies the stored values into its float parameters, exactly).

    Returns:
        The stored factors, and ‖ΔW_stored − ΔW‖_F: what the storage alone costs.
    """
    encoded = codec.encode(factors.b, factors.a)
    error = abs(factors.scaling) * product_distance(factors.b, factors.a, encoded.b.float() * encoded.scale,
                                                    encoded.a.float())
    stored = ModuleFactors(factors.module, factors.kind, encoded.a, encoded.b, factors.alpha * encoded.scale,
                           factors.scaling * encoded.scale, factors.magnitude)
    return stored, error


def loading_caveat(factor_dtype: torch.dtype) -> str | None:
    """What a user must know to load factors of this dtype with PEFT, or None.

    PEFT 0.21 copies stored tensors into its float LoRA parameters (``load_state_dict``), except with
    ``low_cpu_mem_usage=True``, where it assigns them as they are and then casts only float parameters to the
    base layer's dtype: integer factors stay integer, its forward casts the input to int8, and the outputs and
    ``merge_and_unload`` are wrong without an error (checked by a test).
    """
    if factor_dtype.is_floating_point:
        return None
    return (f"factors are stored as {str(factor_dtype).removeprefix('torch.')}: load with PEFT's default "
            "low_cpu_mem_usage=False; with low_cpu_mem_usage=True, PEFT 0.21 keeps them as integer parameters "
            "and computes wrong outputs without an error (float8_e4m3fn factors load either way)")


@dataclass
class CarriedTensor:
    """A tensor stored exactly in the adapter (a bias of a targeted module, or a ``modules_to_save`` param)."""

    key: PeftKey
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]  # read lazily at write time: carried embeddings can be large


@dataclass
class AdapterSpec:
    """Everything ``adapter_config.json`` says, in deltakit's terms."""

    rank: int
    alpha: float
    use_rslora: bool = False
    variant_config: dict[str, bool] = field(default_factory=dict)  # AdapterVariant.config(): e.g. use_dora
    base_model_name_or_path: str | None = None
    revision: str | None = None  # the base's Hub commit, which PEFT's AutoPeftModel loads the base at
    task_type: str | None = None
    modules_to_save: list[ModuleName] = field(default_factory=list)
    has_base_biases: bool = False
    ensure_weight_tying: bool = False
    # Default: exactly the modules whose factors are LoRA layers (not parameter targets), as a list.
    target_modules: list[ModuleName] | str | None = None


def adapter_spec(factors: list[ModuleFactors], carried: list[CarriedTensor], *, default_rank: int,
                 alpha: float | None = None, rank: int | None = None, **fields: object) -> AdapterSpec:
    """The spec of an adapter holding these tensors: ``r`` is ``rank`` if given, else the commonest rank (the
    others go to ``rank_pattern``), ``lora_alpha`` is ``alpha`` (default: that rank), and the bias mode follows
    the carried tensors. ``default_rank``: ``r`` when there are no factors."""
    ranks = Counter(f.rank for f in factors)
    if rank is None:
        rank = ranks.most_common(1)[0][0] if ranks else default_rank
    return AdapterSpec(rank=rank, alpha=float(alpha if alpha is not None else rank),
                       has_base_biases=any(c.key.endswith(".base_layer.bias") for c in carried), **fields)


def _default_rank_alpha(factors: list[ModuleFactors], spec: AdapterSpec) -> tuple[dict[str, int], dict[str, float]]:
    rank_pattern = {module_pattern(_pattern_target(f)): f.rank for f in factors if f.rank != spec.rank}
    alpha_pattern = {module_pattern(_pattern_target(f)): f.alpha for f in factors if f.alpha != spec.alpha}
    return rank_pattern, alpha_pattern


def peft_config(factors: list[ModuleFactors], spec: AdapterSpec) -> dict:
    """The ``adapter_config.json`` contents PEFT needs to rebuild exactly these modules."""
    rank_pattern, alpha_pattern = _default_rank_alpha(factors, spec)
    modules = [f.module for f in factors if not is_parameter_target(f)]
    parameters = [f"{f.module}.weight" for f in factors if is_parameter_target(f)]
    return {
        "peft_type": "LORA",
        "task_type": spec.task_type,
        "base_model_name_or_path": spec.base_model_name_or_path,
        "revision": spec.revision,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        **spec.variant_config,
        # An empty list, not None, where only parameters are targeted: PEFT fills in a default for None.
        "target_modules": spec.target_modules if spec.target_modules is not None else (
            modules or ([] if parameters else None)),
        "target_parameters": parameters or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": any(f.kind is WeightKind.CONV1D and not is_parameter_target(f) for f in factors),
        "modules_to_save": spec.modules_to_save or None,
        "bias": "lora_only" if spec.has_base_biases else "none",
        "lora_bias": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "ensure_weight_tying": spec.ensure_weight_tying,
    }


def is_parameter_target(f: ModuleFactors) -> bool:
    """Whether PEFT gets these factors as a LoRA on the weight parameter as stored (``target_parameters``, its
    ParamWrapper) instead of a LoRA layer: Conv1D weights. PEFT 0.21 has one ``fan_in_fan_out`` for all LoRA
    layers and warns about every layer whose class disagrees with it (``lora.layer.dispatch_default``), so
    Conv1D layers beside a Linear one (GPT-2's tied ``lm_head``) cannot all load quietly as layers; a parameter
    LoRA needs no flag. It takes no DoRA, so DoRA factors of a Conv1D stay a layer with ``fan_in_fan_out``."""
    return f.kind is WeightKind.CONV1D and f.magnitude is None


def _pattern_target(f: ModuleFactors) -> str:
    """What PEFT matches ``rank_pattern``/``alpha_pattern`` keys against: the module, or the parameter's name."""
    return f"{f.module}.weight" if is_parameter_target(f) else f.module


def factor_tensors(f: ModuleFactors) -> dict[PeftKey, torch.Tensor]:
    key_a, key_b = lora_keys(f.module, f.kind)
    if is_parameter_target(f):
        # ΔW as stored, (in, out), is B'·A' with B' = Aᵀ (in, r) and A' = Bᵀ (r, out).
        return {key_a: f.b.T.contiguous(), key_b: f.a.T.contiguous()}
    tensors = {key_a: f.a.contiguous(), key_b: f.b.contiguous()}
    if f.magnitude is not None:
        tensors[magnitude_key(f.module)] = f.magnitude.contiguous()
    return tensors


_METADATA = {"format": "pt"}


def _factor_dict(factors: list[ModuleFactors]) -> dict[PeftKey, torch.Tensor]:
    tensors: dict[PeftKey, torch.Tensor] = {}
    for f in factors:
        tensors.update(factor_tensors(f))
    return tensors


def _weight_specs(in_memory: dict[PeftKey, torch.Tensor], carried: list[CarriedTensor]) -> list[TensorSpec]:
    return [(k, t.dtype, tuple(t.shape)) for k, t in in_memory.items()] + [(c.key, c.dtype, c.shape) for c in carried]


def adapter_file_size(factors: list[ModuleFactors], carried: list[CarriedTensor]) -> int:
    """The exact size of the ``adapter_model.safetensors`` :func:`write_adapter` writes, header included. Factors
    on the ``meta`` device are enough: only their shapes and dtypes count."""
    return safetensors_size(_weight_specs(_factor_dict(factors), carried), _METADATA)


def write_adapter(
    out_dir: Path,
    factors: list[ModuleFactors],
    carried: Iterable[CarriedTensor],
    spec: AdapterSpec,
) -> int:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``out_dir``.

    Factors are held in memory (they are small); carried tensors are read one at a time while writing.

    Returns:
        The size of the weights file in bytes.
    """
    in_memory = _factor_dict(factors)
    carried = list(carried)
    weights_path = out_dir / WEIGHTS_FILE
    with SafetensorsWriter(weights_path, _weight_specs(in_memory, carried), metadata=_METADATA) as writer:
        for key, tensor in in_memory.items():
            writer.write(key, tensor)
        for c in carried:
            writer.write(c.key, c.load())
    write_json(out_dir / CONFIG_FILE, peft_config(factors, spec))
    return weights_path.stat().st_size


# --- reading -------------------------------------------------------------------------------------------------


@dataclass
class AdapterModule:
    """What an adapter holds for one module: factor keys, and where the scaling comes from."""

    module: ModuleName
    key_a: PeftKey | None = None
    key_b: PeftKey | None = None
    magnitude_key: PeftKey | None = None
    base_bias_key: PeftKey | None = None
    is_embedding: bool = False


class Adapter:
    """A PEFT LoRA/DoRA adapter read lazily from disk (tensors are loaded on request)."""

    def __init__(self, path: Path, config: dict, weights: Checkpoint, source: ResolvedRepo | None = None) -> None:
        self.path = path
        self.source = source  # the Hub repository and commit it was fetched from; None for a local directory
        self.config = config
        self.weights = weights
        self.modules: dict[ModuleName, AdapterModule] = {}
        self.saved: dict[str, PeftKey] = {}  # tensor name in the base → key, for modules_to_save params
        for key in weights:
            module, role = parse_peft_key(key)
            if role.startswith("saved:"):
                self.saved[f"{module}.{role[len('saved:'):]}" if module else role[len("saved:"):]] = key
                continue
            entry = self.modules.setdefault(module, AdapterModule(module))
            if role == "lora_A":
                entry.key_a, entry.is_embedding = key, key.endswith("lora_embedding_A")
            elif role == "lora_B":
                entry.key_b = key
            elif role == "magnitude":
                entry.magnitude_key = key
            else:
                entry.base_bias_key = key
        for entry in self.modules.values():
            if (entry.key_a is None) != (entry.key_b is None):
                raise AdapterFormatError(
                    f"module {entry.module} has only one of lora_A / lora_B", path=path / WEIGHTS_FILE
                )

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def is_parameter_target(self, module: ModuleName) -> bool:
        """Whether the module's factors are a LoRA on its weight as stored (``target_parameters``), not a layer's."""
        return f"{module}.weight" in (self.config.get("target_parameters") or [])

    def is_conv1d(self, module: ModuleName) -> bool:
        """Whether the module's factors are a Conv1D's: a parameter target, or a layer under ``fan_in_fan_out``."""
        return self.is_parameter_target(module) or self.fan_in_fan_out

    def factor_shapes(self, module: ModuleName) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of the module's A (r, in) and B (out, r) in (out, in) orientation, from the header."""
        entry = self.modules[module]
        a_shape, b_shape = tuple(self.weights.info(entry.key_a).shape), tuple(self.weights.info(entry.key_b).shape)
        return (b_shape[::-1], a_shape[::-1]) if self.is_parameter_target(module) else (a_shape, b_shape)

    def _pattern_value(self, pattern_field: str, module: ModuleName, default: float) -> float:
        name = f"{module}.weight" if self.is_parameter_target(module) else module  # what PEFT matches, per target
        for key, value in (self.config.get(pattern_field) or {}).items():
            if matches_peft_pattern(key, name):
                return value
        return default

    def scaling(self, module: ModuleName) -> float:
        """The module's scaling, resolved from ``rank_pattern``/``alpha_pattern`` with PEFT's first-match rule."""
        rank = int(self._pattern_value("rank_pattern", module, self.config["r"]))
        alpha = float(self._pattern_value("alpha_pattern", module, self.config["lora_alpha"]))
        return lora_scaling(alpha, rank, bool(self.config.get("use_rslora", False)))

    def factors(self, module: ModuleName, kind: WeightKind) -> ModuleFactors:
        entry = self.modules[module]
        if entry.key_a is None or entry.key_b is None:
            raise AdapterFormatError(f"module {module} has no LoRA factors", path=self.path / WEIGHTS_FILE)
        a, b = self.weights.get(entry.key_a), self.weights.get(entry.key_b)
        if self.is_parameter_target(module):
            a, b = b.T, a.T  # stored as the weight's (in, out) LoRA: see is_parameter_target
        rank = int(self._pattern_value("rank_pattern", module, self.config["r"]))
        if a.shape[0] != rank or b.shape[1] != rank:
            raise AdapterFormatError(
                f"module {module}: factors have rank {a.shape[0]} but the config gives r={rank}",
                path=self.path / CONFIG_FILE,
            )
        magnitude = self.weights.get(entry.magnitude_key) if entry.magnitude_key else None
        alpha = float(self._pattern_value("alpha_pattern", module, self.config["lora_alpha"]))
        return ModuleFactors(module, kind, a, b, alpha, self.scaling(module), magnitude)


def parse_weights(weights: list[float] | None, count: int) -> list[float]:
    """One finite weight per adapter, 1.0 each by default.

    Raises:
        InvalidOptionError: no adapters, a count that differs, or a weight that is not finite.
    """
    if count == 0:
        raise InvalidOptionError("no adapters given")
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise InvalidOptionError(f"{len(weights)} weight(s) for {count} adapter(s); give one -w per adapter or none")
    if not all(torch.isfinite(torch.tensor(float(w))) for w in weights):
        raise InvalidOptionError(f"weights must be finite numbers, got {list(weights)}")
    return [float(w) for w in weights]


def check_supported(adapter: Adapter) -> None:
    """Refuse PEFT LoRA features whose weights are not plain factors, biases or saved modules.

    Raises:
        AdapterFormatError: naming the config option.
    """
    config_path = adapter.path / "adapter_config.json"
    for option, what in (("lora_bias", "lora_bias (a trained bias delta)"),
                         ("trainable_token_indices", "trainable_token_indices")):
        if adapter.config.get(option):
            raise AdapterFormatError(f"uses {what}, which deltakit cannot merge", path=config_path)
    # A 2-D weight's parameter LoRA is what deltakit writes for Conv1D layers; fused expert parameters are not.
    for parameter in adapter.config.get("target_parameters") or []:
        module = parameter.removesuffix(".weight")
        entry = adapter.modules.get(module)
        if (module == parameter or entry is None or entry.key_a is None
                or len(adapter.weights.info(entry.key_a).shape) != 2):
            raise AdapterFormatError(f"uses target_parameters ({parameter!r}: LoRA on a bare parameter other than a "
                                     "2-D weight), which deltakit cannot merge", path=config_path)


def read_adapter(path: str | Path) -> Adapter:
    """Open a PEFT adapter directory, or (when no such path exists) a Hub id ``org/name[@revision]``.

    Raises:
        HubError, HubUnavailableError: a Hub id that cannot be resolved.
        CheckpointNotFoundError: no such directory, or no weights in it.
        AdapterFormatError: the config is missing, unreadable, or not a LoRA config.
    """
    adapter_dir, source = local_path(path, kind="adapter")
    config_path = adapter_dir / CONFIG_FILE
    if not config_path.is_file():
        if not adapter_dir.exists():
            raise CheckpointNotFoundError("no such adapter directory", path=adapter_dir)
        raise AdapterFormatError(f"no {CONFIG_FILE}; is this a PEFT adapter directory?", path=adapter_dir)
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"not valid JSON ({e})", path=config_path) from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise AdapterFormatError("not a LoRA adapter config (peft_type must be LORA)", path=config_path)
    for required in ("r", "lora_alpha"):
        if required not in config:
            raise AdapterFormatError(f"missing {required!r}", path=config_path)
    check_adapter_config(config_path, config)
    weights_path = adapter_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointNotFoundError(f"no {WEIGHTS_FILE} in the adapter directory", path=adapter_dir)
    try:
        return Adapter(adapter_dir, config, open_checkpoint(weights_path), source)
    except ValueError as e:
        raise AdapterFormatError(str(e), path=weights_path) from e


def task_type_for(architectures: list[str] | None) -> str | None:
    """PEFT's task type from a transformers ``architectures`` entry, so AutoPeftModel* picks the right class."""
    suffixes = {
        "ForCausalLM": "CAUSAL_LM",
        "ForSequenceClassification": "SEQ_CLS",
        "ForTokenClassification": "TOKEN_CLS",
        "ForQuestionAnswering": "QUESTION_ANS",
    }
    for arch in architectures or []:
        for suffix, task in suffixes.items():
            if re.search(suffix + "$", arch):
                return task
    return None
