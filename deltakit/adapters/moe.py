"""Mixture-of-experts weights, and the one adapter shape PEFT 0.21 and transformers 5 load for them.

Facts (transformers 5.24, peft 0.21.2; README "Mixture-of-experts" has the long form):

- Checkpoints hold one 2-D weight per expert: Mixtral ``<L>.block_sparse_moe.experts.<e>.w1|w2|w3.weight`` and
  router ``<L>.block_sparse_moe.gate.weight``; the Qwen2-MoE family (Qwen3-MoE, OLMoE, DeepSeek-V2/V3, ...)
  ``<L>.mlp.experts.<e>.gate_proj|up_proj|down_proj.weight`` and ``<L>.mlp.gate.weight``. ``save_pretrained``
  writes that layout too.
- In memory transformers 5 fuses them: ``mlp.experts.gate_up_proj`` (E, 2·I, H) and ``mlp.experts.down_proj``
  (E, H, I), and the router is a ``*TopKRouter``, not an ``nn.Linear``. No expert is a module PEFT can target.
- PEFT converts, on every load into such a model, a ``target_modules`` entry named like an expert projection or
  router (``w1``, ``gate_proj``, ``gate``, ... by suffix) into ``target_parameters`` (``gate_up_proj``,
  ``down_proj``, ``gate.weight``): fused LoRA on *every* MoE layer's experts, one rank for all experts. It fuses
  the per-expert factors of an adapter written in the checkpoint's per-expert names (w1 with w3 as a rank-2r
  block diagonal with alpha 2·lora_alpha). So PEFT loads a per-expert adapter exactly when every expert of every
  MoE layer has factors for each fused parameter it targets (zeros where nothing changed), all of rank ``r`` and
  alpha ``lora_alpha`` of the config (``rank_pattern`` cannot reach a fused parameter), and gate and up come
  together. ``target_parameters`` rejects DoRA, and the doubled alpha changes rsLoRA's scaling by √2.
- The same conversion also claims non-expert Linears whose names end like an expert projection (a dense MLP
  layer's or a shared expert's ``gate_proj`` in the Qwen2-MoE family): PEFT cannot load LoRA for those.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from deltakit.adapters.layers import WeightKind
from deltakit.adapters.peft_format import ModuleFactors, lora_scaling
from deltakit.names import ModuleName


@dataclass(frozen=True)
class MoeFamily:
    """How one family of MoE checkpoints names its experts (PEFT's ``_MOE_TARGET_MODULE_MAPPING``)."""

    name: str
    expert: re.Pattern  # groups: block (the MoE layer), expert index, projection
    router: re.Pattern  # group: block
    fused: dict[str, str]  # projection → the fused parameter PEFT targets
    claimed_leaves: frozenset[str]  # leaf names PEFT's conversion takes for expert projections or routers


_MIXTRAL = MoeFamily(
    "mixtral",
    re.compile(r"(?P<block>.+\.block_sparse_moe)\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3)"),
    re.compile(r"(?P<block>.+\.block_sparse_moe)\.gate"),
    {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    frozenset({"w1", "w2", "w3", "gate"}),
)
_QWEN2_MOE = MoeFamily(
    "qwen2_moe",
    re.compile(r"(?P<block>.+\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"),
    re.compile(r"(?P<block>.+\.mlp)\.gate"),
    {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"},
    frozenset({"gate_proj", "up_proj", "down_proj", "gate"}),
)
# model_type → family: transformers 5.24's conversion_mapping._MODEL_TO_CONVERSION_PATTERN entries for the two
# families PEFT 0.21 converts (peft/utils/transformers_weight_conversion.py).
_FAMILIES = {
    **dict.fromkeys(("mixtral", "minimax", "minimax_m2"), _MIXTRAL),
    **dict.fromkeys(("qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "flex_olmo", "deepseek_v2", "deepseek_v3",
                     "deepseek_v32", "dots1", "ernie4_5_moe", "glm4_moe", "glm4_moe_lite", "hunyuan_v1_moe",
                     "longcat_flash", "exaone_moe", "cohere2_moe", "afmoe", "solar_open"), _QWEN2_MOE),
}


@dataclass(frozen=True)
class MoeWeight:
    """Where a module sits in a mixture-of-experts layer: ``target`` is the fused parameter PEFT targets for it
    (``gate_up_proj``, ``down_proj`` or ``gate.weight``), ``expert`` None for a router."""

    block: ModuleName
    target: str
    expert: int | None


def moe_family(model_type: str | None) -> MoeFamily | None:
    return _FAMILIES.get(model_type or "")


def moe_family_by_names(modules: Iterable[ModuleName]) -> MoeFamily | None:
    """The family whose expert names some module has, for an adapter read without its base's config."""
    modules = list(modules)
    return next((f for f in (_MIXTRAL, _QWEN2_MOE) if any(f.expert.fullmatch(m) for m in modules)), None)


def moe_weight(module: ModuleName, family: MoeFamily | None) -> MoeWeight | None:
    """The module's place among experts and routers, or None for any other module."""
    if family is None:
        return None
    if match := family.expert.fullmatch(module):
        return MoeWeight(match["block"], family.fused[match["proj"]], int(match["expert"]))
    if match := family.router.fullmatch(module):
        return MoeWeight(match["block"], "gate.weight", None)
    return None


def is_claimed_by_peft(module: ModuleName, family: MoeFamily | None) -> bool:
    """A Linear that is no expert or router but whose name PEFT's MoE conversion takes for one, so that LoRA on it
    does not load (e.g. a dense layer's ``mlp.gate_proj`` in a Qwen2-MoE-family model)."""
    return (family is not None and moe_weight(module, family) is None
            and module.rpartition(".")[2] in family.claimed_leaves)


@dataclass
class ConformedExperts:
    """The adapter's factors after :func:`conform_experts`, and what it did."""

    factors: list[ModuleFactors]
    rank: int  # the config's r and every expert's and router's rank
    alpha: float  # the config's lora_alpha
    zero_filled: list[ModuleName]  # experts or routers with no change, given zero factors


def conform_experts(factors: list[ModuleFactors], out_in: dict[ModuleName, tuple[int, int]],
                    family: MoeFamily | None, alpha: float | None, use_rslora: bool) -> ConformedExperts | None:
    """Make expert and router factors loadable by PEFT: one rank and alpha for all, every expert of every MoE
    layer present for each fused parameter targeted (zero factors where none were extracted).

    Zero padding is exact: extra rank components with B = 0 add nothing; a module's factors are rescaled by
    √(s_old / s_new) when its scaling changes with the common rank.

    Args:
        factors: the extracted factors, in adapter order.
        out_in: every Linear module of the base with its (out, in), to fill in what was not extracted.
        family: the checkpoint's MoE family.
        alpha: the ``lora_alpha`` asked for; None: the common rank (scaling 1).
        use_rslora: whether scaling is alpha/√r.

    Returns:
        None when no factors belong to experts or routers.
    """
    placed = {f.module: moe_weight(f.module, family) for f in factors}
    moe_factors = [f for f in factors if placed[f.module] is not None]
    if not moe_factors:
        return None
    targets = {placed[f.module].target for f in moe_factors}
    rank = max(f.rank for f in moe_factors)
    common_alpha = float(alpha if alpha is not None else rank)
    scaling = lora_scaling(common_alpha, rank, use_rslora)
    dtype = moe_factors[0].a.dtype
    conformed = [_padded(f, rank, common_alpha, scaling) if placed[f.module] else f for f in factors]
    zero_filled = []
    for module, (out, inp) in out_in.items():
        where = moe_weight(module, family)
        if module not in placed and where is not None and where.target in targets:
            zero_filled.append(module)
            conformed.append(ModuleFactors(module, WeightKind.LINEAR, torch.zeros(rank, inp, dtype=dtype),
                                           torch.zeros(out, rank, dtype=dtype), common_alpha, scaling))
    return ConformedExperts(conformed, rank, common_alpha, zero_filled)


def _padded(f: ModuleFactors, rank: int, alpha: float, scaling: float) -> ModuleFactors:
    factor = (f.scaling / scaling) ** 0.5
    a = torch.zeros(rank, f.a.shape[1], dtype=f.a.dtype)
    b = torch.zeros(f.b.shape[0], rank, dtype=f.b.dtype)
    if factor == 1.0:
        a[: f.rank], b[:, : f.rank] = f.a, f.b
    else:
        a[: f.rank] = (f.a.float() * factor).to(f.a.dtype)
        b[:, : f.rank] = (f.b.float() * factor).to(f.b.dtype)
    return ModuleFactors(f.module, f.kind, a, b, alpha, scaling, f.magnitude)


def expert_summary(changed: Iterable[tuple[ModuleName, float]], all_modules: Iterable[ModuleName],
                   family: MoeFamily | None) -> list[dict]:
    """Per MoE layer: how many experts, which changed (by index), which did not, and each changed expert's worst
    relative error over its projections.

    Args:
        changed: (module, relative error of its ΔW in the adapter) of every changed module: 1.0 for one that
            changed but is not in the adapter.
        all_modules: every module of the base.
    """
    layers: dict[ModuleName, dict] = {}
    for module in all_modules:
        where = moe_weight(module, family)
        if where is not None and where.expert is not None:
            layers.setdefault(where.block, {"block": where.block, "experts": set(), "errors": {}})
            layers[where.block]["experts"].add(where.expert)
    router_changed = set()
    for module, error in changed:
        where = moe_weight(module, family)
        if where is None or where.block not in layers:
            continue
        if where.expert is None:
            router_changed.add(where.block)
            continue
        errors = layers[where.block]["errors"]
        errors[where.expert] = max(errors.get(where.expert, 0.0), error)
    summary = []
    for block, layer in layers.items():
        errors = layer["errors"]
        summary.append({
            "block": block,
            "experts": len(layer["experts"]),
            "changed": sorted(errors),
            "unchanged": sorted(layer["experts"] - set(errors)),
            "router_changed": block in router_changed,
            "max_relative_error": {str(e): errors[e] for e in sorted(errors)},
        })
    return summary
