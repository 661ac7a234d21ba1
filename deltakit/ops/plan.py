"""Pair a fine-tuned checkpoint with its base from the headers alone, and decide what each module becomes.

Every input error that the headers can reveal (a shape that differs, a module name that PEFT would confuse)
is raised here, before the first tensor is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deltakit.io.checkpoint import Checkpoint
from deltakit.errors import InvalidOptionError, TensorMismatchError, shorten
from deltakit.names import ModuleName, TensorName, split_tensor_name
from deltakit.adapters.architectures import norm_readers
from deltakit.adapters.layers import TiedHead, WeightKind, find_tied_head, weight_kind
from deltakit.adapters.profiles import ExportProfile


@dataclass
class ModulePlan:
    """One module of the fine-tuned checkpoint and its tensors, in checkpoint order."""

    module: ModuleName
    tensors: list[TensorName]
    weight: TensorName | None = None  # the factorizable 2-D weight, if the module has one
    kind: WeightKind = WeightKind.OTHER
    bias: TensorName | None = None
    is_selected: bool = True  # by --include / --exclude
    new_in_finetuned: list[TensorName] = field(default_factory=list)
    resized: dict[TensorName, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


@dataclass
class ExtractPlan:
    modules: list[ModulePlan]
    only_in_base: list[TensorName]
    model_type: str | None
    tied: TiedHead | None  # an output head that shares the input embedding's weight
    parents: set[ModuleName]  # modules that own other modules (modules_to_save cannot take them)


def _compile(patterns: list[str] | None, option: str) -> list[re.Pattern]:
    compiled = []
    for p in patterns or []:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise InvalidOptionError(f"{option} {p!r} is not a valid regex: {e}") from e
    return compiled


def _is_vocab_resize(name: TensorName, kind: WeightKind, base_shape: tuple, ft_shape: tuple) -> bool:
    """An embedding or output head whose vocabulary axis grew or shrank: the one shape change a user makes on
    purpose (``resize_token_embeddings``), carried whole since a low-rank delta cannot express it."""
    if len(base_shape) != len(ft_shape) or base_shape[1:] != ft_shape[1:]:
        return False
    return kind is WeightKind.EMBEDDING or (len(base_shape) >= 1 and "head" in name)


def plan_extract(
    finetuned: Checkpoint,
    base: Checkpoint,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> ExtractPlan:
    """Group the fine-tune's tensors by module, classify each module and check shapes against the base.

    Raises:
        TensorMismatchError: a tensor has different shapes in the two checkpoints (other than a vocabulary
            resize of an embedding or head), naming up to three tensors and both shapes.
        InvalidOptionError: an --include/--exclude regex does not compile.
    """
    includes, excludes = _compile(include, "--include"), _compile(exclude, "--exclude")
    config = finetuned.config or base.config or {}
    model_type = config.get("model_type")
    ft_infos, base_infos = finetuned.tensors, base.tensors
    tied = find_tied_head(ft_infos, config)

    modules: dict[ModuleName, ModulePlan] = {}
    mismatches: list[str] = []
    for name, info in ft_infos.items():
        if tied is not None and name == tied.bias:
            continue  # the tied head's own bias, handled with the head
        module, param = split_tensor_name(name)
        plan = modules.setdefault(module, ModulePlan(module, []))
        plan.tensors.append(name)
        kind = weight_kind(name, info.shape, model_type)
        base_info = base_infos.get(name)
        if base_info is None:
            plan.new_in_finetuned.append(name)
        elif base_info.shape != info.shape:
            if _is_vocab_resize(name, kind, base_info.shape, info.shape):
                plan.resized[name] = (base_info.shape, info.shape)
            else:
                mismatches.append(f"{name} base {list(base_info.shape)} vs fine-tuned {list(info.shape)}")
            continue
        if kind.is_factorizable and base_info is not None:
            plan.weight, plan.kind = name, kind
        elif param == "bias":
            plan.bias = name
    if mismatches:
        raise TensorMismatchError(
            f"{len(mismatches)} tensor(s) differ in shape: {shorten(mismatches)}; is this the right base model?",
            path=finetuned.path,
        )
    for plan in modules.values():
        if plan.bias is not None and plan.bias in plan.resized:
            plan.bias = None
        is_in = not includes or any(p.search(plan.module) for p in includes)
        plan.is_selected = is_in and not any(p.search(plan.module) for p in excludes)

    only_in_base = [n for n in base_infos if n not in ft_infos]
    parents = {m.rsplit(".", i)[0] for m in modules for i in range(1, m.count(".") + 1)}
    return ExtractPlan(
        modules=list(modules.values()),
        only_in_base=only_in_base,
        model_type=model_type,
        tied=tied,
        parents=parents,
    )


@dataclass(frozen=True)
class NormFold:
    """A norm whose scale change is to be folded into the Linear modules that read its output."""

    norm: ModuleName
    weight: TensorName
    readers: tuple[ModuleName, ...]


def plan_norm_folds(plan: ExtractPlan, profile: ExportProfile) -> tuple[list[NormFold], dict[TensorName, str]]:
    """The norms the profile wants folded whose readers can all take the fold (every reader a selected Linear
    that the profile lets have LoRA, none a tied head), and, for each norm that cannot, why. Headers only: whether
    a norm changed, and whether its scale can be divided by, is known once its values are read.
    """
    arch = profile.architecture
    if arch is None:
        return [], {}
    modules = {m.module: m for m in plan.modules}
    folds: list[NormFold] = []
    unfoldable: dict[TensorName, str] = {}
    for norm, readers in norm_readers(arch, modules).items():
        weight = f"{norm}.weight"
        norm_plan = modules[norm]
        if weight not in norm_plan.tensors or weight in norm_plan.new_in_finetuned or weight in norm_plan.resized:
            continue
        problem = None
        for reader in readers:
            reader_plan = modules.get(reader)
            if plan.tied is not None and plan.tied.head == reader:
                # The head's weight is the embedding's: scaling its columns would scale the input side too.
                problem = f"its reader {reader} is tied to {plan.tied.embedding}, which the fold would change too"
            elif reader_plan is None or reader_plan.weight is None or reader_plan.kind is not WeightKind.LINEAR:
                problem = f"its reader {reader} has no Linear weight in both checkpoints"
            elif not reader_plan.is_selected:
                problem = f"its reader {reader} is excluded by --include/--exclude"
            elif (refusal := profile.lora_refusal(reader, reader_plan.kind)) is not None:
                problem = f"its reader {reader} cannot be in the adapter ({refusal})"
            if problem is not None:
                break
        if problem is None:
            folds.append(NormFold(norm, weight, readers))
        else:
            unfoldable[weight] = problem
    return folds, unfoldable
