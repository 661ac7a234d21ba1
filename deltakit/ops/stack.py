"""``stack``: combine several LoRA adapters into one, ΔW = Σ_k w_k · s_k · B_k A_k per module.

Two ways (DESIGN.md §5), both from the factors, never from a dense ΔW:

- exact: concatenate. A = [A_1; A_2; ...] (R, in), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (out, R) with R = Σ r_k,
  so B @ A = Σ_k w_k s_k B_k A_k. Weights and each adapter's scaling (its own r, alpha, rsLoRA) are folded into
  B, and the module's ``lora_alpha`` becomes its new rank: scaling 1.
- truncated to rank r (or the smallest rank holding an energy fraction): with B = Q_b R_b and Aᵀ = Q_a R_a
  (thin QR), B @ A = Q_b (R_b R_aᵀ) Q_aᵀ; the SVD of the small core R_b R_aᵀ = U S Vᵀ gives the SVD of the sum,
  Q_b U · S · (Q_a V)ᵀ, since Q_b U and Q_a V have orthonormal columns. Keeping the r largest triplets is
  therefore the truncated SVD of Σ_k w_k ΔW_k: optimal for that rank (Eckart–Young), at the cost of QRs of
  (out, R) and (in, R) matrices and an SVD of an R×R one. The small math runs in fp64.

Modules present in only some adapters take the factors of those. Tensors an adapter carries exactly
(``modules_to_save`` params, ``base_layer.bias``) are carried into the stack when only one adapter has them,
or when every adapter that has them holds the same values, and only with weight 1 (a replaced value cannot be
scaled inside an adapter; with the base, T_base + Σ w_k (T_k − T_base)); anything else is refused. A module one
adapter carries whole and others have factors for is carried whole, their weighted ΔW added to it. DoRA adapters
are refused: DoRA rescales each row of W0 + ΔW, which is not linear in ΔW, so no sum of DoRA adapters is a DoRA
adapter of the same base.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from deltakit.adapters.peft_format import (
    WEIGHTS_FILE,
    Adapter,
    CarriedTensor,
    ModuleFactors,
    adapter_spec,
    check_supported,
    parse_weights,
    read_adapter,
    write_adapter,
)
from deltakit.adapters.variants import LORA, variant_of
from deltakit.errors import InvalidOptionError, TensorMismatchError, TensorMissingError, shorten
from deltakit.io.checkpoint import Checkpoint, open_checkpoint, refuse_unsupported_weights
from deltakit.io.dtypes import DTYPES
from deltakit.names import ModuleName, PeftKey, TensorName
from deltakit.adapters.layers import WeightKind, from_out_in, parse_peft_key
from deltakit.adapters.moe import conform_experts, moe_family_by_names
from deltakit.math.lowrank import balanced_factors
from deltakit.math.ranks import EnergyRank, FixedRank, rank_for_energy
from deltakit.ops.report import command_line, format_bytes
from deltakit.io.writer import staged_output, write_json

REPORT_FILE = "stack_report.json"


@dataclass
class StackedModule:
    module: ModuleName
    sources: list[int]  # adapter numbers (from 1) that have factors for this module
    rank_in: int  # Σ of their ranks
    rank: int  # rank written
    energy_retained: float  # ‖kept‖² / ‖Σ w_k ΔW_k‖² (1 with exact)
    relative_error: float  # ‖Σ w_k ΔW_k − B @ A‖ / ‖Σ w_k ΔW_k‖ (0 with exact)


@dataclass
class StackReport:
    adapters: list[str]
    weights: list[float]
    out: str
    method: str  # "exact", "rank 32" or "energy 0.9"
    modules: list[StackedModule] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)  # PEFT keys carried exactly
    adapter_bytes: int = 0
    seconds: float = 0.0
    command: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """The human summary the CLI prints."""
        ranks = sorted({m.rank for m in self.modules})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (per module)" if ranks else "–"
        worst = max(self.modules, key=lambda m: m.relative_error, default=None)
        lines = [f"wrote {self.out}"]
        lines += [f"  adapter #{i + 1}         : {a} (weight {w:g})"
                  for i, (a, w) in enumerate(zip(self.adapters, self.weights))]
        lines += [
            f"  method             : {self.method}",
            f"  modules            : {len(self.modules)}  rank {rank_text}",
        ]
        if worst is not None and self.method != "exact":
            lines.append(f"  relative error     : worst {worst.relative_error:.4f} ({worst.module})")
        lines += [
            f"  tensors carried    : {len(self.carried)}",
            f"  adapter size       : {format_bytes(self.adapter_bytes)}",
            f"  wall time          : {self.seconds:.1f} s",
        ]
        return lines


def _check_modes(rank: int | None, exact: bool, energy: float | None) -> str:
    chosen = [name for name, on in (("--exact", exact), ("--rank", rank is not None), ("--energy", energy is not None))
              if on]
    if len(chosen) != 1:
        raise InvalidOptionError("choose exactly one of --exact, --rank or --energy "
                                 f"(got {', '.join(chosen) or 'none'})")
    if rank is not None:
        FixedRank(rank)  # validates
        return f"rank {rank}"
    if energy is not None:
        EnergyRank(energy, 1)  # validates
        return f"energy {energy:g}"
    return "exact"


def _module_kind(adapter: Adapter, module: ModuleName) -> WeightKind:
    # Without a base at hand, the adapter's own flag says Conv1D (PEFT corrects it per layer class on load).
    if adapter.modules[module].is_embedding:
        return WeightKind.EMBEDDING
    return WeightKind.CONV1D if adapter.is_conv1d(module) else WeightKind.LINEAR


def _gather(adapters: list[Adapter], weights: list[float]) -> dict[ModuleName, list[tuple[int, ModuleFactors, float]]]:
    """Per module, in first-appearance order: (adapter position, factors, weight · scaling) of each adapter."""
    parts: dict[ModuleName, list[tuple[int, ModuleFactors, float]]] = {}
    for k, adapter in enumerate(adapters):
        for module, entry in adapter.modules.items():
            if entry.key_a is None:
                continue
            factors = adapter.factors(module, _module_kind(adapter, module))
            if factors.a.dim() != 2:
                raise InvalidOptionError(f"module {module}: only 2-D (Linear, Conv1D, Embedding) LoRA can be stacked",
                                         path=adapter.path / WEIGHTS_FILE)
            parts.setdefault(module, []).append((k, factors, weights[k] * factors.scaling))
    for module, entries in parts.items():
        shapes = {(f.b.shape[0], f.a.shape[1], f.kind) for _, f, _ in entries}
        if len(shapes) > 1:
            seen = [f"#{k + 1}: (out, in) = ({f.b.shape[0]}, {f.a.shape[1]}) {f.kind.value}" for k, f, _ in entries]
            raise TensorMismatchError(f"adapters disagree on this module: {shorten(seen)}; are they for the same base?",
                                      tensor=module)
    return parts


def _concatenated(entries: list[tuple[int, ModuleFactors, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([f.a.double() for _, f, _ in entries])  # (R, in)
    b = torch.cat([f.b.double() * scale for _, f, scale in entries], dim=1)  # (out, R)
    return a, b


def _truncated(a: torch.Tensor, b: torch.Tensor, rank: int | None,
               energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-k factors of b @ a from a QR of each factor and an SVD of the small core.

    Returns:
        (a_k (k, in), b_k (out, k), energy retained, relative error), k = rank (at most the core's size) or the
        smallest rank holding ``energy`` of ‖b @ a‖².
    """
    q_b, r_b = torch.linalg.qr(b)  # (out, p), (p, R)
    q_a, r_a = torch.linalg.qr(a.T)  # (in, q), (q, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # the core (p, q)
    total = float(s.square().sum())
    keep = min(rank, len(s)) if rank is not None else rank_for_energy(s, total, energy)
    keep = max(keep, 1)
    b_k, a_k = balanced_factors(q_b @ u[:, :keep], s[:keep], vh[:keep] @ q_a.T)  # (out, k), (k, in)
    kept = float(s[:keep].square().sum())
    retained = kept / total if total > 0 else 1.0
    tail = float(s[keep:].square().sum())
    return a_k, b_k, retained, (tail / total) ** 0.5 if total > 0 else 0.0


# How to get out of a weighted stack of adapters that carry tensors exactly.
_WAYS_OUT = ("pass --base BASE (carried tensors become BASE + Σ w·(T − BASE)), or extract the adapters with "
             "extract --no-carry")


def _carried(adapters: list[Adapter], weights: list[float], base: Checkpoint | None) -> list[CarriedTensor]:
    """Tensors carried exactly: each key from the one adapter that has it, or from several that agree. With
    ``base``, a carried tensor T_k is a change T_k − T_base like any delta: the stack holds
    T_base + Σ_k w_k (T_k − T_base), each adapter without the key counting as T_base."""
    holders: dict[PeftKey, list[int]] = {}
    base_names: dict[PeftKey, TensorName] = {}
    for k, adapter in enumerate(adapters):
        for module, entry in adapter.modules.items():
            if entry.base_bias_key is not None:
                holders.setdefault(entry.base_bias_key, []).append(k)
                base_names[entry.base_bias_key] = f"{module}.bias"
        for name, key in adapter.saved.items():
            holders.setdefault(key, []).append(k)
            base_names[key] = name.replace(".base_layer.", ".")
    carried = []
    for key, ks in holders.items():
        info = adapters[ks[0]].weights.info(key)
        # A targeted layer's own weight (PEFT's save_embedding_layers) is a copy of the base, not a change.
        is_layer_copy = key.endswith(".base_layer.weight")
        if base is not None and not is_layer_copy:
            carried.append(CarriedTensor(key, info.dtype, tuple(info.shape), lambda key=key, ks=ks: _interpolated(
                base, base_names[key], [(adapters[k].weights.get(key), weights[k]) for k in ks], info.dtype)))
            continue
        scaled = [k + 1 for k in ks if weights[k] != 1.0]
        if scaled and not is_layer_copy:
            raise InvalidOptionError(f"{key}: adapter #{scaled[0]} carries this tensor exactly, which its weight "
                                     f"cannot scale without the base; {_WAYS_OUT}")
        first = adapters[ks[0]].weights.get(key)
        for k in ks[1:]:
            other = adapters[k].weights.get(key)
            if other.shape != first.shape or not torch.equal(other.to(first.dtype), first):
                raise InvalidOptionError(f"{key}: adapters #{ks[0] + 1} and #{k + 1} carry different values, which "
                                         f"only the base can combine; {_WAYS_OUT}")
        carried.append(CarriedTensor(key, info.dtype, tuple(info.shape),
                                     lambda a=adapters[ks[0]], key=key: a.weights.get(key)))
    if base is not None:
        missing = [base_names[key] for key in holders if not key.endswith(".base_layer.weight")
                   and base_names[key] not in base]
        if missing:
            raise TensorMissingError(f"{len(missing)} carried tensor(s) not in the base: {shorten(missing)}; is "
                                     "this the adapters' base?", path=base.path, tensor=missing[0])
        for key in holders:
            name = base_names[key]
            if name in base and tuple(base.info(name).shape) != tuple(adapters[holders[key][0]].weights.info(key).shape):
                raise TensorMismatchError(f"shape {list(base.info(name).shape)} in the base, "
                                          f"{list(adapters[holders[key][0]].weights.info(key).shape)} in {key}",
                                          path=base.path, tensor=name)
    return carried


def _with_deltas(carried: list[CarriedTensor],
                 added: dict[ModuleName, list[tuple[int, ModuleFactors, float]]]) -> list[CarriedTensor]:
    """The carried weights of the modules in ``added`` with those factors' weighted ΔW added, as stored."""
    result = []
    for tensor in carried:
        module, role = parse_peft_key(tensor.key)
        if role == "saved:weight" and module in added:
            tensor = replace(tensor, load=lambda t=tensor, entries=added[module]: _plus_deltas(t.load(), entries))
        result.append(tensor)
    return result


def _plus_deltas(weight: torch.Tensor, entries: list[tuple[int, ModuleFactors, float]]) -> torch.Tensor:
    total = weight.double()
    for _, factors, scale in entries:
        total += from_out_in(scale * (factors.b.double() @ factors.a.double()), factors.kind)
    return total.to(weight.dtype)


def _interpolated(base: Checkpoint, name: TensorName, values: list[tuple[torch.Tensor, float]],
                  dtype: torch.dtype) -> torch.Tensor:
    base_value = base.get(name).float()
    result = base_value.clone()
    for value, weight in values:
        result.add_(value.float() - base_value, alpha=weight)
    return result.to(dtype)


def stack(
    adapters: list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    rank: int | None = None,
    exact: bool = False,
    energy: float | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> StackReport:
    """Combine LoRA adapters into one PEFT adapter whose ΔW is Σ_k w_k ΔW_k, from the factors alone.

    Args:
        adapters: PEFT LoRA adapter directories (mixed ranks, alphas and rsLoRA are fine: each module's own
            scaling is folded in).
        out: the adapter directory to write.
        weights: one weight per adapter (default 1.0 each).
        rank: re-truncate every module to this rank (the optimal one: the truncated SVD of the sum).
        exact: concatenate the factors instead (each module's rank is the sum of its ranks; nothing is lost).
        energy: re-truncate each module to the smallest rank keeping this fraction of ‖Σ w_k ΔW_k‖².
        base: the adapters' base checkpoint; needed (and only read) when carried tensors (``modules_to_save``,
            ``base_layer.bias``) are weighted or differ: each becomes T_base + Σ_k w_k (T_k − T_base).
        overwrite: replace ``out`` if it exists.

    Exactly one of ``rank``, ``exact`` and ``energy`` must be given. Every module gets ``lora_alpha`` = its
    rank (scaling 1); per-module ranks go to ``rank_pattern``/``alpha_pattern``. Factors are stored in the
    adapters' float dtype if they share one, else fp32 (8-bit factors of compact adapters are stored in fp32).

    Returns:
        The :class:`StackReport` (also written as ``stack_report.json``).

    Raises:
        InvalidOptionError: no or several modes, bad weights, DoRA adapters, or carried tensors that conflict or
            are weighted.
        TensorMismatchError: adapters disagree on a module's shape or kind.
        AdapterFormatError: an adapter is malformed or uses a PEFT feature deltakit cannot combine.
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
    """
    started = time.perf_counter()
    method = _check_modes(rank, exact, energy)
    weights = parse_weights(weights, len(adapters))
    opened = [read_adapter(a) for a in adapters]
    base_ckpt = open_checkpoint(base) if base is not None else None
    if base_ckpt is not None:
        refuse_unsupported_weights(base_ckpt)
    for adapter in opened:
        check_supported(adapter)
        if (refusal := variant_of(adapter).stack_refusal) is not None:
            raise InvalidOptionError(f"adapter {adapter.path} {refusal}")
    flags = {a.fan_in_fan_out for a in opened if any(e.key_a for e in a.modules.values())}
    if len(flags) > 1:
        raise InvalidOptionError("the adapters disagree on fan_in_fan_out (Conv1D vs Linear layers); are they for "
                                 "the same base?")

    parts = _gather(opened, weights)
    # A module that one adapter carries whole (modules_to_save) and others have factors for stays whole, with
    # their ΔW added to it: PEFT cannot hold both for one module.
    saved = {name for adapter in opened for name in adapter.saved}
    added = {module: parts.pop(module) for module in list(parts) if f"{module}.weight" in saved}
    dtypes = {f.a.dtype for entries in parts.values() for _, f, _ in entries}
    # 8-bit factors hold codes whose scales differ per adapter and module: the stack is stored in float.
    dtype = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES.values() else torch.float32
    report = StackReport([str(a) for a in adapters], weights, str(out), method, command=command_line())
    stacked: list[ModuleFactors] = []
    for module, entries in parts.items():
        a, b = _concatenated(entries)
        kind = entries[0][1].kind
        retained, error = 1.0, 0.0
        if not exact:
            a, b, retained, error = _truncated(a, b, rank, energy)
        new_rank = a.shape[0]
        stacked.append(ModuleFactors(module, kind, a.to(dtype), b.to(dtype), alpha=float(new_rank), scaling=1.0))
        report.modules.append(StackedModule(module, [k + 1 for k, _, _ in entries], sum(f.rank for _, f, _ in entries),
                                            new_rank, retained, error))
    carried = _with_deltas(_carried(opened, weights, base_ckpt), added)
    report.carried = [c.key for c in carried]

    modules_to_save: list[str] = []
    for adapter in opened:
        for entry in adapter.config.get("modules_to_save") or []:
            if entry not in modules_to_save and adapter.saved:
                modules_to_save.append(entry)
    first = opened[0].config
    # Experts and routers need one rank for all, the config's (adapters/moe.py); every expert is already there.
    experts = conform_experts(stacked, {}, moe_family_by_names(parts), None, False)
    if experts is not None:
        stacked = experts.factors
    spec = adapter_spec(
        stacked, carried, default_rank=1, rank=experts.rank if experts else None,
        variant_config=LORA.config(),
        base_model_name_or_path=first.get("base_model_name_or_path"),
        task_type=first.get("task_type"),
        modules_to_save=modules_to_save,
        ensure_weight_tying=any(a.config.get("ensure_weight_tying", False) for a in opened),
    )
    inputs = [a.path for a in opened] + ([base_ckpt.path] if base_ckpt is not None else [])
    with staged_output(Path(out), overwrite=overwrite, inputs=inputs) as staging_dir:
        report.adapter_bytes = write_adapter(staging_dir, stacked, carried, spec)
        report.seconds = time.perf_counter() - started
        write_json(staging_dir / REPORT_FILE, report.to_json())
    return report
