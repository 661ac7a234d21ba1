"""Plans made from headers alone, before the first tensor is read: what each module of a fine-tune becomes
(extract, inspect), and what each adapter does to each base tensor (merge, unmerge).

Every input error that the headers (and the small adapters) can reveal is raised here: a shape that differs, a
module name that PEFT would confuse, an adapter that does not fit its base.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from deltakit.adapters.architectures import norm_readers
from deltakit.adapters.layers import (
    TiedHead,
    WeightKind,
    base_bias_key,
    find_tied_head,
    out_in_shape,
    saved_module_key,
    transpose_embedding_factors,
    weight_kind,
)
from deltakit.adapters.moe import is_claimed_by_peft, moe_family
from deltakit.adapters.peft_format import WEIGHTS_FILE, Adapter, ModuleFactors, check_supported
from deltakit.adapters.profiles import PEFT_PROFILE, ExportProfile
from deltakit.adapters.targeting import is_targeted
from deltakit.adapters.variants import AdapterVariant, variant_of
from deltakit.errors import (
    AdapterFormatError,
    InvalidOptionError,
    TensorMismatchError,
    TensorMissingError,
    shorten,
)
from deltakit.io.checkpoint import Checkpoint, TensorInfo
from deltakit.names import ModuleName, PeftKey, TensorName, split_tensor_name
from deltakit.ops.report import TensorChange, TensorFate


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
    # Linears PEFT's MoE conversion takes for experts (adapters/moe.py): not factorized, carried whole if changed.
    claimed_by_peft: list[ModuleName] = field(default_factory=list)


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


def _check_same_model(finetuned: Checkpoint, base: Checkpoint) -> None:
    """Refuse, from configs and headers, a base of another model: it would turn the whole fine-tune into carried
    tensors (or garbage deltas) and still exit 0.

    Raises:
        TensorMismatchError: the configs' ``model_type`` or ``architectures`` differ, or no 2-D weight of the
            fine-tune has a tensor of the same name in the base.
    """
    ft_config, base_config = finetuned.config or {}, base.config or {}
    for key in ("model_type", "architectures"):
        ft_value, base_value = ft_config.get(key), base_config.get(key)
        if ft_value is not None and base_value is not None and ft_value != base_value:
            raise TensorMismatchError(f"{key} is {ft_value!r} here but {base_value!r} in the base {base.path}: not "
                                      "the same model; give the base this checkpoint was fine-tuned from",
                                      path=finetuned.path)
    base_infos = base.tensors
    # Names only: a shape that differs gets its own, more precise message from the plan.
    if not any(len(info.shape) == 2 and name in base_infos for name, info in finetuned.tensors.items()):
        raise TensorMismatchError(f"no 2-D weight pairs with a tensor of the same name in the base "
                                  f"{base.path}: not the same model; give the base this checkpoint was fine-tuned "
                                  "from", path=finetuned.path)


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
    _check_same_model(finetuned, base)
    config = finetuned.config or base.config or {}
    model_type = config.get("model_type")
    ft_infos, base_infos = finetuned.tensors, base.tensors
    tied = find_tied_head(ft_infos, config)
    family = moe_family(model_type)
    claimed: list[ModuleName] = []

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
        if kind.is_factorizable and base_info is not None and is_claimed_by_peft(module, family):
            claimed.append(module)
        elif kind.is_factorizable and base_info is not None:
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
        claimed_by_peft=claimed,
    )


@dataclass
class ModuleFates:
    """What becomes of a module's changed tensors that are not factorized: each carried (under ``keys``) or
    dropped, with the reason."""

    fates: list[TensorFate] = field(default_factory=list)
    keys: dict[TensorName, PeftKey] = field(default_factory=dict)  # carried tensor → its adapter key
    saves_module: bool = False  # the whole module goes to modules_to_save
    notes: list[str] = field(default_factory=list)

    def carry(self, name: TensorName, key: PeftKey, reason: str) -> None:
        self.fates.append(TensorFate(name, "carried", reason))
        self.keys[name] = key

    def drop(self, names: list[TensorName], reason: str) -> None:
        self.fates.extend(TensorFate(n, "dropped", reason) for n in names)


def module_fates(plan: ExtractPlan, module: ModulePlan, changed: list[TensorName], *, factorized: bool,
                 carry: bool, profile: ExportProfile = PEFT_PROFILE,
                 reasons: dict[TensorName, str] | None = None) -> ModuleFates:
    """The fate of each changed tensor of ``module`` (in ``changed``) that is not its factorized weight, from
    the plan, which of its tensors changed, whether its weight was factorized, and what the profile's reader
    loads. ``reasons``: why a tensor that cannot be carried was not factorized or folded either."""
    result = ModuleFates()
    if not changed:
        return result
    if not module.is_selected:
        result.drop(changed, "changed, but excluded by --include/--exclude")
    elif not carry:
        result.drop(changed, "changed and not factorizable; --no-carry")
    elif factorized and changed == [module.bias] and (why := profile.carry_refusal(is_bias=True)) is not None:
        result.drop(changed, why)
    elif factorized and changed == [module.bias]:
        # PEFT's bias="lora_only" loads a targeted module's bias from `<module>.base_layer.bias`.
        result.carry(module.bias, base_bias_key(module.module), "bias of a factorized module")
    elif factorized:
        # A factorized module with other changed params cannot also be a modules_to_save module.
        result.drop(changed, "changed param of a factorized module that PEFT cannot carry")
    elif not module.module or module.module in plan.parents:
        result.drop(changed, "a parameter of a module with submodules; PEFT's modules_to_save would replace the "
                             "whole subtree" if module.module else
                             "a top-level parameter; PEFT's modules_to_save needs a module")
    elif (why := profile.carry_refusal(is_bias=False)) is not None:
        for n in changed:
            result.drop([n], "; ".join(filter(None, [(reasons or {}).get(n), why])))
    else:
        # modules_to_save replaces the whole module, so every param of it is stored, changed or not.
        result.saves_module = True
        for n in module.tensors:
            reason = "modules_to_save"
            if n in module.resized:
                before, after = module.resized[n]
                reason += (f"; vocabulary resized {before[0]} → {after[0]}: call resize_token_embeddings({after[0]}) "
                           "on the base before loading")
                result.notes.append(f"{n}: resized {list(before)} → {list(after)}; resize the base model's token "
                                    "embeddings before loading this adapter")
            elif n in module.new_in_finetuned:
                reason += "; not in the base"
            result.carry(n, saved_module_key(n), reason)
    return result


def tied_bias_fates(tied: TiedHead, *, head_factorized: bool, carry: bool,
                    profile: ExportProfile = PEFT_PROFILE) -> ModuleFates:
    """The fate of a tied head's changed bias that lives under another module's name (BERT's
    ``cls.predictions.bias``)."""
    result = ModuleFates()
    if not carry:
        result.drop([tied.bias], "changed and not factorizable; --no-carry")
    elif (why := profile.carry_refusal(is_bias=True)) is not None:
        result.drop([tied.bias], why)
    elif head_factorized:
        result.carry(tied.bias, base_bias_key(tied.head), f"bias of the tied head {tied.head}")
    else:
        result.drop([tied.bias], f"the bias of the tied head {tied.head}, which is not factorized; PEFT can only "
                                 "carry it as the base_layer bias of a targeted head")
    return result

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


# --- merge and unmerge: every check from headers (and the small adapters) before anything is written -------------


@dataclass(frozen=True)
class FactorStep:
    """One adapter's low-rank update of one base weight."""

    adapter: int  # position in the adapter list
    variant: AdapterVariant
    factors: ModuleFactors

    @property
    def op(self) -> str:
        return self.variant.name


@dataclass(frozen=True)
class ReplaceStep:
    """One adapter's new value of a base tensor (``modules_to_save``, ``base_layer.bias``)."""

    adapter: int
    key: PeftKey  # the adapter key that holds the new value
    op: ClassVar[str] = "replace"


@dataclass
class TensorJob:
    """What the adapters do to one base tensor, in adapter order: one replacement, or factor steps."""

    tensor: TensorName
    kind: WeightKind
    steps: list[FactorStep | ReplaceStep]

    @property
    def replacement(self) -> ReplaceStep | None:
        return self.steps[0] if isinstance(self.steps[0], ReplaceStep) else None  # the planner allows no mix


@dataclass
class MergePlan:
    jobs: dict[TensorName, TensorJob]  # in adapter order
    notes: list[str]

    def changes(self, ckpt: Checkpoint, *, reverse: bool) -> list[TensorChange]:
        """What the report lists: each changed tensor in checkpoint order, its steps in the order applied."""
        changes = []
        for name in ckpt:
            if name in self.jobs:
                steps = [(s.adapter + 1, s.op) for s in self.jobs[name].steps]
                changes.append(TensorChange(name, steps[::-1] if reverse else steps))
        return changes


def _name_map(adapter: Adapter, ckpt: Checkpoint, tied: TiedHead | None):
    """How the adapter's module names map onto the checkpoint's tensor names.

    PEFT names modules as in the transformers model class (``transformer.h.0.attn.c_attn``), while some
    checkpoints on the Hub store the inner model without its prefix (``h.0.attn.c_attn.weight``, the original
    GPT-2): when nothing resolves as is but everything does without the first component, that is used. A tied
    head (``tied``) has no tensors of its own to resolve.
    """
    modules = [(m, e) for m, e in adapter.modules.items() if tied is None or m != tied.head]
    wanted = [f"{m}.weight" for m, e in modules if e.key_a is not None]
    wanted += [f"{m}.bias" for m, e in modules if e.base_bias_key is not None]
    wanted += [_unwrapped(name) for name in adapter.saved]

    def identity(name: str) -> str:
        return name

    def strip_first(name: str) -> str:
        return name.partition(".")[2]

    if all(n in ckpt for n in wanted) or not wanted:
        return identity
    if all("." in n and strip_first(n) in ckpt for n in wanted):
        return strip_first
    return identity


def _unwrapped(name: TensorName) -> TensorName:
    """``M.base_layer.weight`` → ``M.weight``: PEFT's name for a targeted layer's own params inside its wrapper."""
    return name.replace(".base_layer.", ".")


def _factor_kind(adapter: Adapter, module: str, tensor: TensorName, stored: tuple[int, ...],
                 a_shape: tuple[int, ...], b_shape: tuple[int, ...], is_embedding: bool,
                 model_type: str | None) -> WeightKind:
    """The kind of a targeted weight, from the factor shapes, the stored shape, ``fan_in_fan_out`` and the name.

    Factors are (out, in): A (r, in), B (out, r). Linear stores (out, in); Conv1D and embeddings store (in, out).
    PEFT decides Linear vs Conv1D by the layer class (and corrects ``fan_in_fan_out`` to match), which a
    checkpoint does not record; here a non-square weight's shape decides when the config flag or the name agrees
    with it, and a square one follows the flag when the name does not contradict it. Anything else is refused.
    """
    where = adapter.path / WEIGHTS_FILE
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise AdapterFormatError(f"module {module}: factors of shape {list(a_shape)}, {list(b_shape)}; only 2-D "
                                 "(Linear, Conv1D, Embedding) LoRA can be merged", path=where)
    if a_shape[0] != b_shape[1]:
        raise AdapterFormatError(f"module {module}: lora_A {list(a_shape)} and lora_B {list(b_shape)} disagree on "
                                 "the rank", path=where)
    out, inp = b_shape[0], a_shape[1]
    mismatch = (f"adapter {adapter.path} module {module}: factors give (out, in) = ({out}, {inp}) but the base "
                f"weight is {list(stored)}; is this adapter for this base model?")
    if len(stored) != 2:
        raise TensorMismatchError(mismatch, tensor=tensor)
    if is_embedding:
        if out_in_shape(stored, WeightKind.EMBEDDING) != (out, inp):
            raise TensorMismatchError(mismatch, tensor=tensor)
        return WeightKind.EMBEDDING
    by_flag = WeightKind.CONV1D if adapter.is_conv1d(module) else WeightKind.LINEAR
    by_name = weight_kind(tensor, stored, model_type)
    by_name = WeightKind.CONV1D if by_name is WeightKind.CONV1D else WeightKind.LINEAR
    fits = [k for k in (WeightKind.LINEAR, WeightKind.CONV1D) if out_in_shape(stored, k) == (out, inp)]
    if not fits:
        raise TensorMismatchError(mismatch, tensor=tensor)
    if len(fits) == 1 and fits[0] in (by_flag, by_name):
        return fits[0]
    if len(fits) == 2 and by_flag is by_name:
        return by_flag
    raise TensorMismatchError(
        f"adapter {adapter.path} module {module}: cannot tell whether the {list(stored)} weight is Linear or Conv1D "
        f"(fan_in_fan_out={adapter.fan_in_fan_out}, the name suggests {by_name.value}, the shapes fit "
        f"{' or '.join(k.value for k in fits)})", tensor=tensor)


def _require(ckpt: Checkpoint, adapter: Adapter, tensor: TensorName, what: str,
             shape: tuple[int, ...] | None, tied: TiedHead | None) -> TensorInfo:
    if tensor not in ckpt:
        if tied is not None and tensor == f"{tied.head}.weight":
            # The tensor is the input embedding's; replacing it would change the embedding as well.
            raise TensorMissingError(f"adapter {adapter.path} has {what}, but the base ties {tied.head} to "
                                     f"{tied.embedding} and stores no weight of its own; deltakit cannot merge a "
                                     "tied head's own update", path=ckpt.path, tensor=tensor)
        raise TensorMissingError(f"adapter {adapter.path} has {what}, but the base has no such tensor; is this "
                                 "adapter for this base model?", path=ckpt.path, tensor=tensor)
    info = ckpt.info(tensor)
    if shape is not None and tuple(info.shape) != tuple(shape):
        raise TensorMismatchError(f"adapter {adapter.path} has {what} of shape {list(shape)}, the base's is "
                                  f"{list(info.shape)}", path=ckpt.path, tensor=tensor)
    if not info.dtype.is_floating_point:
        raise TensorMismatchError(f"adapter {adapter.path} has {what}, but the base tensor is {info.dtype}",
                                  path=ckpt.path, tensor=tensor)
    return info


def _check_layer_copy(ckpt: Checkpoint, adapter: Adapter, tensor: TensorName, key: str) -> None:
    """A targeted layer's own weight saved in the adapter (PEFT's ``save_embedding_layers``): a copy of the base
    layer that PEFT loads back before applying LoRA. Nothing to do when it equals the base; refused otherwise."""
    saved, base_value = adapter.weights.get(key), ckpt.get(tensor)
    if not torch.equal(saved.to(base_value.dtype), base_value):
        raise AdapterFormatError(f"{key} differs from the base's {tensor}; the adapter was trained on another base "
                                 "(merge that base layer first)", path=adapter.path / WEIGHTS_FILE)


def _check_tied_head(adapter: Adapter, module: str, tied: TiedHead, to_base: Callable[[str], str]) -> None:
    """A tied head's factors must be the embedding's, transposed (what extract stores, and what PEFT's
    ``ensure_weight_tying`` shares), with the same scaling: then the embedding's update, merged once into the one
    tensor the base stores, is the head's update too.

    Raises:
        TensorMissingError: anything else, which would need a head weight of its own.
    """
    entries = adapter.modules
    embedding = next((m for m, e in entries.items()
                      if e.key_a is not None and to_base(f"{m}.weight") == f"{tied.embedding}.weight"), None)
    if embedding is None:
        problem = f"the adapter has no factors for {tied.embedding} to share with it"
    elif variant_of(adapter).tied_head_refusal is not None:
        problem = variant_of(adapter).tied_head_refusal
    else:
        head_a, head_b = (adapter.weights.get(entries[module].key_a), adapter.weights.get(entries[module].key_b))
        embedding_a, embedding_b = (adapter.weights.get(entries[embedding].key_a),
                                    adapter.weights.get(entries[embedding].key_b))
        expected_a, expected_b = transpose_embedding_factors(embedding_a, embedding_b)
        if not (entries[embedding].is_embedding and torch.equal(head_a, expected_a)
                and torch.equal(head_b, expected_b)):
            problem = f"its factors are not {embedding}'s transposed"
        elif adapter.scaling(module) != adapter.scaling(embedding):
            problem = f"its scaling {adapter.scaling(module):g} differs from {embedding}'s"
        else:
            return
    raise TensorMissingError(f"module {module}: the base ties this head to {tied.embedding} and stores no weight "
                             f"of its own, and {problem}; merging it would change the input embedding as well",
                             path=adapter.path / WEIGHTS_FILE, tensor=f"{module}.weight")


def _is_applied(adapter: Adapter, module: ModuleName, tied: TiedHead | None) -> bool:
    """Whether PEFT, loading the adapter, would apply its entry for ``module``: targeted by the config, or a tied
    head that PEFT's ``ensure_weight_tying`` gives the targeted embedding's factors, or a targeted parameter."""
    if is_targeted(adapter.config, module) or adapter.is_parameter_target(module):
        return True
    return (tied is not None and module == tied.head and bool(adapter.config.get("ensure_weight_tying"))
            and is_targeted(adapter.config, tied.embedding))


def plan_merge(ckpt: Checkpoint, adapters: list[Adapter], *, is_base: bool) -> MergePlan:
    """Every step of every adapter, by base tensor, in adapter order; all input errors raised here.

    ``is_base``: ``ckpt`` is the base (merge), so the layer copies an adapter carries can be checked against it.
    An output head tied to the input embedding (stored once, under the embedding's name) gets no step of its
    own: its factors are checked to be the embedding's, whose step then covers it; its bias, where saved under
    another module's name (BERT's ``cls.predictions.bias``), is that tensor.

    Returns:
        The jobs by tensor name, and notes for the report.

    Raises:
        AdapterFormatError, TensorMissingError, TensorMismatchError, InvalidOptionError.
    """
    model_type = (ckpt.config or {}).get("model_type")
    tied = find_tied_head(ckpt, ckpt.config or {})
    jobs: dict[TensorName, TensorJob] = {}
    notes: list[str] = []

    def add(tensor: TensorName, kind: WeightKind, step: FactorStep | ReplaceStep) -> None:
        jobs.setdefault(tensor, TensorJob(tensor, kind, [])).steps.append(step)

    for k, adapter in enumerate(adapters):
        check_supported(adapter)
        variant = variant_of(adapter)
        to_base = _name_map(adapter, ckpt, tied)
        where = adapter.path / WEIGHTS_FILE
        ignored = [module for module in adapter.modules if not _is_applied(adapter, module, tied)]
        if ignored:
            if len(ignored) == len(adapter.modules) and not adapter.saved:
                raise AdapterFormatError(f"its config targets none of the {len(ignored)} module(s) in "
                                         f"{WEIGHTS_FILE} (target_modules, exclude_modules, layers_to_transform); "
                                         "merging it would change nothing", path=adapter.path / "adapter_config.json")
            notes.append(f"adapter #{k + 1}: {len(ignored)} module(s) in {WEIGHTS_FILE} not targeted by its config "
                         f"(target_modules, exclude_modules, layers_to_transform), ignored as PEFT ignores them: "
                         f"{shorten(ignored)}")
        for module, entry in adapter.modules.items():
            if module in ignored:
                continue
            is_tied_head = tied is not None and module == tied.head
            if entry.key_a is None:
                if entry.magnitude_key is not None:
                    raise AdapterFormatError(f"module {module} has a DoRA magnitude but no LoRA factors", path=where)
            elif is_tied_head:
                _check_tied_head(adapter, module, tied, to_base)
                notes.append(f"adapter #{k + 1}: {module} is tied to {tied.embedding} (the base stores no "
                             f"{module}.weight) and its factors are the embedding's, transposed: the embedding's "
                             "update, merged once, is the head's")
            else:
                tensor = to_base(f"{module}.weight")
                info = _require(ckpt, adapter, tensor, f"LoRA factors for module {module}", None, tied)
                a_shape, b_shape = adapter.factor_shapes(module)
                kind = _factor_kind(adapter, module, tensor, info.shape, a_shape, b_shape, entry.is_embedding,
                                    model_type)
                variant.check_module(adapter, entry, b_shape[0], where)
                add(tensor, kind, FactorStep(k, variant, adapter.factors(module, kind)))
            if entry.base_bias_key is not None:
                tensor = tied.bias if is_tied_head and tied.bias is not None else to_base(f"{module}.bias")
                shape = adapter.weights.info(entry.base_bias_key).shape
                _require(ckpt, adapter, tensor, f"a base_layer.bias for module {module}", shape, tied)
                add(tensor, WeightKind.OTHER, ReplaceStep(k, entry.base_bias_key))
        for name, key in adapter.saved.items():
            tensor = to_base(_unwrapped(name))
            _require(ckpt, adapter, tensor, f"modules_to_save param {name}", adapter.weights.info(key).shape, tied)
            if name != _unwrapped(name):
                if is_base:
                    _check_layer_copy(ckpt, adapter, tensor, key)
            else:
                add(tensor, WeightKind.OTHER, ReplaceStep(k, key))

    for job in jobs.values():
        replacing = [s for s in job.steps if isinstance(s, ReplaceStep)]
        if replacing and len(job.steps) > 1:
            others = sorted({s.adapter + 1 for s in job.steps if s is not replacing[0]})
            raise InvalidOptionError(
                f"adapter #{replacing[0].adapter + 1} replaces this tensor and adapter(s) #"
                f"{', #'.join(map(str, others))} also change it; the result would depend on the order: merge them "
                "in separate runs", path=ckpt.path, tensor=job.tensor)
    return MergePlan(jobs, notes)
