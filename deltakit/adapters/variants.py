"""Adapter variants behind one interface, as PEFT has ``LoraVariant``: plain LoRA and DoRA.

A variant says everything the operations need to know about one kind of adapter:

- ``fit``: one module's weights in, factors and error metrics out (extract); ``complete`` finishes a fit whose
  rank a global budget decided later, from the spectrum ``fit`` returned;
- ``block_step``: how its factors change a block of rows of a weight, and how to take that back (merge,
  unmerge), with the per-row ``state`` a merge receipt must keep for the inverse (DoRA's norms);
- ``config``: the keys it writes into ``adapter_config.json``; ``variant_of`` reads them back;
- ``check_module``: the tensors an adapter of this kind must hold per module;
- the reasons it refuses what it cannot do (a budget, a tied head, a stack), as text for the error or report.

Adding a variant is a class here and an entry in ``VARIANTS``; the operations never test a variant by name.
All math is in PEFT's (out, in) orientation, fp32, on the math device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.adapters.layers import WeightKind
from deltakit.adapters.peft_format import Adapter, AdapterModule, ModuleFactors, encode_factors, lora_scaling
from deltakit.errors import AdapterFormatError, NonFiniteError
from deltakit.math.dora import apply_dora, fit_magnitude, projection_scales, rescaling, row_norms, unapply_dora
from deltakit.math.factorize import TruncatedSVD
from deltakit.math.lowrank import SvdOptions, balanced_factors, stored_relative_error
from deltakit.math.quantize import FactorCodec, FloatFactors
from deltakit.math.values import all_finite
from deltakit.names import ModuleName

# DoRA's projected fit is tried where per-row rescaling of the base explains ≥ 10% of ‖ΔW‖² (see DoRA.fit).
_PROJECTED_FIT_GAIN = 0.9


@dataclass(frozen=True)
class FitSettings:
    """What every module's fit shares: scaling, the SVD route and the math device."""

    alpha: float | None  # lora_alpha; None: each module's rank (scaling 1)
    use_rslora: bool
    svd: SvdOptions
    device: torch.device
    codec: FactorCodec | None = None  # 8-bit storage of the factors (--factor-dtype); None: cast to the dtype


@dataclass
class DeltaPair:
    """One module's weights on the math device, fp32, (out, in). A fit owns it and may drop what it no longer
    needs, so that memory stays a few copies of one tensor."""

    base: torch.Tensor | None  # W0, for variants with ``needs_weights``
    delta: torch.Tensor | None  # ΔW = W_ft − W0
    finetuned: torch.Tensor | None = None  # W_ft, for variants with ``needs_weights``
    energy: float | None = None  # ‖ΔW‖_F² (fp64) where already summed; None: the fit sums it


@dataclass
class Fit:
    """What a fit produced: the factors, or (rank left to a budget) the SVD to cut them from later."""

    delta_norm: float  # ‖ΔW‖
    factors: ModuleFactors | None = None
    metrics: dict | None = None  # relative_error, energy_retained, method, and what the variant adds
    pending: TruncatedSVD | None = None


# The module's rank from its singular values and ‖ΔW‖²; None: decided later, from the spectrum (a budget).
ChooseRank = Callable[[torch.Tensor, float], "int | None"]


def factors_from_svd(svd: TruncatedSVD, rank: int, module: ModuleName, kind: WeightKind, dtype: torch.dtype,
                     settings: FitSettings, row_scale: torch.Tensor | None = None) -> tuple[ModuleFactors, float]:
    """The leading ``rank`` triplets as stored factors, 1/scaling folded in, so scaling·B@A = ΔW_r (times
    ``row_scale`` per output row, for DoRA's projected fit), in ``dtype`` or by ``settings.codec``.

    Returns:
        The stored factors, and ‖ΔW_stored − ΔW_r‖_F: the error of storing them."""
    alpha = float(settings.alpha if settings.alpha is not None else rank)
    scaling = lora_scaling(alpha, rank, settings.use_rslora)
    b, a = balanced_factors(svd.u[:, :rank], svd.s[:rank], svd.vh[:rank], scaling)  # (out, r), (r, in)
    if row_scale is not None:
        b = b * row_scale.to(b.device)[:, None]
    factors, storage_error = encode_factors(ModuleFactors(module, kind, a, b, alpha, scaling),
                                            settings.codec or FloatFactors(dtype))
    check_stored(module, factors.b.dtype, factors.a, factors.b)
    return factors, storage_error


def check_stored(module: ModuleName, dtype: torch.dtype, *stored: torch.Tensor) -> None:
    """Raise NonFiniteError if what will be stored overflowed its dtype (fp16 ends at 65504): the check is on the
    values as written, not on the fp32 values before the cast."""
    if not all(all_finite(t) for t in stored):
        raise NonFiniteError(f"its factors exceed the range of {str(dtype).removeprefix('torch.')} (NaN or Inf once "
                             "stored); use --dtype bfloat16 or float32", tensor=module)


class BlockStep:
    """One adapter's change to one weight, applied a block of rows at a time (every variant is row-local).
    ``state``: per-row values a merge produces and its inverse needs (kept in the merge receipt), or None."""

    state: torch.Tensor | None = None
    reads_base = False  # merging needs the block of W0, not only the result of the steps before

    def __init__(self, factors: ModuleFactors, weight: float, device: torch.device) -> None:
        self.scale = weight * factors.scaling
        self.a = factors.a.to(device, torch.float32)  # (r, in)
        self.b = factors.b.to(device, torch.float32)  # (out, r)

    def delta(self, rows: slice) -> torch.Tensor:
        return (self.b[rows] @ self.a).mul_(self.scale)  # (rows, in)

    def merge(self, work: torch.Tensor, base: torch.Tensor, rows: slice) -> torch.Tensor:
        """``work`` (the block so far) with this step applied; ``base`` is the block of W0."""
        return work.addmm_(self.b[rows], self.a, alpha=self.scale)

    def unmerge(self, work: torch.Tensor, rows: slice) -> torch.Tensor:
        return work.addmm_(self.b[rows], self.a, alpha=-self.scale)

    def transposed(self) -> BlockStep | None:
        """The same step on the weight's transpose, or None where it has none. LoRA is element-wise:
        (s·B·A)ᵀ = s·Aᵀ·Bᵀ, a step whose factors are A and B transposed and swapped."""
        step = copy.copy(self)
        step.a, step.b = self.b.T.contiguous(), self.a.T.contiguous()
        return step


class _DoraBlockStep(BlockStep):
    reads_base = True  # the norms are those of W0 + ΔW_k, whatever was merged before (PEFT's merge_and_unload)

    def __init__(self, factors: ModuleFactors, weight: float, device: torch.device,
                 state: torch.Tensor | None) -> None:
        super().__init__(factors, weight, device)
        self.magnitude = factors.magnitude.to(device, torch.float32)  # (out,)
        # Merging fills the row norms in; unmerging reads those the receipt kept.
        self.state = state if state is not None else torch.empty(self.b.shape[0], dtype=torch.float32)

    def merge(self, work: torch.Tensor, base: torch.Tensor, rows: slice) -> torch.Tensor:
        delta = self.delta(rows)
        norms = row_norms(base + delta)
        self.state[rows] = norms.cpu()
        return work.add_(delta).mul_(rescaling(norms, self.magnitude[rows])[:, None])

    def unmerge(self, work: torch.Tensor, rows: slice) -> torch.Tensor:
        return unapply_dora(work, self.delta(rows), self.magnitude[rows], self.state[rows].to(work.device))

    def transposed(self) -> None:
        return None  # each row's norm needs the whole row


class AdapterVariant:
    """Plain LoRA: ΔW = scaling · B @ A, the truncated SVD of ΔW split evenly between B and A."""

    name = "lora"  # the step name in merge reports
    label = "LoRA"
    card_tags: tuple[str, ...] = ("lora",)  # of the model card
    config_flag: str | None = None  # the adapter_config.json key set True for this variant
    needs_weights = False  # the fit needs W0 and W_ft besides ΔW
    has_state = False  # a merge leaves per-row state the receipt must keep (else unmerge works without one)
    # Why this variant cannot do something, or None where it can:
    budget_refusal: str | None = None  # a rank chosen later from ΔW's spectrum (a global budget)
    tied_embedding_refusal: str | None = None  # extract: share an embedding's factors with its tied head
    tied_head_refusal: str | None = None  # merge: the same, read from an adapter
    stack_refusal: str | None = None  # stack: sum with other adapters (``adapter X <refusal>``)
    expert_refusal: str | None = None  # extract: MoE experts and routers, which PEFT targets as fused parameters
    compact_refusal: str | None = None  # extract: 8-bit factors (--factor-dtype int8, float8_e4m3fn)

    def config(self) -> dict[str, bool]:
        """The variant keys of ``adapter_config.json``: each variant's flag, True for this one."""
        return {v.config_flag: v is self for v in VARIANTS if v.config_flag is not None}

    def fit(self, pair: DeltaPair, compute_rank: int, choose: ChooseRank, module: ModuleName, kind: WeightKind,
            dtype: torch.dtype, settings: FitSettings) -> Fit:
        """Factor one module's ΔW; ``compute_rank`` triplets are computed and ``choose`` picks how many stay."""
        delta = pair.delta
        pair.base = pair.delta = None  # neither W0 nor, after the SVD, ΔW is needed any more
        svd = settings.svd.run(delta, compute_rank, settings.device, total_energy=pair.energy)
        del delta
        delta_norm = math.sqrt(svd.total_energy)
        rank = choose(svd.s, svd.total_energy)
        if rank is None:
            return Fit(delta_norm, metrics={"method": svd.method}, pending=svd)
        factors, metrics = self.complete(svd, max(1, rank), module, kind, dtype, settings)
        return Fit(delta_norm, factors, metrics)

    def complete(self, svd: TruncatedSVD, rank: int, module: ModuleName, kind: WeightKind, dtype: torch.dtype,
                 settings: FitSettings) -> tuple[ModuleFactors, dict]:
        """Cut the factors of a rank decided from ``svd``'s spectrum."""
        factors, storage_error = factors_from_svd(svd, rank, module, kind, dtype, settings)
        delta_norm = math.sqrt(svd.total_energy)
        # The error of what is stored: after rounding or 8-bit coding, not of the fp32 triplets (issue 10 item 20);
        # the storage alone beside it (issue 14).
        error = stored_relative_error(svd, rank, factors.b, factors.a, factors.scaling)
        return factors, {"relative_error": error, "energy_retained": max(0.0, 1.0 - error**2), "method": svd.method,
                         "quantization_error": storage_error / delta_norm if delta_norm > 0 else 0.0}

    def check_module(self, adapter: Adapter, entry: AdapterModule, out: int, where: Path) -> None:
        """Raise AdapterFormatError if a module's tensors are not this variant's."""
        if entry.magnitude_key is not None:
            raise AdapterFormatError(f"module {entry.module} has a lora_magnitude_vector but use_dora is false",
                                     path=where)

    def block_step(self, factors: ModuleFactors, weight: float, device: torch.device,
                   state: torch.Tensor | None = None) -> BlockStep:
        """The step that merges (or, given the receipt's ``state``, unmerges) these factors at ``weight``."""
        return BlockStep(factors, weight, device)


class DoraVariant(AdapterVariant):
    """DoRA (PEFT's ``use_dora``): W' = m ⊙ (W0 + s·BA) / ‖W0 + s·BA‖ per row (math/dora.py).

    Two fits per module, the better kept: projected (factorize W_ft − diag(e)·W0) and plain (ΔW, as LoRA);
    the plain fit's SVD also gives plain LoRA's error at the same rank and at rank + 1 (at least DoRA's
    parameter count: r(out+in) + out ≤ (r+1)(out+in)) for the report.
    """

    name = "dora"
    label = "DoRA"
    card_tags = ("lora", "dora")
    config_flag = "use_dora"
    needs_weights = True
    has_state = True
    budget_refusal = ("--budget/--avg-rank with --dora is not supported: DoRA's fit changes the spectrum the "
                      "allocation needs; use --rank, --energy or --rank auto with --dora")
    tied_embedding_refusal = "PEFT cannot tie DoRA magnitudes across the two; extract without --dora to keep it"
    tied_head_refusal = "a DoRA magnitude cannot be shared between the two"
    expert_refusal = "which reject DoRA"
    compact_refusal = ("8-bit --factor-dtype with --dora is not supported: DoRA's magnitude is fitted to float "
                       "factors; use --dtype or a float --factor-dtype with --dora")
    stack_refusal = ("is DoRA: its per-row rescaling of W0 + ΔW is not linear in ΔW, so DoRA adapters cannot be "
                     "stacked; merge them into the base instead")

    def fit(self, pair: DeltaPair, compute_rank: int, choose: ChooseRank, module: ModuleName, kind: WeightKind,
            dtype: torch.dtype, settings: FitSettings) -> Fit:
        """The projected fit costs a second SVD, so it is tried only where rescaling base rows explains a real
        part of ΔW (‖M‖² < 0.9·‖ΔW‖²); elsewhere both fits approximate nearly the same matrix."""
        base_m, ft_m, delta = pair.base, pair.finetuned, pair.delta
        delta_norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
        total = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        scales = projection_scales(base_m, ft_m)
        residual = ft_m - scales[:, None] * base_m  # M
        fits: list[tuple[TruncatedSVD, torch.Tensor | None]] = []
        if float(torch.linalg.vector_norm(residual, dtype=torch.float64)) ** 2 < _PROJECTED_FIT_GAIN * total:
            fits.append((settings.svd.run(residual, compute_rank, settings.device), 1.0 / scales))
        del residual
        plain = settings.svd.run(delta, min(compute_rank + 1, min(delta.shape)), settings.device,
                                 total_energy=pair.energy)
        fits.append((plain, None))
        rank = max(1, choose(fits[0][0].s, fits[0][0].total_energy))
        rank = min(rank, len(plain.s))
        best: tuple[float, ModuleFactors, str] | None = None
        for svd, row_scale in fits:
            factors, _ = factors_from_svd(svd, rank, module, kind, dtype, settings, row_scale)
            lora_delta = factors.delta().to(settings.device)  # from the stored (rounded) factors: what PEFT sees
            factors.magnitude = fit_magnitude(base_m + lora_delta, ft_m).to(dtype)
            check_stored(module, dtype, factors.magnitude)
            merged, _ = apply_dora(base_m, lora_delta, factors.magnitude.to(settings.device))
            error = float(torch.linalg.vector_norm(ft_m - merged, dtype=torch.float64)) ** 2
            if best is None or error < best[0]:
                best = (error, factors, "projected" if row_scale is not None else "plain")
        error, factors, fit = best
        relative = (error / total) ** 0.5 if total > 0 else 0.0
        return Fit(delta_norm, factors, {
            "relative_error": relative,
            "energy_retained": max(0.0, 1.0 - relative**2),
            "method": f"{plain.method}, {fit} fit",
            "lora_relative_error": plain.relative_error(rank),
            "lora_relative_error_same_params": plain.relative_error(min(rank + 1, len(plain.s))),
        })

    def check_module(self, adapter: Adapter, entry: AdapterModule, out: int, where: Path) -> None:
        if entry.magnitude_key is None:
            raise AdapterFormatError(f"module {entry.module} has no lora_magnitude_vector but use_dora is true",
                                     path=where)
        magnitude_shape = adapter.weights.info(entry.magnitude_key).shape
        if tuple(magnitude_shape) != (out,):
            raise AdapterFormatError(f"module {entry.module}: lora_magnitude_vector has shape "
                                     f"{list(magnitude_shape)}, expected [{out}]", path=where)

    def block_step(self, factors: ModuleFactors, weight: float, device: torch.device,
                   state: torch.Tensor | None = None) -> BlockStep:
        return _DoraBlockStep(factors, weight, device, state)


LORA = AdapterVariant()
DORA = DoraVariant()
VARIANTS: tuple[AdapterVariant, ...] = (LORA, DORA)


def variant_of(adapter: Adapter) -> AdapterVariant:
    """The variant an adapter's config names (plain LoRA when it sets no variant's flag)."""
    return next((v for v in VARIANTS if v.config_flag and adapter.config.get(v.config_flag, False)), LORA)
