"""Rank policies: how many singular triplets each module keeps.

A per-module policy answers two questions: how many leading triplets to compute (``compute_rank``), and, given
their singular values, the module's exact total energy ‖ΔW‖² and its (out, in) shape, how many to keep
(``choose``). Each policy has its own name; none changes meaning with the type of its argument.

Every policy has two phases. Per module, ``choose`` either decides or returns None; once every module has
been seen, ``finish`` decides the rest from their spectra. A per-module policy decides everything in the first
phase; a global budget (:class:`Budget`) decides nothing until the second, since it can only be split once
every module's leading singular values are known (:class:`BudgetRanks` is its allocator).
:func:`rank_policy` builds a policy from the extract options; the CLI and the library both call it.

The parsers of the rank-related command-line values (``--rank auto``, ``--budget``, ``--avg-rank``,
``--rank-pattern``, ``inspect --ranks``) live here too, so that the library and the CLI read them the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from deltakit.defaults import DEFAULT_MAX_RANK, DEFAULT_RANK, DEFAULT_WEIGHTING, WEIGHTINGS
from deltakit.errors import InvalidOptionError
from deltakit.names import ModuleName, matches_peft_pattern

Weighting = Literal["uniform", "absolute", "relative"]  # defaults.WEIGHTINGS; the default: defaults.DEFAULT_WEIGHTING




@dataclass(frozen=True)
class ModelSize:
    """What a budget is measured against: the model's parameter count and the bytes of one stored factor element."""

    params: int
    bytes_per_param: int
    out_ins: tuple[tuple[int, int], ...] = ()  # (out, in) of every module that may be factorized, from headers
    carried_bytes: int = 0  # of the tensors the adapter carries whole; a byte budget pays for them first
    reserved_bytes: int = 0  # of the file that is neither factors nor carried tensors (its header)


class RankPolicy(Protocol):
    label: str  # a short name for output paths: "16", "auto", "energy", "budget"
    defers: bool  # whether ``choose`` leaves the ranks to ``finish``
    file_bytes: int | None  # the adapter file's size the policy must stay within (a byte budget), or None

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        """How many leading triplets to compute for this module."""

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float,
               out_in: tuple[int, int]) -> int | None:
        """Phase 1: the module's rank from its singular values, or None to decide in :meth:`finish`."""

    def is_requested(self, module: ModuleName) -> bool:
        """Whether the module's rank is one the user asked for (worth a note when clamped), not a cap."""

    def check_size(self, size: ModelSize) -> None:
        """Raise what the model's size alone shows to be wrong, before any math."""

    def finish(self, spectra: list[ModuleSpectrum], size: ModelSize) -> tuple[list[int], dict | None]:
        """Phase 2: the ranks of the modules ``choose`` deferred (in order; :data:`CARRIED_WHOLE` for a module
        to carry whole instead), and a summary for the report."""

    def floor_ranks(self, spectra: list[ModuleSpectrum]) -> list[int]:
        """The smallest ranks ``finish`` can give the deferred modules."""


class _PerModule:
    """The second phase of a policy that decides every module in the first."""

    defers = False
    file_bytes = None

    def is_requested(self, module: ModuleName) -> bool:
        return False

    def check_size(self, size: ModelSize) -> None:
        pass

    def finish(self, spectra: list[ModuleSpectrum], size: ModelSize) -> tuple[list[int], dict | None]:
        return [], None

    def floor_ranks(self, spectra: list[ModuleSpectrum]) -> list[int]:
        return []


@dataclass(frozen=True)
class FixedRank(_PerModule):
    """The same rank everywhere (clamped to min(out, in) by the caller, which reports it)."""

    rank: int

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidOptionError(f"rank must be at least 1, got {self.rank}")

    @property
    def label(self) -> str:
        return str(self.rank)

    def is_requested(self, module: ModuleName) -> bool:
        return True

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        return self.rank

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float,
               out_in: tuple[int, int] | None = None) -> int:
        return min(self.rank, len(s))


@dataclass(frozen=True)
class EnergyRank(_PerModule):
    """The smallest rank whose triplets hold at least ``fraction`` of ‖ΔW‖², capped at ``max_rank``."""

    fraction: float
    max_rank: int
    label = "energy"

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise InvalidOptionError(f"energy fraction must be in (0, 1], got {self.fraction}")
        if self.max_rank < 1:
            raise InvalidOptionError(f"max rank must be at least 1, got {self.max_rank}")

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        return self.max_rank

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float,
               out_in: tuple[int, int] | None = None) -> int:
        return rank_for_energy(s, total_energy, self.fraction)


def rank_for_energy(s: torch.Tensor, total_energy: float, fraction: float) -> int:
    """Smallest k with Σ_{i≤k} s_i² ≥ fraction · total_energy; len(s) if the computed triplets fall short."""
    if total_energy <= 0.0 or len(s) == 0:
        return min(1, len(s))
    kept = torch.cumsum(s.double() ** 2, dim=0)
    # A tiny tolerance so that fraction = 1.0 is reachable despite rounding in the cumulative sum.
    reached = torch.nonzero(kept >= fraction * total_energy * (1.0 - 1e-9))
    return int(reached[0]) + 1 if len(reached) else len(s)


@dataclass(frozen=True)
class NoiseFloor:
    """What :func:`noise_floor` found for one matrix.

    Attributes:
        rank: how many singular values lie above the threshold (0 when none does).
        sigma: the estimated standard deviation of the noise entries.
        threshold: the singular-value threshold τ = λ*(β)·√n·sigma (at least the fp32 rounding floor).
    """

    rank: int
    sigma: float
    threshold: float


def optimal_threshold_coefficient(beta: float) -> float:
    """Gavish & Donoho's λ*(β) for a known noise level: τ = λ*(β)·√n·σ for an m×n matrix, m ≤ n, β = m/n.

    λ*(β) = √(2(β+1) + 8β / (β+1 + √(β²+14β+1))); 4/√3 ≈ 2.309 for a square matrix
    (Gavish & Donoho 2014, "The optimal hard threshold for singular values is 4/√3", eq. (11)).
    """
    return math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta * beta + 14 * beta + 1)))


# Singular values below s_1 · max(m, n) · ε are rounding noise of an fp32 SVD (the tolerance numpy's
# matrix_rank uses), whatever the noise estimate says.
_FP32_EPS = float(torch.finfo(torch.float32).eps)


def noise_floor(s: torch.Tensor, total_energy: float, out_in: tuple[int, int]) -> NoiseFloor:
    """Count the singular values above the noise floor of an m×n matrix, knowing only the leading ones.

    Model: ΔW = X + σZ with X of low rank r and Z of i.i.d. standard entries. Gavish & Donoho's optimal hard
    threshold for a known σ is τ = λ*(β)·√n·σ (:func:`optimal_threshold_coefficient`; m ≤ n after a transpose,
    β = m/n). Their rule for an unknown σ uses the median of *all* singular values, which a truncated SVD does
    not give. What is known exactly is ‖ΔW‖², so σ is estimated from the energy outside the leading r triplets:

        σ̂²(r) = (‖ΔW‖² − Σ_{i≤r} s_i²) / ((m − r)(n − r)).

    The r leading triplets take up the signal plus the noise lying in the r-dimensional column and row spaces
    of the signal, r(m + n − r) of the mn noise degrees of freedom, which leaves (m − r)(n − r) in the rest.
    r is unknown: start from r = 0 (σ̂ then includes the signal, so it is too large and the count too small),
    recount the values above τ(σ̂(r)), and repeat until the count stops changing. The estimate does not depend
    on how many triplets were computed, as long as more were computed than are kept.

    Limits:
        - It assumes white noise (i.i.d. entries of one variance). A fine-tuning delta is not signal plus white
          noise: its spectrum usually decays with no gap, and the "floor" is then the level below which the
          spectrum looks like an isotropic random matrix holding the same residual energy.
        - No method can tell a spike from noise below the BBP limit θ = β^¼·√n·σ; this threshold keeps a signal
          value θ only when its noisy singular value exceeds τ (for a square matrix θ > √3·√n·σ ≈ 0.87× the
          noise bulk edge (√m + √n)·σ). Weak spikes near the limit also leak some energy into the residual,
          so σ̂ errs slightly high there.
        - The theory is asymptotic (m and n large). A matrix with only a few rows or columns whose singular
          values are all alike (a 3-position embedding, BERT's 2 token types) looks like pure noise and gets
          rank 0, though its change may matter; give such modules a rank with --rank-pattern.
        - If every computed value lies above the threshold, the count is len(s): the true floor may be lower
          still; compute more triplets to know.
        - Values below s_1·max(m, n)·ε_fp32 are rounding noise of the fp32 SVD and never count.

    Args:
        s: leading singular values, descending (any float dtype, CPU or not).
        total_energy: ‖ΔW‖_F², exactly.
        out_in: the matrix shape (out, in).

    Returns:
        The :class:`NoiseFloor`: rank (0 when nothing stands above the noise), σ̂ and τ.
    """
    m, n = min(out_in), max(out_in)
    values = s.detach().double().cpu()
    if len(values) == 0 or total_energy <= 0.0 or float(values[0]) <= 0.0:
        return NoiseFloor(0, 0.0, 0.0)
    coefficient = optimal_threshold_coefficient(m / n)
    rounding_floor = float(values[0]) * n * _FP32_EPS
    kept = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(values.square(), dim=0)])  # (k + 1,)
    rank, sigma, threshold = 0, 0.0, 0.0
    # Each pass takes the values just counted out of the noise estimate, which lowers σ̂ and may admit more;
    # a few passes reach the fixed point. The bound only guards against a cycle.
    for _ in range(len(values) + 1):
        if rank >= m:
            break
        sigma = math.sqrt(max(total_energy - float(kept[rank]), 0.0) / ((m - rank) * (n - rank)))
        threshold = max(coefficient * math.sqrt(n) * sigma, rounding_floor)
        count = int((values > threshold).sum())
        if count == rank:
            break
        rank = count
    return NoiseFloor(rank, sigma, threshold)


@dataclass(frozen=True)
class NoiseFloorRank(_PerModule):
    """``--rank auto``: per module, the singular values above the estimated noise floor (:func:`noise_floor`),
    at least 1 and at most ``max_rank``."""

    max_rank: int = DEFAULT_MAX_RANK
    label = "auto"

    def __post_init__(self) -> None:
        if self.max_rank < 1:
            raise InvalidOptionError(f"max rank must be at least 1, got {self.max_rank}")

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        return self.max_rank

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float, out_in: tuple[int, int]) -> int:
        # A module whose whole delta looks like noise still gets rank 1: PEFT has no rank 0.
        return max(1, min(noise_floor(s, total_energy, out_in).rank, self.max_rank, len(s)))


@dataclass(frozen=True)
class PatternRanks(_PerModule):
    """Per-module overrides, matched with PEFT's own rule for ``rank_pattern`` keys (the first match wins),
    falling back to ``default`` (a per-module policy)."""

    patterns: tuple[tuple[str, int], ...]
    default: RankPolicy = field(default_factory=lambda: FixedRank(DEFAULT_RANK))

    @property
    def label(self) -> str:
        return self.default.label

    def is_requested(self, module: ModuleName) -> bool:
        return self.override(module) is not None or self.default.is_requested(module)

    def __post_init__(self) -> None:
        for pattern, rank in self.patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidOptionError(f"rank pattern {pattern!r} is not a valid regex: {e}") from e
            if rank < 1:
                raise InvalidOptionError(f"rank pattern {pattern!r}: rank must be at least 1, got {rank}")

    def override(self, module: ModuleName) -> int | None:
        for pattern, rank in self.patterns:
            if matches_peft_pattern(pattern, module):
                return rank
        return None

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        rank = self.override(module)
        return rank if rank is not None else self.default.compute_rank(module, out_in)

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float,
               out_in: tuple[int, int] | None = None) -> int:
        rank = self.override(module)
        return min(rank, len(s)) if rank is not None else self.default.choose(module, s, total_energy, out_in)


# ---------------------------------------------------------------------------------------------------------------
# Global budget


@dataclass(frozen=True)
class ModuleSpectrum:
    """One module's leading singular values, as the budget allocator needs them.

    Attributes:
        module: the module name.
        out_in: its (out, in) shape in PEFT's orientation; one rank costs out + in adapter parameters.
        s: the leading singular values computed, descending; len(s) is the most this module can get.
        total_energy: ‖ΔW‖_F², exactly (not just the computed part).
        copies: how many times the adapter file stores its factors (2 for an input embedding whose tied output
            head gets them too, transposed): a budget pays for every copy.
        whole_cost: what carrying the module's tensors whole instead of its factors costs, in the unit of
            :attr:`cost_per_rank` (exact: no error); None where it cannot be carried whole.
    """

    module: ModuleName
    out_in: tuple[int, int]
    s: torch.Tensor
    total_energy: float
    copies: int = 1
    whole_cost: int | None = None

    @property
    def cost_per_rank(self) -> int:
        """Adapter parameters one more rank costs, every stored copy included."""
        return sum(self.out_in) * self.copies


# The rank the allocator gives a module that costs less carried whole than as factors (PEFT has no rank 0).
CARRIED_WHOLE = 0

# Above this many cells ((budget / gcd of the costs) × candidate triplets) the exact dynamic programme would cost
# more than the greedy pick is worth; about 0.2 s and 40 MB at the limit.
_EXACT_MAX_CELLS = 20_000_000


@dataclass(frozen=True)
class BudgetRanks:
    """Per-module ranks that minimise the total squared reconstruction error under a parameter budget.

    Objective: with r_i triplets kept, module i's squared error is ‖ΔW_i‖² − Σ_{k≤r_i} s_{i,k}² (Eckart–Young),
    and its factors cost r_i·(out_i + in_i) parameters. ``allocate`` maximises the kept energy
    Σ_i Σ_{k≤r_i} w_i·s_{i,k}² subject to Σ_i r_i·(out_i + in_i) ≤ params and
    min(min_rank, cap_i) ≤ r_i ≤ cap_i = min(max_rank, out_i, in_i, len(s_i)), where w_i = 1 (``absolute``:
    the total squared error) or 1/‖ΔW_i‖² (``relative``: the sum of each module's squared relative error, so a
    module that changed little counts as much as one that changed a lot).

    A module that can be carried whole (``whole_cost``) has one more choice: all of its energy kept for
    ``whole_cost``; it gets :data:`CARRIED_WHOLE` where that is chosen, and always where its factors would cost
    more (factors are then never larger than the tensor they stand for).

    Algorithm. Each module's marginal gains w_i·s_{i,k}² do not increase with k (singular values are sorted),
    so its kept energy G_i(r) is concave in r. For any λ ≥ 0, the r_i maximising G_i(r_i) − λ·c_i·r_i
    (c_i = out_i + in_i) is "every k with w_i·s_{i,k}²/c_i ≥ λ": a prefix, by concavity. Taking triplets by
    decreasing w·s²/c, every prefix P of that order (with λ the ratio of its last triplet) is such a maximiser,
    so no allocation costing at most C(P) keeps more energy: for any r' with C(r') ≤ C(P),
    G(r') ≤ G(P) − λ·(C(P) − C(r')) ≤ G(P). The greedy pick is thus optimal for the budget it spends. It is *not*
    always optimal for the budget given: when the next triplet does not fit, the money left may buy a better
    mix of cheaper ones (a knapsack problem, NP-hard in general). Greedy here then skips what does not fit and
    goes on with cheaper triplets; its kept energy is within the gain of the first triplet it skipped of the
    optimum, since the LP relaxation (the prefix plus a fraction of that triplet) bounds the optimum. With
    equal costs (every module of one shape) it is exact.

    So ``allocate`` solves the problem exactly by dynamic programming over the budget, in units of the gcd of
    the costs, whenever that table has at most ``_EXACT_MAX_CELLS`` cells (small models, small budgets), and
    uses the greedy pick otherwise (a real LLM: hundreds of modules, budgets of millions of units), where the
    gap above is a single triplet out of thousands.

    Attributes:
        params: total adapter parameters allowed, Σ rank_i·(out_i + in_i).
        min_rank: every module gets at least this (or its cap, if smaller).
        max_rank: no module gets more; also how many triplets to compute per module.
        weighting: ``absolute`` or ``relative`` (see above), or ``uniform``: the same rank r in every module
            (min(r, cap_i), at least the floor), the largest that fits; what uniform rank would store, at the size
            asked for (the default: see :data:`DEFAULT_WEIGHTING`).
    """

    params: int
    min_rank: int = 1
    max_rank: int = DEFAULT_MAX_RANK
    weighting: Weighting = "absolute"

    def __post_init__(self) -> None:
        if self.params < 1:
            raise InvalidOptionError(f"budget must be at least 1 parameter, got {self.params}")
        if self.min_rank < 1:
            raise InvalidOptionError(f"min rank must be at least 1, got {self.min_rank}")
        if self.max_rank < self.min_rank:
            raise InvalidOptionError(f"max rank {self.max_rank} is below min rank {self.min_rank}")
        if self.weighting not in WEIGHTINGS:
            raise InvalidOptionError(f"unknown budget weighting {self.weighting!r}; use {', '.join(WEIGHTINGS)}")

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        return self.max_rank

    def allocate(self, spectra: list[ModuleSpectrum]) -> list[int]:
        """Choose every module's rank at once.

        Args:
            spectra: one per factorized module, each with its leading singular values (at least ``max_rank``
                of them, or min(out, in), for the result to be optimal over all ranks up to ``max_rank``).

        Returns:
            The ranks, in the order of ``spectra``.

        Raises:
            InvalidOptionError: the budget cannot pay for ``min_rank`` in every module.
        """
        caps = [min(self.max_rank, *spectrum.out_in, len(spectrum.s)) for spectrum in spectra]
        floors = self.floor_ranks(spectra)
        costs = [spectrum.cost_per_rank for spectrum in spectra]
        floor_params = _params_of(spectra, floors)
        if floor_params > self.params:
            raise InvalidOptionError(
                f"a budget of {self.params:,} parameters cannot pay for rank {self.min_rank} in each of the "
                f"{len(spectra)} modules ({floor_params:,} parameters): give at least {floor_params}params"
                + _lower_min_rank(self.min_rank))
        if self.weighting == "uniform":
            return _allocate_uniform(spectra, caps, floors, self.params)
        is_whole = [floor == CARRIED_WHOLE for floor in floors]
        gains = [np.zeros(0) if whole else _weighted_energies(spectrum, self.weighting)[floor:cap]
                 for spectrum, floor, cap, whole in zip(spectra, floors, caps, is_whole)]
        # Carrying whole instead of the floor's factors: its extra cost, and the weighted energy the factors lack.
        wholes = [None if whole or spectrum.whole_cost is None
                  else (spectrum.whole_cost - floor * cost,
                        _weighted_total(spectrum, self.weighting) - float(_weighted_energies(spectrum, self.weighting)
                                                                          [:floor].sum()))
                  for spectrum, floor, cost, whole in zip(spectra, floors, costs, is_whole)]
        # Past what every remaining triplet (or carrying whole) costs, more budget changes nothing.
        budget = min(self.params - floor_params,
                     sum(max(len(g) * c, w[0] if w else 0) for g, c, w in zip(gains, costs, wholes)))
        unit = math.gcd(*[c for g, c in zip(gains, costs) if len(g)], *[w[0] for w in wholes if w]) or 1
        cells = (budget // unit + 1) * sum(len(g) + (w is not None) for g, w in zip(gains, wholes))
        if cells <= _EXACT_MAX_CELLS:
            extra = _allocate_exact(gains, costs, wholes, budget, unit)
        else:
            extra = _allocate_greedy(gains, costs, budget)
        ranks = [CARRIED_WHOLE if whole or e is None else f + e for f, e, whole in zip(floors, extra, is_whole)]
        # Factors dearer than carrying the module whole are never kept: the switch only frees budget.
        return [CARRIED_WHOLE if s.whole_cost is not None and rank * s.cost_per_rank > s.whole_cost else rank
                for s, rank in zip(spectra, ranks)]

    def floor_ranks(self, spectra: list[ModuleSpectrum]) -> list[int]:
        """Every module's smallest allocation: ``min_rank`` (at most its cap), or :data:`CARRIED_WHOLE` where
        that is cheaper than those factors."""
        floors = []
        for spectrum in spectra:
            floor = min(self.min_rank, self.max_rank, *spectrum.out_in, len(spectrum.s))
            is_whole = spectrum.whole_cost is not None and spectrum.whole_cost < floor * spectrum.cost_per_rank
            floors.append(CARRIED_WHOLE if is_whole else floor)
        return floors


def _params_of(spectra: list[ModuleSpectrum], ranks: list[int]) -> int:
    """What these ranks cost, carried-whole modules at their ``whole_cost``."""
    return sum(s.whole_cost if rank == CARRIED_WHOLE else rank * s.cost_per_rank for s, rank in zip(spectra, ranks))


def _lower_min_rank(min_rank: int) -> str:
    return ", or lower --min-rank" if min_rank > 1 else ""


def _weighted_total(spectrum: ModuleSpectrum, weighting: Weighting) -> float:
    """w·‖ΔW‖²: what carrying the module whole keeps."""
    if weighting == "absolute":
        return spectrum.total_energy
    return 1.0 if spectrum.total_energy > 0 else 0.0


def _weighted_energies(spectrum: ModuleSpectrum, weighting: Weighting) -> np.ndarray:
    """w·s_k² for each computed triplet: what keeping it takes off the objective."""
    energies = spectrum.s.detach().double().cpu().numpy() ** 2
    if weighting == "absolute":
        return energies
    return energies / spectrum.total_energy if spectrum.total_energy > 0 else np.zeros_like(energies)


def _allocate_uniform(spectra: list[ModuleSpectrum], caps: list[int], floors: list[int], params: int) -> list[int]:
    """The largest rank r such that every module at min(r, its cap) (at least its floor; carried whole where
    that costs less) fits the budget."""
    def ranks(r: int) -> list[int]:
        chosen = [max(floor, min(r, cap)) for floor, cap in zip(floors, caps)]
        return [CARRIED_WHOLE if s.whole_cost is not None and s.whole_cost < k * s.cost_per_rank else k
                for s, k in zip(spectra, chosen)]

    rank = max(floors, default=1)
    while rank < max(caps, default=0) and _params_of(spectra, ranks(rank + 1)) <= params:
        rank += 1
    return ranks(rank)


def _allocate_greedy(gains: list[np.ndarray], costs: list[int], budget: int) -> list[int]:
    """Triplets by decreasing gain per parameter, skipping those that no longer fit (see BudgetRanks)."""
    module_of = np.concatenate([np.full(len(g), i) for i, g in enumerate(gains)] or [np.zeros(0, int)])
    flat = np.concatenate(gains or [np.zeros(0)])
    ratios = flat / np.asarray(costs, dtype=np.float64)[module_of] if len(flat) else flat
    # A stable sort keeps each module's triplets in rank order where ratios tie, so every module's picks
    # stay a prefix of its spectrum.
    order = np.argsort(-ratios, kind="stable")
    extra, remaining, cheapest = [0] * len(gains), budget, min(costs, default=0)
    for index in order:
        if remaining < cheapest or flat[index] <= 0.0:
            break  # nothing fits any more, or the rest keeps no energy
        module = int(module_of[index])
        if costs[module] <= remaining:
            extra[module] += 1
            remaining -= costs[module]
    return extra


def _allocate_exact(gains: list[np.ndarray], costs: list[int], wholes: list[tuple[int, float] | None],
                    budget: int, unit: int) -> list[int | None]:
    """Max Σ_i G_i(t_i) subject to Σ_i t_i·c_i ≤ budget, by dynamic programming over the budget in ``unit``s;
    a module with a ``wholes`` entry (extra cost, gain) may instead be carried whole (None in the result).

    best[b] is the most energy the modules seen so far keep for at most b units; picks[i][b] is module i's
    extra rank in that optimum (len(gains[i]) + 1: carried whole), for the backtrack. Ties keep the smaller rank.
    """
    capacity = budget // unit
    best = np.zeros(capacity + 1)
    picks = []
    for module_gains, cost, whole in zip(gains, costs, wholes):
        step = cost // unit
        prefix = np.concatenate([[0.0], np.cumsum(module_gains)])  # G(t), t = 0..len
        options = [(extra * step, prefix[extra], extra) for extra in range(1, len(module_gains) + 1)]
        if whole is not None:
            options.append((whole[0] // unit, whole[1], len(module_gains) + 1))
        updated = best.copy()
        pick = np.zeros(capacity + 1, dtype=np.min_scalar_type(len(module_gains) + 1))
        for shift, gain, choice in options:
            if shift > capacity:
                continue
            candidate = best[: capacity + 1 - shift] + gain
            is_better = candidate > updated[shift:]
            updated[shift:][is_better] = candidate[is_better]
            pick[shift:][is_better] = choice
        best = updated
        picks.append(pick)
    extra_ranks: list[int | None] = [0] * len(gains)
    remaining = capacity
    for i in reversed(range(len(gains))):
        choice = int(picks[i][remaining])
        if choice == len(gains[i]) + 1:
            extra_ranks[i] = None
            remaining -= wholes[i][0] // unit
        else:
            extra_ranks[i] = choice
            remaining -= choice * (costs[i] // unit)
    return extra_ranks


def adapter_params(ranks: list[int], out_ins: list[tuple[int, int]]) -> int:
    """Σ rank_i·(out_i + in_i): the number of factor parameters (A and B) of these ranks."""
    return sum(rank * (out + inp) for rank, (out, inp) in zip(ranks, out_ins))


def predicted_squared_error(spectra: list[ModuleSpectrum], ranks: list[int]) -> float:
    """Σ_i (‖ΔW_i‖² − Σ_{k≤r_i} s_{i,k}²): the total squared reconstruction error of a truncated SVD at these
    ranks (Eckart–Young), predicted from the spectra alone; 0 for a module :data:`CARRIED_WHOLE`."""
    total = 0.0
    for spectrum, rank in zip(spectra, ranks):
        if rank == CARRIED_WHOLE:
            continue  # exact
        kept = float(spectrum.s[:rank].double().square().sum())
        total += max(spectrum.total_energy - kept, 0.0)
    return total


# ---------------------------------------------------------------------------------------------------------------
# Command-line values


def parse_rank(text: str) -> int | Literal["auto"]:
    """``--rank``: a positive integer, or ``auto`` (:class:`NoiseFloorRank`).

    Raises:
        InvalidOptionError: anything else.
    """
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    if not value.isdigit() or int(value) < 1:
        raise InvalidOptionError(f"--rank {text!r}: use a positive integer or 'auto'")
    return int(value)


def parse_ranks(text: str) -> tuple[int, ...]:
    """``inspect --ranks``: comma-separated positive integers, e.g. ``8,16,32``.

    Raises:
        InvalidOptionError: an item is not a positive integer.
    """
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and int(item) >= 1 for item in items):
        raise InvalidOptionError(f"--ranks {text!r}: use comma-separated positive integers, e.g. 8,16,32")
    return tuple(int(item) for item in items)


def parse_rank_pattern(text: str) -> tuple[str, int]:
    """``'REGEX=R'`` → ``(REGEX, R)``; the last ``=`` splits, so the regex may contain ``=``."""
    pattern, sep, rank = text.rpartition("=")
    if not sep or not pattern or not rank.strip().isdigit():
        raise InvalidOptionError(f"rank pattern {text!r} must look like REGEX=RANK, e.g. 'mlp\\..*=32'")
    return pattern, int(rank)


_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_BYTES = re.compile(rf"{_NUMBER}\s*([kmgt]i?b|b)", re.IGNORECASE)
_PERCENT = re.compile(rf"{_NUMBER}\s*%")
_PARAMS = re.compile(rf"{_NUMBER}\s*([kmb]?)\s*params?", re.IGNORECASE)
_BUDGET_EXAMPLES = "e.g. 50MB, 1.5GiB, 2%, 3Mparams or 1200000 (parameters)"


def parse_budget(text: str, *, model_params: int, bytes_per_param: int, carried_bytes: int = 0) -> int:
    """``--budget``: a size for the adapter's factors, as a number of parameters.

    Accepted forms (one unambiguous spelling each; a unit-less number is always a parameter count):

    - bytes of the adapter's tensors: ``50MB``, ``1.5GB``, ``200KiB`` (B, KB, MB, GB, TB are powers of 1000;
      KiB, MiB, GiB, TiB of 1024; case does not matter): what the tensors carried whole leave, divided by
      ``bytes_per_param``;
    - a share of the model: ``2%`` of ``model_params``;
    - a parameter count: ``1200000``, or with a suffix and the word ``params``: ``3Mparams``, ``500k params``,
      ``1.5Bparams`` (k = 10³, M = 10⁶, B = 10⁹). A bare ``3M`` is refused: megabytes or millions?

    A percentage or parameter count sizes only the factors (A and B); a size in bytes is the adapter's real size,
    so the tensors carried whole (norms, biases, heads: ``carried_bytes``) take their share of it first.

    Args:
        text: the option value.
        model_params: the model's parameter count, for percentages.
        bytes_per_param: bytes per stored factor element (1 at 8 bits, 2 for float16/bfloat16, 4 for float32).
        carried_bytes: bytes of the tensors the adapter carries whole.

    Returns:
        The budget in parameters, rounded down, at least 1.

    Raises:
        InvalidOptionError: the text matches no form, or gives less than one parameter.
    """
    value = text.strip()
    if (size := byte_size(value)) is not None:
        if carried_bytes and size - carried_bytes < bytes_per_param:
            raise InvalidOptionError(f"--budget {text!r} leaves no room for factors after the {carried_bytes:,} bytes "
                                     "of tensors carried exactly (norms, biases, ...); raise it, or use --no-carry")
        params = (size - carried_bytes) / bytes_per_param
    elif match := _PERCENT.fullmatch(value):
        share = float(match[1])
        if not 0.0 < share <= 100.0:
            raise InvalidOptionError(f"--budget {text!r}: a percentage must be in (0, 100]")
        params = share / 100.0 * model_params
    elif match := _PARAMS.fullmatch(value):
        params = float(match[1]) * _COUNT_UNITS[match[2].lower()]
    elif value.isdigit():
        params = int(value)
    elif re.fullmatch(rf"{_NUMBER}\s*[kmgt]", value, re.IGNORECASE):
        raise InvalidOptionError(f"--budget {text!r} is ambiguous: write {value}B for bytes or {value}params for "
                                 "a parameter count")
    else:
        raise InvalidOptionError(f"--budget {text!r} is not a size; {_BUDGET_EXAMPLES}")
    if params < 1:
        raise InvalidOptionError(f"--budget {text!r} is less than one parameter")
    return int(params)


def byte_size(text: str) -> int | None:
    """A ``--budget`` given in bytes (``50MB``, ``200KiB``), as a whole number of bytes; None for other forms."""
    match = _BYTES.fullmatch(text.strip())
    return int(float(match[1]) * _BYTE_UNITS[match[2].lower()]) if match else None


def budget_for_avg_rank(avg_rank: float, out_ins: list[tuple[int, int]]) -> int:
    """``--avg-rank R``: the size of a uniform rank-R adapter over these modules, Σ min(R, out, in)·(out + in)
    (R clamped to each module's min(out, in), as a fixed rank is), so that a budget allocation can be compared
    with the uniform rank at exactly equal size.

    Raises:
        InvalidOptionError: R is not positive.
    """
    if not avg_rank > 0:
        raise InvalidOptionError(f"--avg-rank must be positive, got {avg_rank}")
    return int(sum(min(avg_rank, out, inp) * (out + inp) for out, inp in out_ins))


# ---------------------------------------------------------------------------------------------------------------
# Budget as a policy, and the one constructor of policies


@dataclass(frozen=True)
class Budget:
    """``--budget`` / ``--avg-rank``: a total size for the factors, split across modules once all are seen.

    Phase 1 computes ``max_rank`` triplets of every module and decides nothing (the caller keeps each module's
    SVD aside); phase 2 turns the request into parameters (a percentage needs the model size, an average rank
    the changed modules' shapes) and allocates them with :class:`BudgetRanks`.
    """

    text: str | None
    avg_rank: float | None
    min_rank: int = 1
    max_rank: int = DEFAULT_MAX_RANK
    weighting: Weighting = DEFAULT_WEIGHTING
    label = "budget"
    defers = True

    def __post_init__(self) -> None:
        BudgetRanks(1, self.min_rank, self.max_rank, self.weighting)  # checks the bounds now

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        return self.max_rank  # the allocation picks from these

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float, out_in: tuple[int, int]) -> None:
        return None

    def is_requested(self, module: ModuleName) -> bool:
        return False

    def check_size(self, size: ModelSize) -> None:
        """Refuse a budget that cannot pay for ``min_rank`` in every module that may be factorized (its floor),
        saying the smallest that can; only the headers are known, so every such module is assumed to change."""
        if self.text is None:
            return
        params = parse_budget(self.text, model_params=size.params, bytes_per_param=size.bytes_per_param)
        floor = sum(min(self.min_rank, self.max_rank, *out_in) * sum(out_in) for out_in in size.out_ins)
        if floor > params:
            raise InvalidOptionError(
                f"--budget {self.text} = {params:,} factor parameters cannot pay for rank {self.min_rank} in each of "
                f"the {len(size.out_ins)} modules that may change ({floor:,} parameters): give at least "
                f"{floor * size.bytes_per_param}B ({floor}params)" + _lower_min_rank(self.min_rank))

    @property
    def file_bytes(self) -> int | None:
        """The adapter file's size a byte budget allows (None for a share of the model, a parameter count or an
        average rank)."""
        return byte_size(self.text) if self.text is not None else None

    def floor_ranks(self, spectra: list[ModuleSpectrum]) -> list[int]:
        """Every module's smallest allocation (:meth:`BudgetRanks.floor_ranks`)."""
        return BudgetRanks(1, self.min_rank, self.max_rank, self.weighting).floor_ranks(spectra)

    def finish(self, spectra: list[ModuleSpectrum], size: ModelSize) -> tuple[list[int], dict | None]:
        if self.avg_rank is not None:
            params = int(sum(min(self.avg_rank, *s.out_in) * s.cost_per_rank for s in spectra))
        else:
            params = parse_budget(self.text, model_params=size.params, bytes_per_param=size.bytes_per_param,
                                  carried_bytes=size.carried_bytes + size.reserved_bytes)
        allocator = BudgetRanks(params, self.min_rank, self.max_rank, self.weighting)
        ranks = allocator.allocate(spectra) if spectra else []
        total = sum(s.total_energy for s in spectra)
        predicted = predicted_squared_error(spectra, ranks)
        return ranks, {
            "requested": f"--avg-rank {self.avg_rank:g}" if self.avg_rank is not None else f"--budget {self.text}",
            "params": params,
            "params_used": _params_of(spectra, ranks),
            "carried_whole": sum(rank == CARRIED_WHOLE for rank in ranks),
            "bytes_per_param": size.bytes_per_param,
            "carried_bytes": size.carried_bytes,
            "header_bytes": size.reserved_bytes,
            "weighting": self.weighting,
            "min_rank": self.min_rank,
            "max_rank": self.max_rank,
            "predicted_relative_error": (predicted / total) ** 0.5 if total > 0 else 0.0,
        }


def rank_policy(
    rank: int | Literal["auto"] = DEFAULT_RANK,
    *,
    rank_pattern: list[tuple[str, int]] | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    budget: str | None = None,
    avg_rank: float | None = None,
    budget_weighting: Weighting = DEFAULT_WEIGHTING,
    min_rank: int | None = None,
) -> RankPolicy:
    """The policy extract's rank options describe: a fixed rank, ``auto`` (noise floor), an energy target, or a
    global budget; the last three capped at ``max_rank`` (default :data:`DEFAULT_MAX_RANK`). Pattern overrides
    apply on top of all but a budget.

    Raises:
        InvalidOptionError: options that contradict each other or do not apply, or values out of range.
    """
    given = [name for name, present in (("--energy", energy is not None), ("--budget", budget is not None),
                                        ("--avg-rank", avg_rank is not None), ("--rank auto", rank == "auto"))
             if present]
    if len(given) > 1:
        raise InvalidOptionError(f"{' and '.join(given)} each choose the ranks; give only one")
    cap = max_rank if max_rank is not None else DEFAULT_MAX_RANK
    if budget is not None or avg_rank is not None:
        if rank_pattern:
            raise InvalidOptionError(f"{given[0]} allocates every module's rank; it cannot be combined with "
                                     "--rank-pattern (use --include/--exclude, --min-rank, --max-rank)")
        return Budget(budget, avg_rank, min_rank or 1, cap, budget_weighting)
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
