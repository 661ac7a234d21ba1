"""``extract``: a fully fine-tuned checkpoint and its base → a PEFT LoRA adapter.

Streams one module at a time: read the two weights, form ΔW in fp32 on the math device, truncate it with SVD,
keep the small factors, drop everything else. Peak memory is a few copies of the largest tensor plus the
factors, whatever the model size.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from deltakit.adapters.peft_format import (
    AdapterSpec,
    CarriedTensor,
    ModuleFactors,
    encode_factors,
    loading_caveat,
    lora_scaling,
    task_type_for,
    write_adapter,
)
from deltakit.io.checkpoint import Checkpoint, open_checkpoint
from deltakit.io.dtypes import DTYPES
from deltakit.errors import InvalidOptionError, NonFiniteError, NothingToExtractError
from deltakit.math.dora import apply_dora, fit_magnitude, projection_scales
from deltakit.math.factorize import SvdMethod, TruncatedSVD, resolve_device, truncated_svd
from deltakit.math.quantize import FactorCodec, FloatFactors, factor_codec
from deltakit.adapters.layers import (
    TiedHead,
    WeightKind,
    base_bias_key,
    out_in_shape,
    saved_module_key,
    target_modules,
    to_out_in,
    transpose_embedding_factors,
)
from deltakit.names import split_tensor_name
from deltakit.ops.plan import ExtractPlan, ModulePlan, plan_extract
from deltakit.math.ranks import (
    BudgetRanks,
    EnergyRank,
    FixedRank,
    ModuleSpectrum,
    NoiseFloorRank,
    PatternRanks,
    RankPolicy,
    Weighting,
    adapter_params,
    budget_for_avg_rank,
    parse_budget,
    predicted_squared_error,
)
from deltakit.ops.report import ExtractReport, ModuleReport, TensorFate, command_line, model_card
from deltakit.math.values import all_finite, check_finite, same_values
from deltakit.io.writer import save_tensors, staged_output, write_json, write_text

REPORT_FILE = "extract_report.json"
_SPILL_DIR = ".svd-spill"  # inside the staging directory, removed before it is renamed into place
# DoRA's projected fit is tried where per-row rescaling of the base explains ≥ 10% of ‖ΔW‖² (see _fit_dora).
_PROJECTED_FIT_GAIN = 0.9


@dataclass(frozen=True)
class SvdOptions:
    method: SvdMethod = "auto"
    oversample: int | None = None  # None: factorize.py's tuned default
    niter: int | None = None
    seed: int = 0

    def run(self, matrix: torch.Tensor, rank: int, device: torch.device) -> TruncatedSVD:
        extra = {k: v for k, v in (("oversample", self.oversample), ("niter", self.niter)) if v is not None}
        return truncated_svd(matrix, rank, method=self.method, seed=self.seed, device=device, **extra)


@dataclass(frozen=True)
class BudgetRequest:
    """A budget as asked for (``--budget`` text or ``--avg-rank``); its size in parameters is known only once
    the changed modules are (a percentage needs the model size, an average rank the modules' shapes)."""

    budget: str | None
    avg_rank: float | None
    min_rank: int
    max_rank: int
    weighting: Weighting

    def compute_rank(self, module: str, out_in: tuple[int, int]) -> int:
        return self.max_rank  # phase 1 computes this many triplets; the allocation picks from them

    def params(self, model_params: int, bytes_per_param: int, out_ins: list[tuple[int, int]],
               carried_bytes: int) -> int:
        if self.avg_rank is not None:
            return budget_for_avg_rank(self.avg_rank, out_ins)
        return parse_budget(self.budget, model_params=model_params, bytes_per_param=bytes_per_param,
                            carried_bytes=carried_bytes)

    def describe(self) -> str:
        return f"--avg-rank {self.avg_rank:g}" if self.avg_rank is not None else f"--budget {self.budget}"


def rank_policy(
    rank: int | Literal["auto"], energy: float | None, max_rank: int | None,
    rank_pattern: list[tuple[str, int]] | None, *, budget: str | None = None, avg_rank: float | None = None,
    min_rank: int | None = None, budget_weighting: Weighting = "absolute",
) -> RankPolicy | BudgetRequest:
    """The policy the extract options describe: a fixed rank, ``auto`` (noise floor), an energy target, or a
    global budget; the last three capped at ``max_rank``. Pattern overrides apply on top of all but a budget."""
    given = [name for name, present in (("--energy", energy is not None), ("--budget", budget is not None),
                                        ("--avg-rank", avg_rank is not None), ("--rank auto", rank == "auto"))
             if present]
    if len(given) > 1:
        raise InvalidOptionError(f"{' and '.join(given)} each choose the ranks; give only one")
    cap = max_rank if max_rank is not None else 256
    if budget is not None or avg_rank is not None:
        if rank_pattern:
            raise InvalidOptionError(f"{given[0]} allocates every module's rank; it cannot be combined with "
                                     "--rank-pattern (use --include/--exclude, --min-rank, --max-rank)")
        request = BudgetRequest(budget, avg_rank, min_rank or 1, cap, budget_weighting)
        BudgetRanks(1, request.min_rank, request.max_rank, request.weighting)  # checks the bounds now
        return request
    if min_rank is not None:
        raise InvalidOptionError("--min-rank only applies with --budget or --avg-rank")
    if energy is not None:
        policy: RankPolicy = EnergyRank(energy, cap)
    elif rank == "auto":
        policy = NoiseFloorRank(cap)
    elif max_rank is not None:
        raise InvalidOptionError("--max-rank only applies with --energy, --budget, --avg-rank or --rank auto")
    else:
        policy = FixedRank(rank)
    return PatternRanks(tuple(rank_pattern), policy) if rank_pattern else policy


def _lora_factors(
    svd: TruncatedSVD, rank: int, alpha: float | None, use_rslora: bool, module: str, kind: WeightKind,
    codec: FactorCodec, row_scale: torch.Tensor | None = None,
) -> tuple[ModuleFactors, float]:
    """Split the kept singular values evenly between B and A, folding 1/scaling in, so scaling·B@A = ΔW_r
    (times ``row_scale`` per output row, for DoRA's projected fit), stored by ``codec``.

    Returns:
        The stored factors and the error of storing them, ‖ΔW_stored − ΔW_r‖_F."""
    module_alpha = float(alpha if alpha is not None else rank)
    scaling = lora_scaling(module_alpha, rank, use_rslora)
    root = (svd.s[:rank] / scaling).sqrt()
    b = svd.u[:, :rank] * root  # (out, r)
    if row_scale is not None:
        b = b * row_scale.to(b.device)[:, None]
    a = root[:, None] * svd.vh[:rank]  # (r, in)
    return encode_factors(ModuleFactors(module, kind, a, b, module_alpha, scaling), codec)


@dataclass
class _Deferred:
    """A module factorized before its rank is known (under a budget): its SVD spilled to disk, its singular
    values kept for the allocation, its report row to be completed. ``tied_to`` marks a tied head, whose
    factors will be its embedding's, transposed."""

    module: str
    kind: WeightKind
    dtype: torch.dtype
    report: ModuleReport | None
    spill: Path | None = None
    spectrum: ModuleSpectrum | None = None
    method: str = ""
    residual_energy: float | None = None
    tied_to: _Deferred | None = None

    def load(self) -> TruncatedSVD:
        tensors = load_file(self.spill)
        return TruncatedSVD(tensors["u"], tensors["s"], tensors["vh"], self.spectrum.total_energy, self.method,
                            self.residual_energy)


def _transposed_for_head(embedding: ModuleFactors, head: str) -> ModuleFactors:
    a, b = transpose_embedding_factors(embedding.a, embedding.b)
    return ModuleFactors(head, WeightKind.LINEAR, a, b, embedding.alpha, embedding.scaling)


@dataclass(frozen=True)
class _Options:
    policy: RankPolicy | BudgetRequest
    svd: SvdOptions
    device: torch.device
    alpha: float | None
    use_rslora: bool
    dtype: torch.dtype | None  # of the stored factors; None: the base tensor's
    codec: FactorCodec | None  # an 8-bit storage of the factors (--factor-dtype int8, ...), else None
    carry: bool
    dora: bool


class _Extraction:
    """The state of one run: inputs, options, and what has been produced so far."""

    def __init__(self, finetuned: Checkpoint, base: Checkpoint, plan: ExtractPlan, report: ExtractReport,
                 options: _Options) -> None:
        self.finetuned, self.base, self.plan, self.report = finetuned, base, plan, report
        self.policy, self.svd, self.device = options.policy, options.svd, options.device
        self.alpha, self.use_rslora, self.dtype = options.alpha, options.use_rslora, options.dtype
        self.carry, self.dora = options.carry, options.dora
        self.codec = options.codec
        self.factors: list[ModuleFactors | _Deferred] = []
        self.spill_dir: Path | None = None  # under a budget: where phase 1 keeps each module's SVD
        self.carried: list[CarriedTensor] = []
        self.modules_to_save: list[str] = []

    def _codec(self, dtype: torch.dtype) -> FactorCodec:
        return self.codec or FloatFactors(str(dtype).removeprefix("torch."), dtype)

    def _load_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        base_w, ft_w = self.base.get(name), self.finetuned.get(name)
        check_finite(base_w, name, self.base.path)
        check_finite(ft_w, name, self.finetuned.path)
        return base_w, ft_w

    def _is_changed(self, name: str) -> bool:
        return not same_values(*self._load_pair(name))

    def _carry_tensor(self, name: str, key: str, reason: str) -> None:
        info = self.finetuned.info(name)
        self.carried.append(CarriedTensor(key, info.dtype, info.shape, lambda n=name: self.finetuned.get(n)))
        self.report.tensors.append(TensorFate(name, "carried", reason))

    def _factorize(self, plan: ModulePlan, weight: str) -> bool:
        """Factorize the module's weight; False if it did not change."""
        started = time.perf_counter()
        base_w, ft_w = self.base.get(weight), self.finetuned.get(weight)
        if same_values(base_w, ft_w) and all_finite(base_w):
            return False
        # Memory: the stored pair, then base and ΔW in fp32 (and ft for DoRA), never more.
        base_m = to_out_in(base_w.to(self.device, torch.float32), plan.kind)  # (out, in)
        del base_w
        delta = to_out_in(ft_w.to(self.device, torch.float32), plan.kind)
        del ft_w
        ft_m = delta.clone() if self.dora else None
        delta.sub_(base_m)
        if not all_finite(delta):
            self._load_pair(weight)  # names the input holding the NaN/Inf
            raise NonFiniteError("ΔW overflows float32", path=self.finetuned.path, tensor=weight)
        stored_shape = tuple(self.finetuned.info(weight).shape)
        out_in = out_in_shape(stored_shape, plan.kind)
        wanted = self.policy.compute_rank(plan.module, out_in)
        compute_rank = min(wanted, min(out_in))
        # Only a rank the user asked for is worth a note; energy, auto and budget treat theirs as a cap.
        asked = isinstance(self.policy, FixedRank) or isinstance(self.policy, PatternRanks) and (
            self.policy.override(plan.module) is not None or isinstance(self.policy.default, FixedRank))
        note = f"rank {wanted} > min(out, in) = {min(out_in)}: clamped" if asked and wanted > min(out_in) else None
        dtype = self.dtype or self.base.info(weight).dtype
        if self.dora:
            delta_norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
            factors, metrics = self._fit_dora(plan, base_m, ft_m, delta, compute_rank, dtype)
        else:
            del base_m
            svd = self.svd.run(delta, compute_rank, self.device)
            del delta
            delta_norm = math.sqrt(svd.total_energy)
            if isinstance(self.policy, BudgetRequest):
                row = ModuleReport(module=plan.module, kind=plan.kind.value, shape=stored_shape, rank=0,
                                   relative_error=1.0, energy_retained=0.0, delta_norm=delta_norm,
                                   seconds=time.perf_counter() - started, method=svd.method, note=note)
                self.factors.append(self._spill(plan, svd, out_in, dtype, row))
                self.report.modules.append(row)
                return True
            rank = max(1, self.policy.choose(plan.module, svd.s, svd.total_energy, out_in))
            factors, stored_error = _lora_factors(svd, rank, self.alpha, self.use_rslora, plan.module, plan.kind,
                                                  self._codec(dtype))
            metrics = {"relative_error": svd.relative_error(rank), "energy_retained": svd.energy_retained(rank),
                       "method": svd.method,
                       "quantization_error": stored_error / delta_norm if delta_norm > 0 else 0.0}
        self.factors.append(factors)
        self.report.modules.append(ModuleReport(
            module=plan.module, kind=plan.kind.value, shape=stored_shape, rank=factors.rank,
            delta_norm=delta_norm, seconds=time.perf_counter() - started, note=note, **metrics,
        ))
        return True

    def _spill(self, plan: ModulePlan, svd: TruncatedSVD, out_in: tuple[int, int], dtype: torch.dtype,
               row: ModuleReport) -> _Deferred:
        """Phase 1 of a budget: keep the singular values in memory and the vectors on disk, so memory stays
        bounded by one module however many modules there are."""
        path = self.spill_dir / f"{len(self.factors):06d}.safetensors"  # the slot this module will fill
        save_tensors(path, {"u": svd.u.cpu().contiguous(), "s": svd.s.cpu(), "vh": svd.vh.cpu().contiguous()})
        spectrum = ModuleSpectrum(plan.module, out_in, svd.s.cpu(), svd.total_energy)
        return _Deferred(plan.module, plan.kind, dtype, row, path, spectrum, svd.method, svd.residual_energy)

    def allocate_budget(self, model_params: int, bytes_per_param: int) -> dict:
        """Phase 2 of a budget: choose every module's rank from the spilled spectra at once, then cut each
        module's factors from its stored SVD (no second SVD). Returns the budget's part of the report."""
        request: BudgetRequest = self.policy
        pending = [f for f in self.factors if isinstance(f, _Deferred) and f.tied_to is None]
        spectra = [d.spectrum for d in pending]
        carried_bytes = sum(math.prod(c.shape) * c.dtype.itemsize for c in self.carried)
        params = request.params(model_params, bytes_per_param, [s.out_in for s in spectra], carried_bytes)
        allocator = BudgetRanks(params, request.min_rank, request.max_rank, request.weighting)
        ranks = allocator.allocate(spectra) if spectra else []
        built: dict[int, ModuleFactors] = {}
        for deferred, rank in zip(pending, ranks):
            started = time.perf_counter()
            svd = deferred.load()
            built[id(deferred)], stored_error = _lora_factors(svd, rank, self.alpha, self.use_rslora, deferred.module,
                                                              deferred.kind, self._codec(deferred.dtype))
            row = deferred.report
            row.rank, row.relative_error, row.energy_retained = rank, svd.relative_error(rank), svd.energy_retained(rank)
            row.quantization_error = stored_error / row.delta_norm if row.delta_norm > 0 else 0.0
            row.seconds += time.perf_counter() - started
        for i, entry in enumerate(self.factors):
            if isinstance(entry, _Deferred):
                if entry.tied_to is None:
                    self.factors[i] = built[id(entry)]
                else:
                    self.factors[i] = _transposed_for_head(built[id(entry.tied_to)], entry.module)
        total = sum(s.total_energy for s in spectra)
        predicted = predicted_squared_error(spectra, ranks)
        return {
            "requested": request.describe(),
            "params": params,
            "params_used": adapter_params(ranks, [s.out_in for s in spectra]),
            "bytes_per_param": bytes_per_param,
            "carried_bytes": carried_bytes,
            "weighting": request.weighting,
            "min_rank": request.min_rank,
            "max_rank": request.max_rank,
            "predicted_relative_error": (predicted / total) ** 0.5 if total > 0 else 0.0,
        }

    def _fit_dora(self, plan: ModulePlan, base_m: torch.Tensor, ft_m: torch.Tensor, delta: torch.Tensor,
                  compute_rank: int, dtype: torch.dtype) -> tuple[ModuleFactors, dict]:
        """DoRA's fits (dora.py), the better one kept. The plain fit's SVD also gives plain LoRA's error at the
        same rank and at rank + 1 (at least DoRA's parameter count: r(out+in) + out ≤ (r+1)(out+in)).

        The projected fit costs a second SVD, so it is tried only where rescaling base rows explains a real
        part of ΔW (‖M‖² < 0.9·‖ΔW‖²); elsewhere both fits approximate nearly the same matrix."""
        total = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
        scales = projection_scales(base_m, ft_m)
        residual = ft_m - scales[:, None] * base_m  # M
        fits: list[tuple[TruncatedSVD, torch.Tensor | None]] = []
        if float(torch.linalg.vector_norm(residual, dtype=torch.float64)) ** 2 < _PROJECTED_FIT_GAIN * total:
            fits.append((self.svd.run(residual, compute_rank, self.device), 1.0 / scales))
        del residual
        plain = self.svd.run(delta, min(compute_rank + 1, min(delta.shape)), self.device)
        fits.append((plain, None))
        rank = max(1, self.policy.choose(plan.module, fits[0][0].s, fits[0][0].total_energy, delta.shape))
        rank = min(rank, len(plain.s))
        best: tuple[float, ModuleFactors, str] | None = None
        for svd, row_scale in fits:
            factors, _ = _lora_factors(svd, rank, self.alpha, self.use_rslora, plan.module, plan.kind,
                                       self._codec(dtype), row_scale)
            lora_delta = factors.delta().to(self.device)  # from the stored (rounded) factors: what PEFT will see
            factors.magnitude = fit_magnitude(base_m + lora_delta, ft_m).to(dtype)
            merged, _ = apply_dora(base_m, lora_delta, factors.magnitude.to(self.device))
            error = float(torch.linalg.vector_norm(ft_m - merged, dtype=torch.float64)) ** 2
            if best is None or error < best[0]:
                best = (error, factors, "projected" if row_scale is not None else "plain")
        error, factors, fit = best
        relative = (error / total) ** 0.5 if total > 0 else 0.0
        return factors, {
            "relative_error": relative,
            "energy_retained": max(0.0, 1.0 - relative**2),
            "method": f"{plain.method}, {fit} fit",
            "lora_relative_error": plain.relative_error(rank),
            "lora_relative_error_same_params": plain.relative_error(min(rank + 1, len(plain.s))),
        }

    def _tied_head_factors(self, embedding: ModuleFactors | _Deferred, tied: TiedHead) -> None:
        """The tied head sees the embedding's delta too: store the same factors, transposed, as its Linear LoRA
        (PEFT's ensure_weight_tying shares them for an ``lm_head``; other heads get their own copy)."""
        if isinstance(embedding, _Deferred):
            self.factors.append(_Deferred(tied.head, WeightKind.LINEAR, embedding.dtype, None, tied_to=embedding))
        else:
            self.factors.append(_transposed_for_head(embedding, tied.head))
        self.report.notes.append(f"{tied.head} is tied to {tied.embedding}: the embedding's factors are stored "
                                 f"for it too, transposed")

    def run_tied_bias(self) -> None:
        """The tied head's bias lives under another module's name (BERT's cls.predictions.bias)."""
        tied = self.plan.tied
        if tied is None or tied.bias is None or not self._is_changed(tied.bias):
            self.report.unchanged += int(tied is not None and tied.bias is not None)
            return
        if not self.carry:
            self.report.tensors.append(TensorFate(tied.bias, "dropped", "changed and not factorizable; --no-carry"))
        elif any(f.module == tied.head for f in self.factors):
            self._carry_tensor(tied.bias, base_bias_key(tied.head), f"bias of the tied head {tied.head}")
        else:
            self.report.tensors.append(TensorFate(tied.bias, "dropped", (
                f"the bias of the tied head {tied.head}, which is not factorized; PEFT can only carry it as "
                "the base_layer bias of a targeted head")))

    def run_module(self, plan: ModulePlan) -> None:
        """Decide and do what becomes of one module: factorized, carried whole, partly carried, or dropped."""
        factorized = False
        compared = set(plan.new_in_finetuned) | set(plan.resized)
        tied = self.plan.tied if self.plan.tied and self.plan.tied.embedding == plan.module else None
        if tied is not None and self.dora and plan.weight is not None:
            self.report.tensors.append(TensorFate(plan.weight, "dropped", (
                f"input embedding tied to {tied.head}: PEFT cannot tie DoRA magnitudes across the two; "
                "extract without --dora to keep it")))
            compared.add(plan.weight)
        elif plan.weight is not None and plan.is_selected:
            factorized = self._factorize(plan, plan.weight)
            compared.add(plan.weight)
            if factorized and tied is not None:
                self._tied_head_factors(self.factors[-1], tied)
        changed = [n for n in plan.tensors if n not in compared and self._is_changed(n)]
        changed += plan.new_in_finetuned + list(plan.resized)
        if not changed:
            self.report.unchanged += len(plan.tensors) - (1 if factorized else 0)
            return
        self.report.unchanged += len(plan.tensors) - (1 if factorized else 0) - len(changed)
        if not plan.is_selected:
            for n in changed:
                self.report.tensors.append(TensorFate(n, "dropped", "changed, but excluded by --include/--exclude"))
            return
        if not self.carry:
            for n in changed:
                self.report.tensors.append(TensorFate(n, "dropped", "changed and not factorizable; --no-carry"))
            return
        if factorized and changed == [plan.bias]:
            # PEFT's bias="lora_only" loads a targeted module's bias from `<module>.base_layer.bias`.
            self._carry_tensor(plan.bias, base_bias_key(plan.module), "bias of a factorized module")
            return
        if factorized:
            # A factorized module with other changed params cannot also be a modules_to_save module.
            for n in changed:
                self.report.tensors.append(TensorFate(
                    n, "dropped", "changed param of a factorized module that PEFT cannot carry"))
            return
        if not plan.module or plan.module in self.plan.parents:
            for n in changed:
                self.report.tensors.append(TensorFate(n, "dropped", (
                    "a parameter of a module with submodules; PEFT's modules_to_save would replace the whole subtree"
                    if plan.module else "a top-level parameter; PEFT's modules_to_save needs a module")))
            return
        # modules_to_save replaces the whole module, so every param of it is stored, changed or not.
        self.modules_to_save.append(plan.module)
        for n in plan.tensors:
            reason = "modules_to_save"
            if n in plan.resized:
                before, after = plan.resized[n]
                reason += f"; vocabulary resized {before[0]} → {after[0]}: call resize_token_embeddings({after[0]}) on the base before loading"
                self.report.notes.append(f"{n}: resized {list(before)} → {list(after)}; resize the base model's "
                                         "token embeddings before loading this adapter")
            elif n in plan.new_in_finetuned:
                reason += "; not in the base"
            self._carry_tensor(n, saved_module_key(n), reason)


def _factor_bytes_per_param(dtype: str | None, codec: FactorCodec | None, plan: ExtractPlan,
                            base: Checkpoint) -> int:
    """Bytes per stored factor element: the --factor-dtype or --dtype asked for, else the commonest dtype of the
    weights."""
    if codec is not None:
        return codec.itemsize
    if dtype is not None:
        return DTYPES[dtype].itemsize
    dtypes = Counter(base.info(p.weight).dtype for p in plan.modules if p.weight is not None and p.weight in base)
    return dtypes.most_common(1)[0][0].itemsize if dtypes else 4


def _input_name(given: str | Path, ckpt: Checkpoint) -> str:
    """How the report and the adapter config name an input: the path as given, or the bare Hub repo id."""
    return ckpt.source.repo_id if ckpt.source else str(given)


def extract(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    rank: int | Literal["auto"] = 16,
    alpha: float | None = None,
    use_rslora: bool = False,
    svd: SvdMethod = "auto",
    oversample: int | None = None,
    niter: int | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str | None = None,
    factor_dtype: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    rank_pattern: list[tuple[str, int]] | None = None,
    energy: float | None = None,
    budget: str | None = None,
    avg_rank: float | None = None,
    min_rank: int | None = None,
    max_rank: int | None = None,
    budget_weighting: Weighting = "absolute",
    dora: bool = False,
    carry: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> ExtractReport:
    """Extract a LoRA adapter ΔW ≈ scaling·B@A from a fine-tuned checkpoint and its base.

    Args:
        finetuned, base: checkpoint directories, ``.safetensors`` files, or Hub ids ``org/name[@revision]``.
        out: the adapter directory to create (written to a staging sibling, renamed into place at the end).
        rank: rank of every module unless ``energy``, a budget or ``rank_pattern`` say otherwise; ``"auto"``:
            per module, the singular values above the estimated noise floor (:func:`deltakit.ranks.noise_floor`).
        alpha: ``lora_alpha``; default: each module's rank (scaling 1).
        use_rslora: scaling = alpha/√r instead of alpha/r.
        svd: ``exact``, ``randomized`` or ``auto``; ``oversample``/``niter``/``seed`` tune the randomized route.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:i``: where the SVD runs.
        dtype: dtype of the stored factors (``float32``, ``float16``, ``bfloat16``); default: the base's.
        factor_dtype: how the factors are stored: ``int8`` or ``float8_e4m3fn`` (8 bits per element, one scale
            per factor folded into the module's ``alpha_pattern``: half a bf16 adapter's bytes at the same rank;
            see :mod:`deltakit.math.quantize`), or ``bfloat16``/``float16``/``float32`` (as ``dtype``). A byte
            ``budget`` buys ranks at this width. Not with ``dtype`` or ``dora``.
        include, exclude: regexes (``re.search``) on module names selecting what goes into the adapter.
        rank_pattern: (regex, rank) overrides, matched the way PEFT matches ``rank_pattern`` keys.
        energy: keep the smallest rank holding this fraction of ‖ΔW‖², at most ``max_rank`` (default 256).
        budget: the total size of the factors (``50MB``, ``2%`` of the model, ``3Mparams``; see
            :func:`deltakit.ranks.parse_budget`), allocated across modules to minimise the total squared error
            (:class:`deltakit.ranks.BudgetRanks`). Each module's SVD is computed once, at ``max_rank``, spilled
            to disk, and cut to its allocated rank afterwards.
        avg_rank: a budget equal to the size of a uniform adapter of this rank over the changed modules.
        min_rank, max_rank: bounds of every module's rank under a budget; ``max_rank`` also caps ``energy`` and
            ``rank="auto"``.
        budget_weighting: ``absolute`` (total squared error of ΔW) or ``relative`` (sum of each module's squared
            relative error).
        dora: extract a DoRA adapter (magnitude + low-rank direction, PEFT's ``use_dora``) instead of LoRA.
        carry: store changed tensors that are not factorized (biases, norms, heads) exactly; False drops them
            (each is listed in the report either way).
        overwrite: replace ``out`` if it exists.
        progress: show a progress bar on stderr.

    Returns:
        The :class:`ExtractReport`, also written as ``extract_report.json`` next to the adapter.

    Raises:
        DeltakitError subclasses: missing or corrupt inputs, shape mismatches, non-finite values, nothing changed,
        existing output, bad options. Nothing is left under ``out`` when any error is raised.
    """
    started = time.perf_counter()
    out_dir = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise InvalidOptionError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    codec = factor_codec(factor_dtype) if factor_dtype is not None else None
    if codec is not None and dtype is not None:
        raise InvalidOptionError("--dtype and --factor-dtype both choose how the factors are stored; give one")
    if codec is not None and not codec.is_compact:
        dtype, codec = factor_dtype, None  # a float width is just --dtype
    if codec is not None and dora:
        raise InvalidOptionError(f"--factor-dtype {factor_dtype} with --dora is not supported: DoRA's magnitude "
                                 "is fitted to float factors; use --dtype or a float --factor-dtype")
    policy = rank_policy(rank, energy, max_rank, rank_pattern, budget=budget, avg_rank=avg_rank,
                         min_rank=min_rank, budget_weighting=budget_weighting)
    if dora and isinstance(policy, BudgetRequest):
        raise InvalidOptionError("--budget/--avg-rank with --dora is not supported: DoRA's fit changes the spectrum "
                                 "the allocation needs; use --rank, --energy or --rank auto with --dora")
    math_device = resolve_device(device)
    ft_ckpt, base_ckpt = open_checkpoint(finetuned), open_checkpoint(base)
    plan = plan_extract(ft_ckpt, base_ckpt, include=include, exclude=exclude)
    model_params = sum(math.prod(info.shape) for info in base_ckpt.tensors.values())
    bytes_per_param = _factor_bytes_per_param(dtype, codec, plan, base_ckpt)
    if isinstance(policy, BudgetRequest) and policy.budget is not None:
        parse_budget(policy.budget, model_params=model_params, bytes_per_param=bytes_per_param)  # fail before work

    options = {
        "rank": rank, "alpha": alpha, "use_rslora": use_rslora, "svd": svd, "oversample": oversample,
        "niter": niter, "seed": seed, "device": str(math_device), "dtype": dtype, "factor_dtype": factor_dtype,
        "include": include,
        "exclude": exclude, "rank_pattern": [list(p) for p in rank_pattern or []], "energy": energy,
        "budget": budget, "avg_rank": avg_rank, "min_rank": min_rank, "max_rank": max_rank,
        "budget_weighting": budget_weighting if isinstance(policy, BudgetRequest) else None, "dora": dora,
        "carry": carry,
    }
    report = ExtractReport(
        _input_name(finetuned, ft_ckpt), _input_name(base, base_ckpt), str(out_dir), options, command=command_line(),
        finetuned_revision=ft_ckpt.source.commit_hash if ft_ckpt.source else None,
        base_revision=base_ckpt.source.commit_hash if base_ckpt.source else None)
    if codec is not None and (caveat := loading_caveat(codec.dtype)):
        report.notes.append(caveat)
    for name in plan.only_in_base:
        report.tensors.append(TensorFate(name, "only-in-base", "not in the fine-tuned checkpoint; left as in the base"))
    run = _Extraction(ft_ckpt, base_ckpt, plan, report, _Options(
        policy, SvdOptions(svd, oversample, niter, seed), math_device, alpha, use_rslora,
        DTYPES[dtype] if dtype else None, codec, carry, dora))

    with staged_output(out_dir, overwrite=overwrite, inputs=[ft_ckpt.path, base_ckpt.path]) as staging_dir:
        if isinstance(policy, BudgetRequest):
            run.spill_dir = staging_dir / _SPILL_DIR
            run.spill_dir.mkdir()
        total = sum(ft_ckpt.info(n).nbytes for p in plan.modules for n in p.tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc="extract", disable=not progress,
                  dynamic_ncols=True) as bar:
            for i, module_plan in enumerate(plan.modules):
                run.run_module(module_plan)
                bar.update(sum(ft_ckpt.info(n).nbytes for n in module_plan.tensors))
                bar.set_postfix_str(f"{i + 1}/{len(plan.modules)} modules", refresh=False)
            run.run_tied_bias()
        if isinstance(policy, BudgetRequest):
            report.budget = run.allocate_budget(model_params, bytes_per_param)
            shutil.rmtree(run.spill_dir)
        if not run.factors and not run.carried:
            raise NothingToExtractError(
                "the fine-tuned checkpoint is identical to its base"
                + (" for the selected modules" if include or exclude else ""),
                path=ft_ckpt.path,
            )
        ranks = Counter(f.rank for f in run.factors)
        spec_rank = ranks.most_common(1)[0][0] if ranks else rank if isinstance(rank, int) else 1
        spec = AdapterSpec(
            rank=spec_rank,
            alpha=float(alpha if alpha is not None else spec_rank),
            use_rslora=use_rslora,
            use_dora=dora,
            base_model_name_or_path=report.base,
            revision=report.base_revision,
            task_type=task_type_for((ft_ckpt.config or {}).get("architectures")),
            modules_to_save=run.modules_to_save,
            has_base_biases=any(c.key.endswith(".base_layer.bias") for c in run.carried),
            ensure_weight_tying=plan.tied is not None and plan.tied.head == "lm_head"
            and any(f.module == "lm_head" for f in run.factors),
            target_modules=target_modules([f.module for f in run.factors],
                                          {split_tensor_name(n)[0] for n in base_ckpt.tensors}),
        )
        report.adapter_bytes = write_adapter(staging_dir, run.factors, run.carried, spec)
        report.seconds = time.perf_counter() - started
        write_json(staging_dir / REPORT_FILE, report.to_json())
        write_text(staging_dir / "README.md", model_card(report))
    return report
