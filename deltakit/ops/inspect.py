"""``inspect``: how a fine-tune changed each module, and which ranks would capture it.

Streams one module at a time like ``extract``: read the two weights, form ΔW in fp32 in PEFT's (out, in)
orientation, compute its leading singular values, keep only numbers. From the spectra alone (Eckart–Young) it
predicts what any rank choice would cost and retain, so it answers "which rank?" without writing an adapter:
energy retained at a ladder of ranks, the rank each policy would pick (an energy target, the noise floor of
``--rank auto``, the ``--budget`` allocation at the sizes of the uniform ranks), and the size/error frontier of
uniform ranks against budget allocation.

The module is named ``inspect_delta`` so that it does not shadow the standard library's ``inspect``.
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from deltakit.defaults import DEFAULT_INSPECT_RANKS
from deltakit.ops import plots
from deltakit.io.checkpoint import Checkpoint, open_checkpoint, plan_reads, refuse_unsupported_weights
from deltakit.errors import InvalidOptionError, NothingToExtractError
from deltakit.math.factorize import DeltaBuffer, SvdMethod, resolve_device, truncated_svd
from deltakit.names import ModuleName
from deltakit.adapters.layers import out_in_shape
from deltakit.math.whiten import DEFAULT_DAMPING, whitened_svd, whitening
from deltakit.ops.calibrate import CALIB_SEQ_LEN, CALIB_TOKENS, CalibrationMoments, calibrate, check_calibration
from deltakit.ops.delta import delta_of, read_pair
from deltakit.ops.plan import ExtractPlan, plan_extract
from deltakit.math.ranks import (
    DEFAULT_MAX_RANK,
    BudgetRanks,
    ModuleSpectrum,
    NoiseFloor,
    budget_for_avg_rank,
    noise_floor,
    predicted_squared_error,
    rank_for_energy,
)
from deltakit.ops.report import command_line, format_bytes
from deltakit.io.writer import check_output, staged_output, write_json

REPORT_FILE = "report.json"
# The energy target of the suggested "energy" rank (extract's --energy).
SUGGESTED_ENERGY = 0.9
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class ModuleInspection:
    """One factorizable weight that changed: its size of change and its spectrum.

    Attributes:
        module: the module name.
        kind: ``linear``, ``conv1d`` or ``embedding``.
        shape: as stored in the checkpoint.
        out_in: (out, in) in PEFT's orientation.
        delta_norm: ‖ΔW‖_F.
        base_norm: ‖W0‖_F.
        singular_values: the leading singular values of ΔW, descending (min(max_rank, out, in) of them).
        energy_retained: rank → Σ_{i≤rank} s_i² / ‖ΔW‖², for each inspected rank; ranks at or above min(out, in)
            give 1.0.
        noise: the noise floor of ``--rank auto`` (:func:`deltakit.ranks.noise_floor`).
        suggested_ranks: policy → rank: ``energy_0.9``, ``noise_floor`` (what ``--rank auto`` keeps, at least 1)
            and ``budget_r<R>`` (the ``--budget`` allocation at the size of a uniform rank-R adapter, for each
            rank R of the frontier).
        method: the SVD route that ran.
    """

    module: ModuleName
    kind: str
    shape: tuple[int, ...]
    out_in: tuple[int, int]
    delta_norm: float
    base_norm: float
    singular_values: list[float]
    energy_retained: dict[int, float]
    noise: NoiseFloor
    suggested_ranks: dict[str, int] = field(default_factory=dict)
    method: str = ""
    # With --calib: the whitened spectrum, i.e. the singular values of RᵀΔW·L (L·Lᵀ = E[xxᵀ], R·Rᵀ = E[ggᵀ] of the
    # output gradients, both damped), and the share of the module's Fisher-weighted output energy E‖RᵀΔW x‖² each
    # rank keeps with the output-aware fit:
    output_singular_values: list[float] | None = None
    output_energy_retained: dict[int, float] | None = None

    @property
    def relative_change(self) -> float:
        """‖ΔW‖ / ‖W0‖ (inf for a zero base weight)."""
        return self.delta_norm / self.base_norm if self.base_norm > 0 else math.inf

    @property
    def module_type(self) -> str:
        """The last name component (``q_proj``, ``down_proj``, ``embed_tokens``...)."""
        return self.module.rpartition(".")[2]

    @property
    def layer(self) -> int | None:
        """The first integer name component (the block index), None outside the repeated blocks."""
        match = _LAYER_INDEX.search(self.module)
        return int(match[1]) if match else None

    def spectrum(self) -> ModuleSpectrum:
        return ModuleSpectrum(self.module, self.out_in, torch.tensor(self.singular_values, dtype=torch.float64),
                              self.delta_norm**2)

    def to_json(self) -> dict:
        return {
            "module": self.module,
            "type": self.module_type,
            "layer": self.layer,
            "kind": self.kind,
            "shape": list(self.shape),
            "out_in": list(self.out_in),
            "delta_norm": self.delta_norm,
            "base_norm": self.base_norm,
            "relative_change": self.relative_change if math.isfinite(self.relative_change) else None,
            "energy_retained": {str(rank): value for rank, value in self.energy_retained.items()},
            "suggested_ranks": self.suggested_ranks,
            "noise_sigma": self.noise.sigma,
            "noise_threshold": self.noise.threshold,
            "method": self.method,
            "singular_values": self.singular_values,
            **({"output_energy_retained": {str(rank): value for rank, value in self.output_energy_retained.items()},
                "output_singular_values": self.output_singular_values}
               if self.output_energy_retained is not None else {}),
        }


@dataclass(frozen=True)
class FrontierPoint:
    """A uniform rank and the budget allocation of the same size, with their predicted errors.

    Attributes:
        rank: the uniform rank R (clamped to each module's min(out, in)).
        params: the factor parameters of both, Σ min(R, out, in)·(out + in); the allocation may spend less.
        uniform_squared_error: Σ ‖ΔW − ΔW_R‖² over all modules.
        budget_squared_error: the same for the budget allocation (``absolute`` weighting).
        total_energy: Σ ‖ΔW‖², to turn both into relative errors.
    """

    rank: int
    params: int
    uniform_squared_error: float
    budget_squared_error: float
    total_energy: float

    @property
    def uniform_relative_error(self) -> float:
        return math.sqrt(self.uniform_squared_error / self.total_energy) if self.total_energy > 0 else 0.0

    @property
    def budget_relative_error(self) -> float:
        return math.sqrt(self.budget_squared_error / self.total_energy) if self.total_energy > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "rank": self.rank,
            "params": self.params,
            "uniform_squared_error": self.uniform_squared_error,
            "budget_squared_error": self.budget_squared_error,
            "uniform_relative_error": self.uniform_relative_error,
            "budget_relative_error": self.budget_relative_error,
        }


@dataclass
class InspectReport:
    """What ``inspect`` found: per module numbers, the frontier, and what was written."""

    finetuned: str
    base: str
    options: dict
    modules: list[ModuleInspection] = field(default_factory=list)
    frontier: list[FrontierPoint] = field(default_factory=list)
    bytes_per_param: int = 4  # of the base weights inspected (the default factor dtype of extract)
    unchanged: int = 0  # factorizable weights identical in both checkpoints
    out: str | None = None
    plots: list[str] = field(default_factory=list)  # file names under ``out``
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    command: str = ""
    calibration: dict | None = None  # with --calib: the source, its sha256, the tokens

    def to_json(self) -> dict:
        total = sum(m.delta_norm**2 for m in self.modules)
        return {
            "finetuned": self.finetuned,
            "base": self.base,
            "command": self.command,
            "options": self.options,
            "summary": {
                "modules": len(self.modules),
                "unchanged_weights": self.unchanged,
                "total_delta_norm": math.sqrt(total),
                "bytes_per_param": self.bytes_per_param,
                "seconds": round(self.seconds, 3),
            },
            "calibration": self.calibration,
            "frontier": [point.to_json() for point in self.frontier],
            "plots": self.plots,
            "notes": self.notes,
            "modules": [m.to_json() for m in self.modules],
        }

    def table_lines(self) -> list[str]:
        """A compact table: one row per module, then the uniform-vs-budget frontier and the notes."""
        ranks = self.options["ranks"]
        width = max([len("module"), *(len(m.module) for m in self.modules)])
        calibrated = any(m.output_energy_retained is not None for m in self.modules)
        head = (f"{'module':<{width}} {'out×in':>11} {'‖ΔW‖':>9} {'‖ΔW‖/‖W0‖':>10} {'σ1':>9} "
                + " ".join(f"{'E@' + str(r):>6}" for r in ranks)
                + "".join(f" {'O@' + str(r):>6}" for r in ranks if calibrated)
                + f" {'r@E' + str(SUGGESTED_ENERGY):>7} {'r auto':>6}")
        lines = [head, "-" * len(head)]
        for m in self.modules:
            energies = " ".join(f"{m.energy_retained[r]:>6.1%}" if r in m.energy_retained else f"{'–':>6}"
                                for r in ranks)
            if calibrated:
                output = m.output_energy_retained or {}
                energies += "".join(f" {output[r]:>6.1%}" if r in output else f" {'–':>6}" for r in ranks)
            lines.append(
                f"{m.module:<{width}} {f'{m.out_in[0]}×{m.out_in[1]}':>11} {m.delta_norm:>9.3g} "
                f"{m.relative_change:>10.3g} {m.singular_values[0]:>9.3g} {energies} "
                f"{m.suggested_ranks[f'energy_{SUGGESTED_ENERGY}']:>7} {m.suggested_ranks['noise_floor']:>6}")
        lines.append(f"E@r: energy of ΔW retained at rank r; r@E{SUGGESTED_ENERGY}: smallest rank keeping "
                     f"{SUGGESTED_ENERGY:.0%} (at most {self.options['max_rank']}); r auto: above the noise floor "
                     "(--rank auto)")
        if calibrated:
            lines.append("O@r: output energy E‖RᵀΔW x‖² (Fisher-weighted) on the calibration inputs kept at rank r by "
                         "the output-aware fit (extract --calib); – where the module has no calibration inputs")
        if self.frontier:
            lines += ["", "adapter size: uniform rank vs --budget allocation of the same size (relative error of ΔW "
                      "over all modules; per-module budget ranks in the JSON report)",
                      f"{'rank':>6} {'params':>12} {'size':>10} {'uniform':>9} {'budget':>9}"]
            lines += [f"{p.rank:>6} {p.params:>12,} {format_bytes(p.params * self.bytes_per_param):>10} "
                      f"{p.uniform_relative_error:>9.4f} {p.budget_relative_error:>9.4f}" for p in self.frontier]
        if self.unchanged:
            lines.append(f"{self.unchanged} factorizable weight(s) unchanged, not listed")
        lines += self.notes
        return lines


def inspect(
    finetuned: str | Path,
    base: str | Path,
    out: str | Path | None = None,
    *,
    ranks: tuple[int, ...] = DEFAULT_INSPECT_RANKS,
    max_rank: int = DEFAULT_MAX_RANK,
    svd: SvdMethod = "auto",
    device: str = "auto",
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    calib: str | Path | None = None,
    calib_tokens: int = CALIB_TOKENS,
    calib_seq_len: int = CALIB_SEQ_LEN,
    overwrite: bool = False,
    progress: bool = False,
) -> InspectReport:
    """Measure how each factorizable weight changed and what each rank choice would keep.

    Args:
        finetuned, base: checkpoint directories or ``.safetensors`` files.
        out: a directory for ``report.json`` and, with matplotlib installed (the ``plot`` extra), PNG plots:
            energy retained against rank per module type, a layer × module-type heatmap of ‖ΔW‖/‖W0‖, and the
            size/error frontier of uniform rank against budget allocation. Written to a staging sibling and
            renamed into place when complete. None: nothing is written.
        ranks: the ranks at which energy retained is reported and the frontier is drawn (those ≤ ``max_rank``,
            up to the first at which every module is at full rank).
        max_rank: how many leading singular values to compute per module; the cap of the suggested ranks.
        svd: ``exact``, ``randomized`` or ``auto``, as for extract.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:i``.
        include, exclude: regexes (``re.search``) on module names, as for extract.
        calib, calib_tokens, calib_seq_len: as for extract: also report each module's whitened spectrum, the
            output energy its output-aware fit keeps at each rank.
        overwrite: replace ``out`` if it exists.
        progress: show a progress bar on stderr.

    Returns:
        The :class:`InspectReport` (``table_lines()`` for a printed table, ``to_json()`` for the report file).

    Raises:
        DeltakitError subclasses: missing or corrupt inputs, shape mismatches, non-finite values, bad options,
        an existing ``out`` without ``overwrite``; NothingToExtractError when no selected weight changed.
    """
    started = time.perf_counter()
    if max_rank < 1:
        raise InvalidOptionError(f"--max-rank must be at least 1, got {max_rank}")
    if not ranks or any(r < 1 for r in ranks):
        raise InvalidOptionError(f"--ranks must be positive integers, got {list(ranks)}")
    ranks = tuple(sorted(set(ranks)))
    math_device = resolve_device(device)
    ft_ckpt, base_ckpt = open_checkpoint(finetuned), open_checkpoint(base)
    refuse_unsupported_weights(ft_ckpt), refuse_unsupported_weights(base_ckpt)
    if out is not None:  # before the measurement, not after it
        check_output(Path(out), overwrite=overwrite, inputs=[ft_ckpt.path, base_ckpt.path])
    plan = plan_extract(ft_ckpt, base_ckpt, include=include, exclude=exclude)
    options = {"ranks": list(ranks), "max_rank": max_rank, "svd": svd, "device": str(math_device),
               "include": include, "exclude": exclude, "calib": str(calib) if calib is not None else None}
    report = InspectReport(str(finetuned), str(base), options, out=str(out) if out is not None else None,
                           command=command_line())
    with contextlib.ExitStack() as stack:
        moments = None
        if calib is not None:
            check_calibration(calib, ft_ckpt, tokens=calib_tokens, seq_len=calib_seq_len)
            spill_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deltakit-calib-")))
            found, moments = calibrate(calib, ft_ckpt, base_ckpt, spill_dir, tokens=calib_tokens,
                                       seq_len=calib_seq_len, device=math_device, progress=progress)
            report.calibration = {**found.describe(), "activations": "finetuned", "damping": DEFAULT_DAMPING}
        plan_reads(ft_ckpt, base_ckpt)  # after calibration, which may have left the files cached
        _measure(report, plan, ft_ckpt, base_ckpt, moments, math_device, svd, ranks, max_rank, progress)

    if not report.modules:
        raise NothingToExtractError(
            "no factorizable weight differs from the base" + (" among the selected modules" if include or exclude
                                                              else ""), path=ft_ckpt.path)
    report.frontier = _frontier_and_budget_ranks(report.modules, [r for r in ranks if r <= max_rank], max_rank)

    report.seconds = time.perf_counter() - started  # the measurement, not the writing
    if out is not None:
        with staged_output(Path(out), overwrite=overwrite, inputs=[ft_ckpt.path, base_ckpt.path]) as staging_dir:
            if plots.is_available():
                report.plots = [p.name for p in plots.write_plots(report, staging_dir)]
            else:
                report.notes.append(plots.SKIPPED_NOTE)
            write_json(staging_dir / REPORT_FILE, report.to_json())
    return report


def _measure(report: InspectReport, plan: ExtractPlan, ft_ckpt: Checkpoint, base_ckpt: Checkpoint,
             moments: CalibrationMoments | None, math_device: torch.device, svd: SvdMethod, ranks: tuple[int, ...],
             max_rank: int, progress: bool) -> None:
    """Every selected weight's spectrum (and, calibrated, its whitened spectrum) into ``report``."""
    jobs = [p for p in plan.modules if p.weight is not None and p.is_selected]
    base_dtypes: Counter[torch.dtype] = Counter()
    deltas = DeltaBuffer(math_device)
    for module_plan in tqdm(jobs, desc="inspect", unit="module", disable=not progress, dynamic_ncols=True):
        weight = module_plan.weight
        pair = delta_of(read_pair(ft_ckpt, base_ckpt, weight), module_plan.kind, deltas, keep_base=True)
        if pair is None:
            report.unchanged += 1
            continue
        base_dtypes[base_ckpt.info(weight).dtype] += 1
        base_norm = float(torch.linalg.vector_norm(pair.base, dtype=torch.float64))
        pair.base = None  # only its norm is needed: free it before the SVD
        out_in = out_in_shape(tuple(ft_ckpt.info(weight).shape), module_plan.kind)
        rank = min(max_rank, min(out_in))
        result = truncated_svd(pair.delta, rank, method=svd, device=math_device, total_energy=pair.energy)
        inspection = _inspection(module_plan.module, module_plan.kind.value, tuple(ft_ckpt.info(weight).shape),
                                 out_in, base_norm, result.s, result.total_energy, result.method, ranks, max_rank)
        moment = moments.moment(module_plan.module) if moments is not None else None
        if moment is not None:
            output = moments.output_moment(module_plan.module)
            whitened = whitened_svd(pair.delta, whitening(moment), rank,
                                    lambda matrix, k: truncated_svd(matrix, k, method=svd, device=math_device),
                                    None if output is None else whitening(output))
            inspection.output_singular_values = [float(v) for v in whitened.s]
            inspection.output_energy_retained = _retained(whitened.s, whitened.total_energy, out_in, ranks)
        del pair
        report.modules.append(inspection)
    if base_dtypes:
        report.bytes_per_param = base_dtypes.most_common(1)[0][0].itemsize


def _inspection(module: ModuleName, kind: str, shape: tuple[int, ...], out_in: tuple[int, int], base_norm: float,
                s: torch.Tensor, total_energy: float, method: str, ranks: tuple[int, ...],
                max_rank: int) -> ModuleInspection:
    retained = _retained(s, total_energy, out_in, ranks)
    noise = noise_floor(s, total_energy, out_in)
    inspection = ModuleInspection(module, kind, shape, out_in, math.sqrt(total_energy), base_norm,
                                  [float(v) for v in s], retained, noise, method=method)
    inspection.suggested_ranks = {
        f"energy_{SUGGESTED_ENERGY}": rank_for_energy(s, total_energy, SUGGESTED_ENERGY),
        "noise_floor": max(1, min(noise.rank, max_rank)),
    }
    return inspection


def _retained(s: torch.Tensor, total_energy: float, out_in: tuple[int, int],
              ranks: tuple[int, ...]) -> dict[int, float]:
    """rank → Σ_{i≤rank} s_i² / total, for the ranks the spectrum covers (1.0 from min(out, in) on)."""
    energies = torch.cumsum(s.double().square(), dim=0)
    retained = {}
    for rank in ranks:
        if rank >= min(out_in):
            retained[rank] = 1.0
        elif rank <= len(s):
            retained[rank] = min(float(energies[rank - 1]) / total_energy, 1.0) if total_energy > 0 else 1.0
    return retained


def _frontier_and_budget_ranks(modules: list[ModuleInspection], ranks: list[int],
                               max_rank: int) -> list[FrontierPoint]:
    """For each uniform rank R: the budget allocation of the same size (recorded per module as ``budget_r<R>``)
    and both predicted errors; up to the first R at which every module is at full rank."""
    spectra = [m.spectrum() for m in modules]
    out_ins = [m.out_in for m in modules]
    total = sum(s.total_energy for s in spectra)
    points: list[FrontierPoint] = []
    for rank in ranks:
        uniform = [min(rank, *out_in) for out_in in out_ins]
        params = budget_for_avg_rank(rank, out_ins)
        if points and params == points[-1].params:
            break  # every module is at full rank already: larger ranks repeat this point
        allocated = BudgetRanks(params, max_rank=max_rank).allocate(spectra)
        for module, chosen in zip(modules, allocated):
            module.suggested_ranks[f"budget_r{rank}"] = chosen
        points.append(FrontierPoint(rank, params, predicted_squared_error(spectra, uniform),
                                    predicted_squared_error(spectra, allocated), total))
    return points
