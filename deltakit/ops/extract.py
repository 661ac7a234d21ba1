"""``extract``: a fully fine-tuned checkpoint and its base → a PEFT LoRA (or DoRA) adapter.

A pipeline: :func:`~deltakit.ops.plan.plan_extract` reads the headers and groups tensors by module, checking
everything the headers can show; then, one module at a time, the two weights are read, ΔW is formed in fp32 on
the math device and the adapter variant fits it (:meth:`~deltakit.adapters.variants.AdapterVariant.fit`, pure:
tensors in, factors and metrics out), and the plan's rules decide what becomes of the module's other tensors
(:func:`~deltakit.ops.plan.module_fates`); at the end the rank policy finishes what it deferred (a budget), the
report is built from the per-module results, and the adapter is written. Peak memory is a few copies of the
largest tensor plus the factors, whatever the model size. With an executor (``--executor ray``) each module's
read and fit runs as a task elsewhere and only its result comes back; everything else stays here, unchanged.
"""

from __future__ import annotations

import math
import platform
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from deltakit.adapters.layers import (
    WeightKind,
    out_in_shape,
    target_modules,
    transpose_embedding_factors,
    weight_kind,
)
from deltakit.adapters.moe import conform_experts, expert_summary, moe_family, moe_weight
from deltakit.adapters.output_aware import OutputAwareLora
from deltakit.adapters.peft_format import (
    CarriedTensor,
    ModuleFactors,
    adapter_file_size,
    adapter_spec,
    factor_tensors,
    is_parameter_target,
    loading_caveat,
    task_type_for,
    write_adapter,
)
from deltakit.adapters.profiles import ExportProfile, Target, export_profile
from deltakit.adapters.variants import DORA, LORA, AdapterVariant, Fit, FitSettings
from deltakit.errors import CheckpointNotFoundError, InvalidOptionError, NothingToExtractError, shorten
from deltakit.io.checkpoint import Checkpoint, open_checkpoint, plan_reads, refuse_unsupported_weights
from deltakit.io.dtypes import DTYPES, parse_dtype
from deltakit.io.prefetch import prefetched
from deltakit.io.writer import save_tensors, staged_output, write_json, write_text
from deltakit.math.factorize import DeltaBuffer, SvdMethod, TruncatedSVD, resolve_device
from deltakit.math.lowrank import SvdOptions
from deltakit.math.norm_fold import NotFoldableError, change_norms, scale_ratio
from deltakit.math.quantize import FactorCodec, factor_codec
from deltakit.defaults import DEFAULT_WEIGHTING
from deltakit.math.ranks import (
    CARRIED_WHOLE,
    DEFAULT_RANK,
    ModelSize,
    ModuleSpectrum,
    RankPolicy,
    Weighting,
    rank_policy,
)
from deltakit.names import ModuleName, TensorName, matches_peft_pattern, split_tensor_name
from deltakit.ops.calibrate import CALIB_SEQ_LEN, CALIB_TOKENS, calibrate, check_calibration
from deltakit.ops.delta import StoredPair, delta_of, is_changed, read_pair
from deltakit.ops.plan import (
    ExtractPlan,
    ModuleFates,
    ModulePlan,
    NormFold,
    module_fates,
    plan_extract,
    plan_norm_folds,
    tied_bias_fates,
)
from deltakit.ops.report import (
    EXTRACT_REPORT_FILE,
    ExtractReport,
    ModuleReport,
    TensorFate,
    command_line,
    model_card,
)

REPORT_FILE = EXTRACT_REPORT_FILE
_SPILL_DIR = ".svd-spill"  # inside the staging directory, removed before it is renamed into place
# Modules read ahead of the one being fitted. Two keep the disk busy through the modules whose SVD outlasts the next
# read (the embedding, the MLP's wide ones): extract -r 16 of a 2 × 2.1 GB pair, page cache dropped, 2 idle cores:
# 10.7 s with one, 9.6 s with two or three (benchmarks/README.md). Each costs that module's stored tensors.
_READ_AHEAD_MODULES = 2
_CALIB_DIR = ".calib-moments"  # likewise: the moments of --calib (and block inputs between its passes), per block


@dataclass
class _Folds:
    """The norms whose scale change goes into the modules reading them (the profile's choice, the plan's check,
    and the values: a changed norm whose base scale can be divided by)."""

    ratios: dict[ModuleName, torch.Tensor] = field(default_factory=dict)  # reader → g'/g of the norm it reads
    folded: dict[TensorName, NormFold] = field(default_factory=dict)  # norm weight → its fold
    unfoldable: dict[TensorName, str] = field(default_factory=dict)  # norm weight → why its change cannot fold


def _read_folds(finetuned: Checkpoint, base: Checkpoint, folds: list[NormFold],
                unfoldable: dict[TensorName, str]) -> _Folds:
    """Each foldable norm's g'/g (two small 1-D reads per norm), for its readers."""
    result = _Folds(unfoldable=dict(unfoldable))
    for fold in folds:
        if not is_changed(read_pair(finetuned, base, fold.weight)):
            continue
        try:
            ratio = scale_ratio(base.get(fold.weight), finetuned.get(fold.weight))
        except NotFoldableError as e:
            result.unfoldable[fold.weight] = str(e)
            continue
        result.ratios.update(dict.fromkeys(fold.readers, ratio))
        result.folded[fold.weight] = fold
    return result


@dataclass(frozen=True)
class _Run:
    """What every module's step shares."""

    finetuned: Checkpoint
    base: Checkpoint
    plan: ExtractPlan
    policy: RankPolicy
    variant: AdapterVariant
    fit: FitSettings
    dtype: torch.dtype | None  # of the stored factors; None: the base tensor's
    carry: bool
    profile: ExportProfile
    folds: _Folds


@dataclass(frozen=True)
class _Spilled:
    """A module's SVD whose rank the policy decides at the end: the singular values in memory, the vectors on
    disk."""

    path: Path
    spectrum: ModuleSpectrum
    method: str
    residual_energy: float | None


@dataclass
class _Factorized:
    """One module's weight, fitted, or (its rank left to the policy's second phase) spilled."""

    module: ModuleName
    kind: WeightKind
    shape: tuple[int, ...]  # as stored
    dtype: torch.dtype
    fit: Fit  # without ``pending`` once spilled
    seconds: float
    note: str | None  # e.g. a clamped rank
    base_norm: float  # ‖W0‖, to tell a fine-tune from an unrelated model
    tied_head: ModuleName | None = None  # a tied output head that gets these factors too, transposed
    spilled: _Spilled | None = None


@dataclass
class _ModuleResult:
    """What became of one module."""

    factorized: _Factorized | None
    fates: ModuleFates
    unchanged: int
    # A factorized module's other choice: its fates carried whole (None where it cannot be, and why), and the
    # bytes that adds to the file beyond what its factors' route carries (its changed bias).
    whole: ModuleFates | None = None
    whole_refusal: str | None = None
    whole_extra_bytes: int = 0
    # (module, rank) where its factors at that rank were larger than its tensors (rank 0: a budget found carrying
    # it whole cheaper than the factors it could give).
    larger_than_weight: tuple[ModuleName, int] | None = None
    replaced: tuple[_Factorized, ModuleFates] | None = None  # carried whole: what it had as factors


def _with_whole_alternative(run: _Run, module: ModulePlan, result: _ModuleResult, changed: list[TensorName],
                            reasons: dict[TensorName, str]) -> _ModuleResult:
    """A factorized module's result with what carrying it whole would be; one fitted at a rank where its factors
    are larger than that is carried whole at once (exact, and smaller), unless it cannot be."""
    factorized = result.factorized
    result.whole_refusal = _whole_refusal(run, module, factorized)
    if result.whole_refusal is None:
        whole = module_fates(run.plan, module, [module.weight, *changed], factorized=False, carry=True,
                             profile=run.profile, reasons=reasons)
        if whole.saves_module:
            why = "the weight carried whole: exact, and no larger than its factors"
            whole.fates = [replace(f, reason=f"{f.reason}; {why}") if f.tensor == module.weight else f
                           for f in whole.fates]
            result.whole = whole
        else:
            result.whole_refusal = whole.fates[0].reason
    result.whole_extra_bytes = (sum(run.finetuned.info(n).nbytes for n in module.tensors)
                                - _carried_bytes(run, result.fates))
    factors = factorized.fit.factors
    if factors is None:  # its rank is the budget's to decide
        return result
    if _factor_bytes(factorized) <= result.whole_extra_bytes:
        return result
    result.larger_than_weight = factorized.module, factors.rank
    return _carried_whole(result) if result.whole is not None else result


# Why one module keeps its factors when all could be carried whole.
_NO_LORA_MODULE = "PEFT loads no adapter without a LoRA module (it would find no target)"


def _keep_one_factorized(results: _Results) -> None:
    """If every module was carried whole, give back its factors to the one whose factors cost least over its
    tensors: PEFT refuses an adapter that targets no module."""
    replaced = [r for r in results.modules if r.replaced is not None]
    if not replaced or any(r.factorized is not None for r in results.modules):
        return
    keep = min(replaced, key=lambda r: _factor_bytes(r.replaced[0]) - r.whole_extra_bytes)
    keep.factorized, keep.fates = keep.replaced
    keep.replaced, keep.whole_refusal = None, _NO_LORA_MODULE


def _factor_bytes(factorized: _Factorized) -> int:
    """What its factors take in the file, its tied head's copy included."""
    stored = sum(t.nbytes for t in factor_tensors(factorized.fit.factors).values())
    return stored * (2 if factorized.tied_head else 1)


def _whole_refusal(run: _Run, module: ModulePlan, factorized: _Factorized) -> str | None:
    """Why a factorized module cannot be carried whole instead, or None."""
    if not run.carry:
        return "--no-carry forbids carrying tensors"
    if (why := run.profile.carry_refusal(is_bias=False)) is not None:
        return why
    if factorized.tied_head is not None:
        return f"its tied head {factorized.tied_head} would not see a carried embedding"
    if moe_weight(module.module, moe_family(run.plan.model_type)) is not None:
        return "PEFT loads experts and routers as fused parameters, all with factors"
    return None


def _carried_whole(result: _ModuleResult) -> _ModuleResult:
    """The module carried whole (modules_to_save) instead of factorized."""
    return replace(result, factorized=None, fates=result.whole, replaced=(result.factorized, result.fates))


def _carried_bytes(run: _Run, fates: ModuleFates) -> int:
    return sum(run.finetuned.info(name).nbytes for name in fates.keys)


def _read_module(run: _Run, module: ModulePlan) -> dict[TensorName, StoredPair]:
    """Every tensor of the module that both checkpoints hold at the same shape: what its step may compare."""
    return {name: read_pair(run.finetuned, run.base, name) for name in module.tensors
            if name not in module.new_in_finetuned and name not in module.resized}


def _fit_weight(run: _Run, module: ModulePlan, stored: StoredPair, deltas: DeltaBuffer) -> _Factorized | None:
    """Fit the module's weight; None if it did not change."""
    started = time.perf_counter()
    column_scale = run.folds.ratios.get(module.module)  # a changed norm feeds this module: its ΔW takes the change
    needs_weights = run.variant.needs_weights
    pair = delta_of(stored, module.kind, deltas, keep_base=needs_weights, keep_finetuned=needs_weights,
                    column_scale=column_scale)
    base_norm = deltas.base_energy**0.5 if pair is not None else 0.0
    del stored  # the caller no longer holds it: the stored pair is freed before the SVD
    if pair is None:
        return None
    shape = tuple(run.finetuned.info(module.weight).shape)
    out_in = out_in_shape(shape, module.kind)
    wanted = run.policy.compute_rank(module.module, out_in)
    note = (f"rank {wanted} > min(out, in) = {min(out_in)}: clamped"
            if run.policy.is_requested(module.module) and wanted > min(out_in) else None)
    if column_scale is not None:
        note = "; ".join(filter(None, [note, "ΔW includes the scale change of the norm it reads"]))
    dtype = run.dtype or run.base.info(module.weight).dtype
    fit = run.variant.fit(pair, min(wanted, min(out_in)),
                          lambda s, total: run.policy.choose(module.module, s, total, out_in),
                          module.module, module.kind, dtype, run.fit)
    return _Factorized(module.module, module.kind, shape, dtype, fit, time.perf_counter() - started, note, base_norm)


def _measured(run: _Run, fate: TensorFate) -> TensorFate:
    """A dropped or folded tensor with the size of its change: what leaving it out of the factors costs."""
    name = fate.tensor
    if name not in run.base or run.base.info(name).shape != run.finetuned.info(name).shape:
        return fate
    change, scale = change_norms(run.base.get(name), run.finetuned.get(name))
    return replace(fate, change_norm=change, relative_change=change / scale if scale > 0 else None)


def _extract_module(run: _Run, module: ModulePlan, stored: dict[TensorName, StoredPair],
                    deltas: DeltaBuffer) -> _ModuleResult:
    """Fit the module's weight (unless the profile's reader cannot take LoRA on it), report the norms folded into
    other modules, and decide what becomes of its other changed tensors. ``stored``: the module's tensors as
    :func:`_read_module` read them; the weight's pair is taken out of it (and freed) once ΔW is formed.
    ``deltas``: where ΔW is formed."""
    factorized = None
    compared = set(module.new_in_finetuned) | set(module.resized)
    fates = ModuleFates()
    tied = run.plan.tied if run.plan.tied and run.plan.tied.embedding == module.module else None
    # Why a changed tensor that the profile cannot carry was not factorized or folded either.
    reasons = {n: f"vocabulary resized {before[0]} → {after[0]}" for n, (before, after) in module.resized.items()}
    reasons.update((n, f"not folded: {why}") for n, why in run.folds.unfoldable.items() if n in module.tensors)
    refusal = (run.profile.lora_refusal(module.module, module.kind)
               if module.weight is not None and module.is_selected else None)
    if tied is not None and run.variant.tied_embedding_refusal and module.weight is not None:
        fates.drop([module.weight], f"input embedding tied to {tied.head}: {run.variant.tied_embedding_refusal}")
        compared.add(module.weight)
    elif refusal is not None:
        reasons[module.weight] = refusal  # left to the rules for changed tensors that are not factorized
    elif module.weight is not None and module.is_selected:
        factorized = _fit_weight(run, module, stored.pop(module.weight), deltas)
        compared.add(module.weight)
        if factorized is not None and tied is not None:
            # The tied head sees the embedding's delta too: store the same factors, transposed, as its Linear
            # LoRA (PEFT's ensure_weight_tying shares them for an ``lm_head``; other heads get their own copy).
            factorized.tied_head = tied.head
            fates.notes.append(f"{tied.head} is tied to {tied.embedding}: the embedding's factors are stored for "
                               "it too, transposed")
    folded = [n for n in module.tensors if n in run.folds.folded]
    for name in folded:
        readers = ", ".join(r.rpartition(".")[2] for r in run.folds.folded[name].readers)
        fates.fates.append(TensorFate(name, "folded", f"scale change folded into {readers}"))
    compared.update(folded)
    changed = [n for n in module.tensors if n not in compared and is_changed(stored[n])]
    changed += module.new_in_finetuned + list(module.resized)
    rest = module_fates(run.plan, module, changed, factorized=factorized is not None, carry=run.carry,
                        profile=run.profile, reasons=reasons)
    fates.fates = [_measured(run, f) if f.fate in ("dropped", "folded") else f for f in fates.fates + rest.fates]
    fates.keys.update(rest.keys)
    fates.saves_module = rest.saves_module
    fates.notes += rest.notes
    handled = (factorized is not None) + len(folded) + len(changed)
    result = _ModuleResult(factorized, fates, len(module.tensors) - handled)
    return result if factorized is None else _with_whole_alternative(run, module, result, changed, reasons)


def _extract_tied_bias(run: _Run, head_factorized: bool) -> _ModuleResult:
    """The tied head's bias lives under another module's name (BERT's cls.predictions.bias)."""
    tied = run.plan.tied
    if tied is None or tied.bias is None or not is_changed(read_pair(run.finetuned, run.base, tied.bias)):
        return _ModuleResult(None, ModuleFates(), int(tied is not None and tied.bias is not None))
    fates = tied_bias_fates(tied, head_factorized=head_factorized, carry=run.carry, profile=run.profile)
    fates.fates = [_measured(run, f) if f.fate == "dropped" else f for f in fates.fates]
    return _ModuleResult(None, fates, 0)


class _Spill:
    """Where the SVDs of modules whose rank is decided at the end wait: the singular vectors on disk, so memory
    stays bounded by one module however many modules there are."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def put(self, factorized: _Factorized) -> _Factorized:
        """The module with its pending SVD moved to disk."""
        svd = factorized.fit.pending
        self.directory.mkdir(exist_ok=True)
        path = self.directory / f"{self.count:06d}.safetensors"
        self.count += 1
        save_tensors(path, {"u": svd.u.cpu().contiguous(), "s": svd.s.cpu(), "vh": svd.vh.cpu().contiguous()})
        spectrum = ModuleSpectrum(factorized.module, out_in_shape(factorized.shape, factorized.kind), svd.s.cpu(),
                                  svd.total_energy, copies=2 if factorized.tied_head is not None else 1)
        return replace(factorized, fit=replace(factorized.fit, pending=None),
                       spilled=_Spilled(path, spectrum, svd.method, svd.residual_energy))

    @staticmethod
    def take(spilled: _Spilled) -> TruncatedSVD:
        tensors = load_file(spilled.path)
        return TruncatedSVD(tensors["u"], tensors["s"], tensors["vh"], spilled.spectrum.total_energy, spilled.method,
                            spilled.residual_energy)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class _Results:
    modules: list[_ModuleResult]  # in plan order, then the tied head's bias
    spill: _Spill  # the SVDs of the modules whose rank the policy decides at the end

    @property
    def factorized(self) -> list[_Factorized]:
        return [r.factorized for r in self.modules if r.factorized is not None]


class ModuleExecutor(Protocol):
    """Runs the per-module fits elsewhere, one module a task: :class:`deltakit.ops.ray_cluster.RayMap`."""

    def map(self, function: Callable[[_Run, ModulePlan], _ModuleResult], shared: _Run,
            units: Sequence[ModulePlan], label: Callable[[ModulePlan], str]) -> Iterator[tuple[int, _ModuleResult]]:
        """``function(shared, unit)`` for every unit, with the unit's index, in any order."""
        ...


def _extract_modules(run: _Run, spill: _Spill, progress: bool, executor: ModuleExecutor | None) -> _Results:
    """Phase 1: every module, here or on the executor; the results in plan order."""
    by_index: dict[int, _ModuleResult] = {}
    total = sum(run.finetuned.info(n).nbytes for p in run.plan.modules for n in p.tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc="extract", disable=not progress,
              dynamic_ncols=True) as bar:
        for i, result in _module_results(run, executor):
            if result.factorized is not None and result.factorized.fit.pending is not None:
                result = replace(result, factorized=spill.put(result.factorized))
            by_index[i] = result
            bar.update(sum(run.finetuned.info(n).nbytes for n in run.plan.modules[i].tensors))
            bar.set_postfix_str(f"{len(by_index)}/{len(run.plan.modules)} modules", refresh=False)
    results = _Results([by_index[i] for i in range(len(run.plan.modules))], spill)
    results.modules.append(_extract_tied_bias(run, any(f.tied_head for f in results.factorized)))
    return results


def _module_results(run: _Run, executor: ModuleExecutor | None) -> Iterator[tuple[int, _ModuleResult]]:
    """Each module's result with its index in the plan: here, in plan order, reading ahead; or on the
    executor, as its tasks complete."""
    if executor is not None:
        yield from executor.map(_extract_planned, run, run.plan.modules, label=lambda p: p.module)
        return
    deltas = DeltaBuffer(run.fit.device)
    # The next modules' tensors are read while this one's SVD runs; a bounded read-ahead keeps memory at a few
    # tensors.
    reads = ((module_plan, _read_module(run, module_plan)) for module_plan in run.plan.modules)
    with prefetched(reads, depth=_READ_AHEAD_MODULES) as modules:
        for i, (module_plan, stored) in enumerate(modules):
            result = _extract_module(run, module_plan, stored, deltas)
            del stored
            yield i, result


def _extract_planned(run: _Run, module: ModulePlan) -> _ModuleResult:
    """One module, read and fitted where an executor's task runs (another node, maybe)."""
    for checkpoint in (run.finetuned, run.base):
        missing = next((f for f in checkpoint.files if not f.exists()), None)
        if missing is not None:
            raise CheckpointNotFoundError(
                f"not found on the worker fitting {module.module} (host {platform.node()}): every node must see "
                "the checkpoints at the same path (shared storage; for a Hub id, a shared HF cache)", path=missing)
    return _extract_module(run, module, _read_module(run, module), DeltaBuffer(run.fit.device))


def _assemble(run: _Run, results: _Results, size: ModelSize) -> tuple[list[ModuleReport], list[ModuleFactors],
                                                                       dict | None]:
    """Phase 2, then every module's report row and factors (a tied head's after its embedding's), in plan
    order, and the rank policy's part of the report. A byte budget pays for the carried tensors first."""
    _keep_one_factorized(results)
    size = replace(size, carried_bytes=sum(_carried_bytes(run, r.fates) for r in results.modules))
    finished, summary = _finish_ranks(run, results, size)
    results.spill.remove()
    rows, factors = [], []
    for f in results.factorized:
        if f.module in finished:
            module_factors, metrics, seconds = finished[f.module]
            seconds += f.seconds
        else:
            module_factors, metrics, seconds = f.fit.factors, f.fit.metrics, f.seconds
        rows.append(ModuleReport(module=f.module, kind=f.kind.value, shape=f.shape, rank=module_factors.rank,
                                 delta_norm=f.fit.delta_norm, seconds=seconds, note=f.note, **metrics))
        factors.append(module_factors)
        if f.tied_head is not None:
            factors.append(_transposed_for_head(module_factors, f.tied_head))
    return rows, factors, summary


def _finish_ranks(run: _Run, results: _Results,
                  size: ModelSize) -> tuple[dict[ModuleName, tuple[ModuleFactors, dict, float]], dict | None]:
    """Phase 2 of the rank policy: the ranks it deferred, decided from the spectra at once, and each deferred
    module's factors cut from its stored SVD (no second SVD), or the module carried whole where the policy says
    so (``results`` is updated). Returns the factors by module (factors, metrics, seconds spent) and the policy's
    part of the report.

    A byte budget bounds the file: the allocation is redone with the budget less its overshoot (the header, and
    modules stored at another width than the budget's bytes per parameter) until the exact size of the file
    those ranks give fits, which it does at the latest at the smallest allocation, refused before if too large.

    Raises:
        InvalidOptionError: the budget is smaller than the smallest adapter the policy can give.
    """
    pending = [i for i, r in enumerate(results.modules) if r.factorized is not None and r.factorized.spilled]
    spectra = [replace(results.modules[i].factorized.spilled.spectrum,
                       whole_cost=-(-results.modules[i].whole_extra_bytes // size.bytes_per_param)
                       if results.modules[i].whole is not None else None) for i in pending]
    limit = run.policy.file_bytes

    def file_size(ranks: list[int]) -> int:
        return _file_size(run, results, dict(zip(pending, ranks)))

    if limit is not None and (smallest := file_size(run.policy.floor_ranks(spectra))) > limit:
        raise InvalidOptionError(
            f"--budget {limit:,}B cannot hold this adapter: the tensors it carries exactly take "
            f"{size.carried_bytes:,} bytes, and the smallest file (every factorized module at its lowest rank or "
            f"carried whole, header included) {smallest:,}; give at least {smallest}B, or use --no-carry")

    def allocate(size: ModelSize) -> tuple[list[int], dict | None]:
        ranks, summary = run.policy.finish(spectra, size)
        while limit is not None and (over := file_size(ranks) - limit) > 0:
            size = replace(size, reserved_bytes=size.reserved_bytes + over)
            ranks, summary = run.policy.finish(spectra, size)
        return ranks, summary

    ranks, summary = allocate(size)
    is_factorized = any(r.factorized is not None and not r.factorized.spilled for r in results.modules)
    if ranks and not is_factorized and all(rank == CARRIED_WHOLE for rank in ranks):
        keep = min(range(len(spectra)), key=lambda j: spectra[j].cost_per_rank)
        spectra[keep] = replace(spectra[keep], whole_cost=None)
        results.modules[pending[keep]].whole_refusal = _NO_LORA_MODULE
        ranks, summary = allocate(size)
    done = {}
    for i, rank in zip(pending, ranks):
        result = results.modules[i]
        f = result.factorized
        if rank == CARRIED_WHOLE:
            result.larger_than_weight = f.module, CARRIED_WHOLE
            results.modules[i] = _carried_whole(result)
            continue
        started = time.perf_counter()
        svd = results.spill.take(f.spilled)
        factors, metrics = run.variant.complete(svd, rank, f.module, f.kind, f.dtype, run.fit)
        done[f.module] = factors, metrics, time.perf_counter() - started
    return done, summary


def _refuse_budget_below_floor(policy: RankPolicy, plan: ExtractPlan, ft: Checkpoint, base: Checkpoint,
                               stored_dtype: torch.dtype | None, codec: FactorCodec | None) -> None:
    """Refuse, from the headers alone, a byte budget smaller than the file of every selected module's factors at
    its lowest rank, header included (as the policy's own check, every such module is assumed to change; tensors
    carried exactly and tied heads' copies come on top, known only once the deltas are read)."""
    limit = policy.file_bytes
    if limit is None:
        return
    lowest = min(getattr(policy, "min_rank", 1), getattr(policy, "max_rank", 1))
    factors = []
    for p in plan.modules:
        if p.weight is None or not p.is_selected:
            continue
        shape = tuple(ft.info(p.weight).shape)
        dtype = codec.dtype if codec is not None else stored_dtype or base.info(p.weight).dtype
        factors.append(_meta_factors(p.module, p.kind, shape, min(lowest, *out_in_shape(shape, p.kind)), dtype))
    floor = adapter_file_size(factors, [])
    if floor > limit:
        raise InvalidOptionError(
            f"--budget {limit:,}B cannot hold rank {lowest} in each of the {len(factors)} modules that may change: "
            f"their factors and the file's header alone take {floor:,} bytes (tensors carried exactly come on top); "
            f"give at least {floor}B")


def _file_size(run: _Run, results: _Results, ranks: dict[int, int]) -> int:
    """The exact size of the adapter file if the deferred modules (by index in ``results.modules``) get these
    ranks: their factors stand in on the ``meta`` device, in the order :func:`extract` writes them."""
    factors, carried = [], []
    for i, result in enumerate(results.modules):
        rank = ranks.get(i)
        is_whole = rank == CARRIED_WHOLE
        carried += _carried_tensors(run, result.whole if is_whole else result.fates)
        f = result.factorized
        if f is None or is_whole:
            continue
        dtype = run.fit.codec.dtype if run.fit.codec is not None else f.dtype
        module_factors = f.fit.factors if rank is None else _meta_factors(f.module, f.kind, f.shape, rank, dtype)
        factors.append(module_factors)
        if f.tied_head is not None:
            factors.append(_transposed_for_head(module_factors, f.tied_head))
    return adapter_file_size(factors, carried)


def _meta_factors(module: ModuleName, kind: WeightKind, shape: tuple[int, ...], rank: int,
                  dtype: torch.dtype) -> ModuleFactors:
    """Factors of this rank with the shapes and dtype stored for the module, and no data (for file sizes)."""
    out, inp = out_in_shape(shape, kind)
    return ModuleFactors(module, kind, torch.empty(rank, inp, dtype=dtype, device="meta"),
                         torch.empty(out, rank, dtype=dtype, device="meta"), 1.0, 1.0)


def _carried_tensors(run: _Run, fates: ModuleFates) -> list[CarriedTensor]:
    """The tensors these fates carry, read from the fine-tuned checkpoint when written."""
    ft = run.finetuned
    return [CarriedTensor(key, ft.info(name).dtype, ft.info(name).shape, lambda n=name: ft.get(n))
            for name, key in fates.keys.items()]


def _check_file_bytes(limit: int, factors: list[ModuleFactors], carried: list[CarriedTensor],
                      report: ExtractReport) -> None:
    """Put the file's parts in the budget's report; refuse a file over the byte budget. Phase 2 sized the file
    exactly; only padding the experts of a mixture-of-experts model to one rank afterwards can exceed it."""
    file_bytes = adapter_file_size(factors, carried)
    carried_bytes = sum(math.prod(c.shape) * c.dtype.itemsize for c in carried)
    factor_bytes = sum(t.nbytes for f in factors for t in factor_tensors(f).values())
    report.budget.update(file_bytes=file_bytes, carried_bytes=carried_bytes,
                         header_bytes=file_bytes - carried_bytes - factor_bytes)
    if file_bytes > limit:
        raise InvalidOptionError(
            f"--budget {limit:,}B: the adapter file would take {file_bytes:,} bytes once its expert factors are "
            "padded to the one rank PEFT loads fused experts at; raise the budget, or leave the experts out with "
            "--exclude 'experts'")


def _transposed_for_head(embedding: ModuleFactors, head: ModuleName) -> ModuleFactors:
    a, b = transpose_embedding_factors(embedding.a, embedding.b)
    return ModuleFactors(head, WeightKind.LINEAR, a, b, embedding.alpha, embedding.scaling)


def _refuse_elsewhere(calib: str | Path | None, device: str) -> None:
    """What an executor's tasks cannot do, refused before any work."""
    if calib is not None:
        raise InvalidOptionError("--calib with --executor ray is not supported: the calibration pass runs the "
                                 "model block by block on one machine; extract with the local executor")
    if device not in ("auto", "cpu"):
        raise InvalidOptionError(f"--device {device} with --executor ray is not supported: each module's fit runs "
                                 "as a task on one CPU of a worker; drop --device")


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


def _check_rank_patterns(rank_pattern: list[tuple[str, int]] | None, plan: ExtractPlan) -> None:
    """A --rank-pattern that matches no module that can be factorized is a typo: refused before any math."""
    modules = [m.module for m in plan.modules if m.weight is not None and m.is_selected]
    for pattern, _ in rank_pattern or []:
        if not any(matches_peft_pattern(pattern, module) for module in modules):
            example = f" (module names look like {modules[0]})" if modules else ""
            raise InvalidOptionError(f"--rank-pattern {pattern!r} matches no module that would be factorized"
                                     f"{example}")


def _whole_notes(results: list[_ModuleResult]) -> list[str]:
    """Which modules were carried whole because their factors would be larger, and which kept such factors."""
    notes = []
    whole = [r.larger_than_weight for r in results if r.larger_than_weight and r.factorized is None]
    if fixed := [(m, rank) for m, rank in whole if rank != CARRIED_WHOLE]:
        ranks = ", ".join(str(rank) for rank in sorted({rank for _, rank in fixed}))
        notes.append(f"{len(fixed)} module(s) carried whole (modules_to_save): factors at rank {ranks} would be "
                     f"larger than the weight ({shorten([m for m, _ in fixed])})")
    if chosen := [m for m, rank in whole if rank == CARRIED_WHOLE]:
        notes.append(f"{len(chosen)} module(s) carried whole (modules_to_save) by the budget: exact, and no larger "
                     f"than the factors it could give them ({shorten(chosen)})")
    kept = [r for r in results if r.larger_than_weight and r.factorized is not None]
    for refusal in dict.fromkeys(r.whole_refusal for r in kept):
        modules = [r.larger_than_weight[0] for r in kept if r.whole_refusal == refusal]
        notes.append(f"{len(modules)} module(s) keep factors larger than their weight ({shorten(modules)}): "
                     f"{refusal}")
    return notes


def _unrelated_note(factorized: list[_Factorized]) -> list[str]:
    """A fine-tune moves its weights a little; a ΔW as large as the weights means another model (or the two
    swapped for a much-changed one): worth a line in the summary, not a refusal."""
    delta = sum(f.fit.delta_norm ** 2 for f in factorized)
    base = sum(f.base_norm ** 2 for f in factorized)
    if base == 0 or delta < 0.25 * base:
        return []
    return [f"‖ΔW‖ is {(delta / base) ** 0.5:.0%} of ‖W0‖ over the factorized weights: FINETUNED and BASE look "
            "nearly unrelated (or swapped); is BASE the model FINETUNED was fine-tuned from?"]


def _check_expert_options(plan: ExtractPlan, variant: AdapterVariant, use_rslora: bool,
                          codec: FactorCodec | None) -> None:
    """Refuse, from the headers, what PEFT cannot load for expert and router weights (adapters/moe.py)."""
    family = moe_family(plan.model_type)
    experts = [p.module for p in plan.modules
               if p.weight is not None and p.is_selected and moe_weight(p.module, family) is not None]
    if not experts:
        return
    if variant.expert_refusal:
        option, why = f"--{variant.name}", variant.expert_refusal
    elif use_rslora:
        option, why = "--use-rslora", "with lora_alpha doubled for the fused gate/up, which changes rsLoRA's scaling by √2"
    elif codec is not None:
        option, why = "--factor-dtype", "with one alpha for all experts, where each expert's 8-bit scales need their own"
    else:
        return
    raise InvalidOptionError(
        f"{option}: PEFT 0.21 loads mixture-of-experts weights ({shorten(experts)}) as fused target_parameters, "
        f"{why}; extract without it, or leave the experts and routers out with --exclude 'experts|gate$'")


def _linear_out_in(base: Checkpoint, plan: ExtractPlan) -> dict[ModuleName, tuple[int, int]]:
    """(out, in) of every Linear weight of the base, by module."""
    return {split_tensor_name(name)[0]: out_in_shape(info.shape, WeightKind.LINEAR)
            for name, info in base.tensors.items()
            if weight_kind(name, info.shape, plan.model_type) is WeightKind.LINEAR}


def _experts_summary(rows: list[ModuleReport], fates: list[TensorFate], plan: ExtractPlan, base: Checkpoint,
                     zero_filled: list[ModuleName]) -> tuple[list[dict], list[str]]:
    """Which experts changed, per MoE layer (with each one's worst relative error in the adapter, 1 where it is
    not in it), and notes on what was done for PEFT's sake."""
    family = moe_family(plan.model_type)
    changed = [(m.module, m.relative_error) for m in rows]
    changed += [(split_tensor_name(t.tensor)[0], 1.0) for t in fates if t.fate == "dropped"]
    layers = expert_summary(changed, sorted({split_tensor_name(n)[0] for n in base.tensors}), family)
    notes = []
    if zero_filled:
        notes.append(f"{len(zero_filled)} unchanged or excluded expert/router weight(s) get zero factors: PEFT "
                     "targets every expert of every MoE layer once any is targeted, with one rank for all")
    kept_whole = [m for m in plan.claimed_by_peft if any(t.tensor == f"{m}.weight" for t in fates)]
    if kept_whole:
        notes.append(f"{shorten(kept_whole)}: PEFT 0.21 reads LoRA targets named like these as the fused experts "
                     f"of every {family.name}-family MoE layer, so they are not factorized (carried whole)")
    return layers, notes


def _input_name(given: str | Path, ckpt: Checkpoint) -> str:
    """How the report and the adapter config name an input: the path as given, or the bare Hub repo id."""
    return ckpt.source.repo_id if ckpt.source else str(given)


def extract(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path,
    *,
    rank: int | Literal["auto"] = DEFAULT_RANK,
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
    budget_weighting: Weighting = DEFAULT_WEIGHTING,
    dora: bool = False,
    calib: str | Path | None = None,
    calib_tokens: int = CALIB_TOKENS,
    calib_seq_len: int = CALIB_SEQ_LEN,
    carry: bool = True,
    target: Target = "peft",
    overwrite: bool = False,
    progress: bool = False,
    executor: ModuleExecutor | None = None,
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
            ``budget`` buys ranks at this width. Not with ``dtype``, nor 8 bits with ``dora``.
        include, exclude: regexes (``re.search``) on module names selecting what goes into the adapter.
        rank_pattern: (regex, rank) overrides, matched the way PEFT matches ``rank_pattern`` keys.
        energy: keep the smallest rank holding this fraction of ‖ΔW‖², at most ``max_rank`` (default :data:`~deltakit.math.ranks.DEFAULT_MAX_RANK`).
        budget: the total size of the factors (``50MB``, ``2%`` of the model, ``3Mparams``; see
            :func:`deltakit.ranks.parse_budget`), allocated across modules to minimise the total squared error
            (:class:`deltakit.ranks.BudgetRanks`). Each module's SVD is computed once, at ``max_rank``, spilled
            to disk, and cut to its allocated rank afterwards.
        avg_rank: a budget equal to the size of a uniform adapter of this rank over the changed modules.
        min_rank, max_rank: bounds of every module's rank under a budget; ``max_rank`` also caps ``energy`` and
            ``rank="auto"``.
        budget_weighting: ``uniform`` (the default: the largest uniform rank that fits the budget), ``absolute``
            (minimise the total squared error of ΔW) or ``relative`` (the sum of each module's squared relative
            error). The default is the one that was never worse than uniform rank on benchmarks/bench_quality.py;
            the others are options (measurements in the README).
        dora: extract a DoRA adapter (magnitude + low-rank direction, PEFT's ``use_dora``) instead of LoRA.
        calib: fit each module to its outputs instead of its weights (:mod:`deltakit.adapters.output_aware`):
            a text file, a JSONL file (``"text"`` fields), or ``"self"`` (sequences sampled from the fine-tuned
            model); the inputs are collected block by block (:mod:`deltakit.ops.calibrate`). Needs the ``calib``
            extra (transformers).
        calib_tokens, calib_seq_len: how many calibration tokens, in sequences of this length.
        carry: store changed tensors that are not factorized (biases, norms, heads) exactly; False drops them
            (each is listed in the report either way).
        target: who loads the adapter (:mod:`deltakit.adapters.profiles`). ``peft``: everything above. ``vllm``:
            only what vLLM's loader accepts: changed norms folded into the Linear layers that read them (for the
            architectures in :mod:`deltakit.adapters.architectures`), one scaling right for every module, no
            ``modules_to_save``, biases or DoRA; what cannot be written is dropped and reported with its size.
        overwrite: replace ``out`` if it exists.
        progress: show a progress bar on stderr.
        executor: where the per-module fits run; None: here, one module after another. Another executor (Ray:
            :class:`deltakit.ops.ray_cluster.RayMap`) runs each module's read and fit as a task, on the CPU, and
            returns its factors here, where the adapter is written as here: the same bytes as a local run with as
            many math threads as a task has. Not with ``calib`` (the calibration pass runs the model here) nor a
            GPU ``device``.

    Returns:
        The :class:`ExtractReport`, also written as ``extract_report.json`` next to the adapter.

    Raises:
        DeltakitError subclasses: missing or corrupt inputs, shape mismatches, non-finite values, nothing changed,
        existing output, bad options. Nothing is left under ``out`` when any error is raised.
    """
    started = time.perf_counter()
    out_dir = Path(out)
    codec = factor_codec(factor_dtype) if factor_dtype is not None else None
    if codec is not None and dtype is not None:
        raise InvalidOptionError("--dtype and --factor-dtype both choose how the factors are stored; give one")
    if codec is not None and not codec.is_compact:
        dtype, codec = factor_dtype, None  # a float width is just --dtype
    stored_dtype = parse_dtype(dtype)
    policy = rank_policy(rank, energy=energy, budget=budget, avg_rank=avg_rank, min_rank=min_rank,
                         max_rank=max_rank, budget_weighting=budget_weighting, rank_pattern=rank_pattern)
    variant = DORA if dora else LORA
    if calib is not None and dora:
        raise InvalidOptionError("--calib with --dora is not supported: the output-aware fit is LoRA's; drop one")
    if policy.defers and variant.budget_refusal:
        raise InvalidOptionError(variant.budget_refusal)
    if codec is not None and variant.compact_refusal:
        raise InvalidOptionError(variant.compact_refusal)
    if codec is not None and target == "vllm":
        # vLLM before 0.33 drops alpha_pattern, where the 8-bit scales live: its outputs would be silently wrong.
        raise InvalidOptionError(f"--factor-dtype {factor_dtype} with --for vllm: the 8-bit scales live in "
                                 "alpha_pattern, which vLLM before 0.33 ignores; use --factor-dtype bfloat16")
    if executor is not None:
        _refuse_elsewhere(calib, device)
    math_device = resolve_device(device) if executor is None else torch.device("cpu")
    ft_ckpt, base_ckpt = open_checkpoint(finetuned), open_checkpoint(base)
    refuse_unsupported_weights(ft_ckpt), refuse_unsupported_weights(base_ckpt)
    plan = plan_extract(ft_ckpt, base_ckpt, include=include, exclude=exclude)
    _check_rank_patterns(rank_pattern, plan)
    profile = export_profile(target, model_type=plan.model_type, variant_config=variant.config())
    _check_expert_options(plan, variant, use_rslora, codec)
    size = ModelSize(sum(math.prod(info.shape) for info in base_ckpt.tensors.values()),
                     _factor_bytes_per_param(dtype, codec, plan, base_ckpt),
                     tuple(out_in_shape(ft_ckpt.info(p.weight).shape, p.kind) for p in plan.modules
                           if p.weight is not None and p.is_selected))
    _refuse_budget_below_floor(policy, plan, ft_ckpt, base_ckpt, stored_dtype, codec)  # fail before work
    policy.check_size(size)
    if calib is not None:
        check_calibration(calib, ft_ckpt, tokens=calib_tokens, seq_len=calib_seq_len)
    folds = _read_folds(ft_ckpt, base_ckpt, *plan_norm_folds(plan, profile))

    with staged_output(out_dir, overwrite=overwrite, inputs=[ft_ckpt.path, base_ckpt.path]) as staging_dir:
        calibration = None
        if calib is not None:
            plan_reads(ft_ckpt, base_ckpt, once=False)  # a pass per block, or per position sampled
            (staging_dir / _CALIB_DIR).mkdir()
            found, moments = calibrate(calib, ft_ckpt, base_ckpt, staging_dir / _CALIB_DIR, tokens=calib_tokens,
                                       seq_len=calib_seq_len, device=math_device, seed=seed, progress=progress)
            variant = OutputAwareLora(moments)
            calibration = {**found.describe(), "activations": "finetuned", "damping": variant.damping}
        run = _Run(ft_ckpt, base_ckpt, plan, policy, variant,
                   FitSettings(alpha, use_rslora, SvdOptions(svd, oversample, niter, seed), math_device, codec),
                   stored_dtype, carry, profile, folds)
        plan_reads(ft_ckpt, base_ckpt)  # after calibration, which may have left the files cached
        results = _extract_modules(run, _Spill(staging_dir / _SPILL_DIR), progress, executor)
        shutil.rmtree(staging_dir / _CALIB_DIR, ignore_errors=True)
        rows, factors, budget_summary = _assemble(run, results, size)
        carried = [tensor for r in results.modules for tensor in _carried_tensors(run, r.fates)]
        if not factors and not carried:
            raise NothingToExtractError(
                "the fine-tuned checkpoint is identical to its base"
                + (" for the selected modules" if include or exclude else ""),
                path=ft_ckpt.path,
            )
        options = {
            "rank": rank, "alpha": alpha, "use_rslora": use_rslora, "svd": svd, "oversample": oversample,
            "niter": niter, "seed": seed, "device": str(math_device), "dtype": dtype, "factor_dtype": factor_dtype,
            "include": include,
            "exclude": exclude, "rank_pattern": [list(p) for p in rank_pattern or []], "energy": energy,
            "budget": budget, "avg_rank": avg_rank, "min_rank": min_rank, "max_rank": max_rank,
            "budget_weighting": budget_weighting if policy.defers else None, "dora": dora, "carry": carry,
            "calib": str(calib) if calib is not None else None,
            "calib_tokens": calib_tokens if calib is not None else None,
            "calib_seq_len": calib_seq_len if calib is not None else None,
            "target": target,
        }
        fates = [TensorFate(name, "only-in-base", "not in the fine-tuned checkpoint; left as in the base")
                 for name in plan.only_in_base] + [fate for r in results.modules for fate in r.fates.fates]
        notes = [note for r in results.modules for note in r.fates.notes] + _whole_notes(results.modules)
        spec_rank, spec_alpha, expert_layers = None, alpha, None
        experts = conform_experts(factors, _linear_out_in(base_ckpt, plan), moe_family(plan.model_type), alpha,
                                  use_rslora)
        if experts is not None:
            factors, spec_rank, spec_alpha = experts.factors, experts.rank, experts.alpha
        if experts is not None or plan.claimed_by_peft:
            expert_layers, expert_notes = _experts_summary(rows, fates, plan, base_ckpt,
                                                           experts.zero_filled if experts else [])
            notes += expert_notes
        if codec is not None and (caveat := loading_caveat(codec.dtype)):
            notes.append(caveat)
        report = ExtractReport(
            _input_name(finetuned, ft_ckpt), _input_name(base, base_ckpt), str(out_dir), options,
            finetuned_revision=ft_ckpt.source.commit_hash if ft_ckpt.source else None,
            base_revision=base_ckpt.source.commit_hash if base_ckpt.source else None,
            modules=rows,
            tensors=fates,
            unchanged=sum(r.unchanged for r in results.modules),
            command=command_line(),
            notes=notes + _unrelated_note(results.factorized),
            budget=budget_summary,
            experts=expert_layers,
            variant=variant,
            calibration=calibration,
        )
        spec = adapter_spec(
            factors, carried, default_rank=rank if isinstance(rank, int) else 1,
            **({"rank": spec_rank, "alpha": spec_alpha} if experts is not None
               else profile.config_rank_alpha(factors, alpha, use_rslora)),
            use_rslora=use_rslora,
            variant_config=variant.config(),
            base_model_name_or_path=report.base,
            revision=report.base_revision,
            task_type=task_type_for((ft_ckpt.config or {}).get("architectures")),
            modules_to_save=[p.module for p, r in zip(plan.modules, results.modules) if r.fates.saves_module],
            ensure_weight_tying=plan.tied is not None and plan.tied.head == "lm_head"
            and any(f.module == "lm_head" for f in factors),
            target_modules=target_modules([f.module for f in factors if not is_parameter_target(f)],
                                          {split_tensor_name(n)[0] for n in base_ckpt.tensors}),
        )
        if policy.file_bytes is not None:
            _check_file_bytes(policy.file_bytes, factors, carried, report)
        report.adapter_bytes = write_adapter(staging_dir, factors, carried, spec)
        report.seconds = time.perf_counter() - started
        write_json(staging_dir / REPORT_FILE, report.to_json())
        write_text(staging_dir / "README.md", model_card(report))
    return report
