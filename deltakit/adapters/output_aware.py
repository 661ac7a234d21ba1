"""LoRA fitted to the model's outputs: per module, the factors minimising E‖Rᵀ(ΔW − BA)x‖² over calibration
inputs x, where R·Rᵀ is the second moment of the gradients at the module's output (K-FAC's Fisher factor).

A fitting route behind the :class:`~deltakit.adapters.variants.AdapterVariant` interface: on disk the adapter is
plain LoRA (merge, stack and PEFT see nothing new); only ``fit`` differs. Each module with calibration
statistics gets :func:`~deltakit.math.whiten.output_aware_fit` (whitened, or the plain SVD where the held-out
check prefers it; under a budget, whitened); a module without them (a position embedding, a module the pass did not reach) gets the plain
SVD, and the report says which route every module took.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from deltakit.adapters.layers import WeightKind
from deltakit.adapters.peft_format import ModuleFactors
from deltakit.adapters.variants import AdapterVariant, ChooseRank, DeltaPair, Fit, FitSettings, factors_from_svd
from deltakit.math.factorize import TruncatedSVD
from deltakit.math.whiten import (DEFAULT_DAMPING, DeferredOutputAwareFit, OutputAwareFit, WhitenedSVD,
                                  output_aware_fit)
from deltakit.names import ModuleName


class CalibrationStatistics(Protocol):
    """Per module, the second moments of its inputs and of the gradients at its output, each over all
    calibration sequences and over two halves of them (see :class:`deltakit.ops.calibrate.CalibrationMoments`)."""

    def moment(self, module: ModuleName) -> torch.Tensor | None: ...

    def halves(self, module: ModuleName) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def output_moment(self, module: ModuleName) -> torch.Tensor | None: ...

    def output_halves(self, module: ModuleName) -> tuple[torch.Tensor, torch.Tensor] | None: ...


class OutputAwareLora(AdapterVariant):
    """LoRA whose factors minimise the predicted output error of each module on calibration inputs.

    Ranks chosen by a policy (``--energy``, ``--rank auto``) are read from the whitened spectrum, i.e. as shares
    of the module's Fisher-weighted output energy E‖RᵀΔW x‖². A global budget (``--budget``, ``--avg-rank``)
    allocates on the whitened spectra too: Fisher-weighted energies are second-order estimates of the KL divergence
    each module's error causes, so they compare across modules. Those modules skip the held-out fallback (the
    allocation picks among whitened triplets); the report keeps the held-out errors at the rank given.
    """

    def __init__(self, statistics: CalibrationStatistics, damping: float = DEFAULT_DAMPING) -> None:
        self.statistics = statistics
        self.damping = damping
        # ‖ΔW‖ and the errors at every rank of the modules a budget decides (their triplets are spilled).
        self._deferred: dict[ModuleName, tuple[float, DeferredOutputAwareFit]] = {}

    def fit(self, pair: DeltaPair, compute_rank: int, choose: ChooseRank, module: ModuleName, kind: WeightKind,
            dtype: torch.dtype, settings: FitSettings) -> Fit:
        halves = self.statistics.halves(module)
        if halves is None:
            fit = super().fit(pair, compute_rank, choose, module, kind, dtype, settings)
            if fit.metrics is not None:
                fit.metrics["fit"] = "plain (no calibration inputs)"
            return fit
        delta = pair.delta
        pair.base = pair.delta = None
        delta_norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
        chosen = output_aware_fit(delta, self.statistics.moment(module), halves, compute_rank, choose,
                                  lambda matrix, rank: settings.svd.run(matrix, rank, settings.device),
                                  self.damping, self.statistics.output_moment(module),
                                  self.statistics.output_halves(module))
        del delta
        if isinstance(chosen, DeferredOutputAwareFit):
            whitened = chosen.svd
            # Only the errors stay in memory; the triplets wait on disk with the other deferred modules.
            self._deferred[module] = delta_norm, dataclasses.replace(chosen, svd=None)
            return Fit(delta_norm, metrics={"method": whitened.method},
                       pending=TruncatedSVD(whitened.u, whitened.s, whitened.vh, whitened.total_energy,
                                            whitened.method, whitened.whitened.residual_energy))
        return self._factors(chosen, chosen.svd, module, kind, dtype, settings, delta_norm)

    def complete(self, svd: TruncatedSVD, rank: int, module: ModuleName, kind: WeightKind, dtype: torch.dtype,
                 settings: FitSettings) -> tuple[ModuleFactors, dict]:
        if module not in self._deferred:  # a module without calibration inputs: its plain SVD
            factors, metrics = super().complete(svd, rank, module, kind, dtype, settings)
            return factors, {**metrics, "fit": "plain (no calibration inputs)"}
        delta_norm, deferred = self._deferred.pop(module)
        fit = self._factors(deferred.at(rank), svd, module, kind, dtype, settings, delta_norm)
        return fit.factors, fit.metrics

    @staticmethod
    def _factors(chosen: OutputAwareFit, svd: TruncatedSVD | WhitenedSVD, module: ModuleName, kind: WeightKind,
                 dtype: torch.dtype, settings: FitSettings, delta_norm: float) -> Fit:
        factors, storage_error = factors_from_svd(svd, chosen.rank, module, kind, dtype, settings)
        relative = chosen.weight_relative_error
        return Fit(delta_norm, factors, {"relative_error": relative, "energy_retained": max(0.0, 1.0 - relative**2),
                                         "method": svd.method, **chosen.metrics(),
                                         "quantization_error": storage_error / delta_norm if delta_norm > 0 else 0.0})
