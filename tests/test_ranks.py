"""Rank policies against theory: PEFT's pattern order, the noise floor of planted signal + Gaussian noise, and the
budget allocator against brute force over every rank choice."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from builders import low_rank_delta, signal_plus_noise, write_safetensors_pair

from deltakit.math import ranks
from deltakit.errors import InvalidOptionError
from deltakit.math.ranks import (
    CARRIED_WHOLE,
    BudgetRanks,
    EnergyRank,
    FixedRank,
    ModuleSpectrum,
    NoiseFloorRank,
    PatternRanks,
    adapter_params,
    budget_for_avg_rank,
    noise_floor,
    optimal_threshold_coefficient,
    parse_budget,
    parse_rank,
    parse_rank_pattern,
    parse_ranks,
    predicted_squared_error,
)

# ------------------------------------------------------------------------------------------------ per-module policies


def test_fixed_rank_is_capped_by_the_computed_triplets():
    policy = FixedRank(8)
    assert policy.compute_rank("m", (64, 32)) == 8
    assert policy.choose("m", torch.ones(8), 8.0) == 8
    assert policy.choose("m", torch.ones(5), 5.0, (5, 40)) == 5
    with pytest.raises(InvalidOptionError, match="at least 1"):
        FixedRank(0)


def test_energy_rank_picks_the_smallest_rank_reaching_the_fraction():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])  # energies 9, 4, 1, 1 of a total 16 (one more unit not computed)
    policy = EnergyRank(0.8, max_rank=4)
    assert policy.compute_rank("m", (10, 10)) == 4
    assert policy.choose("m", s, 16.0) == 2  # 13/16 = 0.8125
    assert EnergyRank(0.82, 4).choose("m", s, 16.0) == 3
    assert EnergyRank(1.0, 4).choose("m", s, 15.0) == 4
    assert EnergyRank(1.0, 4).choose("m", s, 16.0) == 4  # never reached: all computed triplets
    with pytest.raises(InvalidOptionError, match="fraction"):
        EnergyRank(0.0, 4)


def test_pattern_ranks_follow_peft_first_match_order():
    """PEFT's get_pattern_key takes the first key in dict order that matches, not the most specific one."""
    s = torch.ones(32)
    first_loose = PatternRanks((("lin", 2), (r"a\.lin", 6)), FixedRank(16))
    first_tight = PatternRanks(((r"a\.lin", 6), ("lin", 2)), FixedRank(16))
    assert first_loose.choose("x.a.lin", s, 32.0) == 2
    assert first_tight.choose("x.a.lin", s, 32.0) == 6
    assert first_tight.choose("x.b.lin", s, 32.0) == 2
    assert first_tight.compute_rank("x.a.lin", (64, 64)) == 6
    # No match: the default policy decides, including one that needs the shape.
    assert first_tight.compute_rank("x.mlp", (64, 64)) == 16
    assert first_tight.choose("x.mlp", s, 32.0, (64, 64)) == 16
    assert PatternRanks((("lin", 2),), NoiseFloorRank(8)).choose("mlp", torch.tensor([5.0, 1e-2]), 26.0, (40, 40)) == 1
    with pytest.raises(InvalidOptionError, match="not a valid regex"):
        PatternRanks((("(", 2),))


def test_parse_rank_pattern_and_rank():
    assert parse_rank_pattern(r"mlp\..*=32") == (r"mlp\..*", 32)
    assert parse_rank_pattern("a=b=4") == ("a=b", 4)
    for bad in ("mlp", "=4", "mlp=x"):
        with pytest.raises(InvalidOptionError, match="REGEX=RANK"):
            parse_rank_pattern(bad)
    assert parse_rank("16") == 16
    assert parse_rank(" Auto ") == "auto"
    for bad in ("0", "-1", "1.5", "max"):
        with pytest.raises(InvalidOptionError, match="positive integer or 'auto'"):
            parse_rank(bad)
    assert parse_ranks("8, 16,32") == (8, 16, 32)
    for bad in ("", "8,,16", "8,0", "8;16", "x"):
        with pytest.raises(InvalidOptionError, match="comma-separated positive integers"):
            parse_ranks(bad)


# ------------------------------------------------------------------------------------------------ noise floor


def _signal_plus_noise(shape: tuple[int, int], rank: int, snr: float, seed: int, sigma: float = 0.01) -> torch.Tensor:
    return signal_plus_noise(shape, rank, snr, sigma, seed).float()


def _leading(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The leading k singular values (as a truncated SVD gives them) and the exact total energy."""
    return torch.linalg.svdvals(matrix)[:k], float(matrix.double().square().sum())


@pytest.mark.parametrize("beta", [0.05, 0.3, 0.6, 1.0])
def test_threshold_coefficient_is_where_keeping_a_spike_stops_paying(beta):
    """λ*(β) is the observed singular value y(θ) at which keeping the rank-one term costs as much as dropping it,
    in the spiked model's asymptotics (units of √n·σ): y(θ)² = (θ + 1/θ)(θ + β/θ), and keeping costs
    θ² + y² − 2θ·y·c·c̃ against θ² dropped, with c, c̃ the cosines of the singular vectors with the signal's."""
    def keep_minus_drop(theta: float) -> float:
        y = math.sqrt((theta + 1 / theta) * (theta + beta / theta))
        c = math.sqrt((theta**4 - beta) / (theta**4 + beta * theta**2))
        c_tilde = math.sqrt((theta**4 - beta) / (theta**4 + theta**2))
        return y - 2 * theta * c * c_tilde

    low, high = beta**0.25 * (1 + 1e-12), 10.0  # from the BBP limit, where the vectors carry no signal
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if keep_minus_drop(middle) > 0 else (low, middle)
    y = math.sqrt((low + 1 / low) * (low + beta / low))
    assert optimal_threshold_coefficient(beta) == pytest.approx(y, rel=1e-9)
    assert optimal_threshold_coefficient(1.0) == pytest.approx(4 / math.sqrt(3))


@pytest.mark.parametrize("shape", [(96, 160), (160, 96), (128, 128)])
@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("snr", [1.2, 2.0, 5.0, 30.0, 300.0])
def test_noise_floor_recovers_the_planted_rank(shape, rank, snr):
    """Every planted value above the detection threshold is kept, and no noise value is, from SNR just above the
    threshold (1.2× the bulk edge; Gavish–Donoho keep θ > ~0.87× it for square matrices) to 300×."""
    matrix = _signal_plus_noise(shape, rank, snr, seed=rank)
    s, total = _leading(matrix, 32)
    found = noise_floor(s, total, shape)
    assert found.rank == rank
    assert found.sigma == pytest.approx(0.01, rel=0.05)
    assert NoiseFloorRank(max_rank=32).choose("m", s, total, shape) == rank


@pytest.mark.parametrize("shape", [(96, 160), (128, 128)])
def test_noise_floor_keeps_nothing_below_detection(shape):
    noise = _signal_plus_noise(shape, 1, 0.0, seed=1)
    s, total = _leading(noise, 32)
    assert noise_floor(s, total, shape).rank == 0
    assert NoiseFloorRank().choose("m", s, total, shape) == 1  # PEFT has no rank 0
    # Spikes at half the bulk edge are below the BBP limit: indistinguishable from noise.
    weak = _signal_plus_noise(shape, 4, 0.25, seed=2)
    assert noise_floor(*_leading(weak, 32), shape).rank == 0


def test_noise_floor_does_not_depend_on_how_many_triplets_were_computed():
    matrix = _signal_plus_noise((128, 96), 5, 3.0, seed=3)
    total = float(matrix.double().square().sum())
    s = torch.linalg.svdvals(matrix)
    results = {noise_floor(s[:k], total, (128, 96)) for k in (6, 16, 96)}
    assert len(results) == 1 and results.pop().rank == 5


def test_noise_floor_of_an_exact_low_rank_matrix_is_its_rank():
    """Without noise the residual is fp32 rounding; the numerical-rank floor keeps it from counting."""
    matrix = low_rank_delta(120, 80, 6, seed=0)
    s, total = _leading(matrix, 20)
    assert noise_floor(s, total, (120, 80)).rank == 6


def test_noise_floor_rank_is_capped():
    matrix = _signal_plus_noise((96, 96), 8, 10.0, seed=4)
    s, total = _leading(matrix, 32)
    assert NoiseFloorRank(max_rank=4).choose("m", s, total, (96, 96)) == 4
    assert NoiseFloorRank(max_rank=32).choose("m", s[:5], total, (96, 96)) == 5  # every computed value is signal


# ------------------------------------------------------------------------------------------------ budget allocator


def _random_spectra(rng: np.random.Generator, count: int, max_dim: int) -> list[ModuleSpectrum]:
    spectra = []
    for i in range(count):
        out_in = (int(rng.integers(1, max_dim + 1)), int(rng.integers(1, max_dim + 1)))
        size = min(out_in)
        s = np.sort(rng.exponential(size=size) * rng.uniform(0.1, 10.0))[::-1]
        total = float(np.sum(s**2) + rng.uniform(0.0, 5.0))  # part of the energy may lie beyond what was computed
        spectra.append(ModuleSpectrum(f"m{i}", out_in, torch.tensor(s.copy(), dtype=torch.float32), total))
    return spectra


def _objective(spectra: list[ModuleSpectrum], chosen: list[int] | tuple[int, ...], weighting: str) -> float:
    """Σ weighted squared error, the quantity the allocator minimises."""
    total = 0.0
    for spectrum, rank in zip(spectra, chosen):
        error = predicted_squared_error([spectrum], [rank])
        total += error / spectrum.total_energy if weighting == "relative" else error
    return total


def _brute_force(spectra: list[ModuleSpectrum], policy: BudgetRanks) -> float:
    """The least objective over every rank choice within the bounds and the budget."""
    choices = []
    for spectrum in spectra:
        cap = min(policy.max_rank, *spectrum.out_in, len(spectrum.s))
        choices.append(range(min(policy.min_rank, cap), cap + 1))
    out_ins = [s.out_in for s in spectra]
    feasible = (c for c in itertools.product(*choices) if adapter_params(list(c), out_ins) <= policy.params)
    return min(_objective(spectra, c, policy.weighting) for c in feasible)


def _check_bounds(spectra: list[ModuleSpectrum], policy: BudgetRanks, chosen: list[int]) -> None:
    assert adapter_params(chosen, [s.out_in for s in spectra]) <= policy.params
    for spectrum, rank in zip(spectra, chosen):
        cap = min(policy.max_rank, *spectrum.out_in, len(spectrum.s))
        assert min(policy.min_rank, cap) <= rank <= cap


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("weighting", ["absolute", "relative"])
def test_allocation_is_optimal_against_brute_force(seed, weighting):
    """Unequal shapes (so unequal costs per rank), budgets from the min-rank floor to everything."""
    rng = np.random.default_rng(seed)
    spectra = _random_spectra(rng, count=int(rng.integers(2, 5)), max_dim=6)
    out_ins = [s.out_in for s in spectra]
    min_rank = int(rng.integers(1, 3))
    floor = adapter_params([min(min_rank, *o) for o in out_ins], out_ins)
    everything = adapter_params([min(o) for o in out_ins], out_ins)
    for params in sorted({floor, *rng.integers(floor, everything + 1, size=6).tolist(), everything}):
        policy = BudgetRanks(max(params, 1), min_rank=min_rank, max_rank=5, weighting=weighting)
        chosen = policy.allocate(spectra)
        _check_bounds(spectra, policy, chosen)
        best = _brute_force(spectra, policy)
        assert _objective(spectra, chosen, weighting) == pytest.approx(best, rel=1e-9, abs=1e-12)


def _cost(spectra: list[ModuleSpectrum], chosen: list[int] | tuple[int, ...]) -> int:
    return sum(s.whole_cost if r == CARRIED_WHOLE else r * s.cost_per_rank for s, r in zip(spectra, chosen))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("weighting", ["absolute", "relative", "uniform"])
def test_allocation_may_carry_modules_whole_and_never_keeps_factors_larger(seed, weighting):
    """A module that can be carried whole (exact, at ``whole_cost``) is one more choice: the exact allocation is
    optimal against brute force over ranks and that choice, within the budget, and no module keeps factors that
    cost more than carrying it whole."""
    from dataclasses import replace

    rng = np.random.default_rng(200 + seed)
    spectra = [replace(s, whole_cost=int(rng.integers(1, s.out_in[0] * s.out_in[1] + 1))) if rng.random() < 0.7
               else s for s in _random_spectra(rng, count=int(rng.integers(2, 5)), max_dim=6)]
    floor = _cost(spectra, BudgetRanks(1, max_rank=5).floor_ranks(spectra))
    everything = sum(min(o) * (o[0] + o[1]) for o in (s.out_in for s in spectra))
    for params in sorted({floor, *rng.integers(floor, everything + 1, size=6).tolist(), everything}):
        policy = BudgetRanks(params, max_rank=5, weighting=weighting)
        chosen = policy.allocate(spectra)
        assert _cost(spectra, chosen) <= params
        for s, rank in zip(spectra, chosen):
            assert rank == CARRIED_WHOLE or s.whole_cost is None or rank * s.cost_per_rank <= s.whole_cost
        if weighting == "uniform":
            continue
        choices = [[*range(1, min(5, *s.out_in, len(s.s)) + 1), *([CARRIED_WHOLE] if s.whole_cost else [])]
                   for s in spectra]
        best = min(_objective(spectra, c, weighting) for c in itertools.product(*choices)
                   if _cost(spectra, c) <= params)
        assert _objective(spectra, chosen, weighting) == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_greedy_allocation_is_optimal_for_what_it_spends_and_within_one_triplet(seed, monkeypatch):
    """The route for large instances: optimal at its own spend (a Lagrangian optimum), and short of the optimum
    for the full budget by at most the gain of one triplet it did not take (the knapsack gap)."""
    monkeypatch.setattr(ranks, "_EXACT_MAX_CELLS", 0)
    rng = np.random.default_rng(100 + seed)
    spectra = _random_spectra(rng, count=int(rng.integers(2, 5)), max_dim=6)
    out_ins = [s.out_in for s in spectra]
    floor = adapter_params([1] * len(spectra), out_ins)
    for params in sorted(set(rng.integers(floor, adapter_params([min(o) for o in out_ins], out_ins) + 1, size=6))):
        policy = BudgetRanks(int(params), max_rank=6)
        chosen = policy.allocate(spectra)
        _check_bounds(spectra, policy, chosen)
        spent = BudgetRanks(adapter_params(chosen, out_ins), max_rank=6)
        assert _objective(spectra, chosen, "absolute") == pytest.approx(_brute_force(spectra, spent), rel=1e-9)
        next_gains = [float(s.s[r]) ** 2 for s, r in zip(spectra, chosen) if r < len(s.s)]
        gap = _objective(spectra, chosen, "absolute") - _brute_force(spectra, policy)
        assert gap <= max(next_gains, default=0.0) * (1 + 1e-9)


def test_greedy_allocation_is_exact_for_equal_costs(monkeypatch):
    monkeypatch.setattr(ranks, "_EXACT_MAX_CELLS", 0)
    rng = np.random.default_rng(7)
    for _ in range(10):
        values = [torch.tensor(np.sort(rng.exponential(size=3))[::-1].copy()) for _ in range(4)]
        spectra = [ModuleSpectrum(f"m{i}", (3, 4), s, float(s.square().sum())) for i, s in enumerate(values)]
        for params in range(4 * 7, 4 * 3 * 7 + 1, 5):
            policy = BudgetRanks(params, max_rank=3)
            chosen = policy.allocate(spectra)
            assert _objective(spectra, chosen, "absolute") == pytest.approx(_brute_force(spectra, policy), rel=1e-9)


def test_large_instances_are_allocated_quickly():
    """A 7B-like model (224 modules, 256 triplets each, costs with a small gcd): greedy, well under a second."""
    rng = np.random.default_rng(0)
    shapes = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
    spectra = [ModuleSpectrum(f"layers.{i // 7}.{i % 7}", shapes[i % 7],
                              torch.tensor(np.sort(rng.exponential(size=256))[::-1].copy()), 1e3)
               for i in range(224)]
    uniform_16 = budget_for_avg_rank(16, [s.out_in for s in spectra]) + 1  # + 1: gcd 1, far too big for the table
    chosen = BudgetRanks(uniform_16).allocate(spectra)
    assert adapter_params(chosen, [s.out_in for s in spectra]) <= uniform_16
    assert predicted_squared_error(spectra, chosen) < predicted_squared_error(spectra, [16] * 224)


def _heterogeneous_deltas() -> dict[str, torch.Tensor]:
    """Modules that changed very differently: two large nearly-rank-2 deltas, a broad slowly decaying one, small
    ones of rank 8, and a tall embedding-like matrix."""
    noise = torch.Generator().manual_seed(0)
    return {
        "layers.0.q_proj": low_rank_delta(64, 64, 2, seed=1, scale=5.0, decay=0.3),
        "layers.0.k_proj": low_rank_delta(32, 64, 8, seed=2, scale=0.2, decay=0.9),
        "layers.0.mlp.up_proj": low_rank_delta(96, 64, 16, seed=3, scale=2.0, decay=0.97),
        "layers.1.q_proj": low_rank_delta(64, 64, 2, seed=4, scale=3.0, decay=0.5),
        "layers.1.mlp.down_proj": low_rank_delta(64, 96, 8, seed=5, scale=0.5, decay=0.8)
        + 0.01 * torch.randn(64, 96, generator=noise),
        "embed_tokens": low_rank_delta(64, 200, 4, seed=6, scale=1.0, decay=0.9),
    }


@pytest.fixture(scope="module")
def heterogeneous() -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """The deltas and their full SVDs (fp64, so that spectra and measured errors agree to 1e-12)."""
    deltas = _heterogeneous_deltas()
    return deltas, [torch.linalg.svd(delta.double(), full_matrices=False) for delta in deltas.values()]


def _spectra(deltas: dict[str, torch.Tensor], svds: list[tuple[torch.Tensor, ...]]) -> list[ModuleSpectrum]:
    return [ModuleSpectrum(name, tuple(delta.shape), s, float(delta.double().square().sum()))
            for (name, delta), (_, s, _) in zip(deltas.items(), svds)]


@pytest.mark.parametrize("rank", [2, 4, 8, 16])  # at rank 1 = min_rank there is nothing to allocate
@pytest.mark.parametrize("weighting", ["absolute", "relative"])
def test_budget_beats_uniform_rank_at_equal_size(rank, weighting, heterogeneous):
    """On heterogeneous modules, the allocation at the uniform rank's exact size keeps strictly more of what its
    weighting counts (and, absolute, the smaller total squared error of the truncated deltas, measured)."""
    deltas, svds = heterogeneous
    spectra = _spectra(deltas, svds)
    out_ins = [s.out_in for s in spectra]
    uniform = [min(rank, *o) for o in out_ins]
    size = budget_for_avg_rank(rank, out_ins)
    assert size == adapter_params(uniform, out_ins)
    chosen = BudgetRanks(size, weighting=weighting).allocate(spectra)
    assert adapter_params(chosen, out_ins) <= size
    assert _objective(spectra, chosen, weighting) < _objective(spectra, uniform, weighting) * (1 - 1e-3)
    if weighting == "absolute":
        measured = 0.0
        for delta, (u, s, vh), r in zip(deltas.values(), svds, chosen):
            measured += float((delta.double() - (u[:, :r] * s[:r]) @ vh[:r]).square().sum())
        assert measured == pytest.approx(predicted_squared_error(spectra, chosen), rel=1e-6)


def test_budget_below_the_min_rank_floor_is_refused(heterogeneous):
    spectra = _spectra(*heterogeneous)
    floor = adapter_params([2] * len(spectra), [s.out_in for s in spectra])
    assert len(BudgetRanks(floor, min_rank=2).allocate(spectra)) == len(spectra)
    with pytest.raises(InvalidOptionError, match=r"cannot pay for rank 2 in each of the 6 modules"):
        BudgetRanks(floor - 1, min_rank=2).allocate(spectra)


def test_budget_bounds_and_surplus(heterogeneous):
    """max_rank and min(out, in) cap every module; a budget larger than everything buys everything."""
    spectra = _spectra(*heterogeneous)
    chosen = BudgetRanks(10**9, max_rank=8).allocate(spectra)
    assert chosen == [8] * len(spectra)
    spectra.append(ModuleSpectrum("narrow", (3, 200), torch.tensor([3.0, 2.0, 1.0]), 14.0))
    assert BudgetRanks(10**9, max_rank=8).allocate(spectra)[-1] == 3
    chosen = BudgetRanks(10**9, min_rank=3, max_rank=3).allocate(spectra)
    assert chosen == [3] * len(spectra)
    assert BudgetRanks(5, max_rank=7).compute_rank("m", (64, 64)) == 7


@pytest.mark.parametrize("kwargs, message", [
    ({"params": 0}, "at least 1 parameter"),
    ({"params": 10, "min_rank": 0}, "min rank"),
    ({"params": 10, "min_rank": 4, "max_rank": 2}, "below min rank"),
    ({"params": 10, "weighting": "squared"}, "weighting"),
])
def test_budget_options_are_checked(kwargs, message):
    with pytest.raises(InvalidOptionError, match=message):
        BudgetRanks(**kwargs)


# ------------------------------------------------------------------------------------------------ budget parsing


@pytest.mark.parametrize("text, params", [
    ("50MB", 25_000_000),
    ("50 mb", 25_000_000),
    ("1.5GB", 750_000_000),
    ("200KiB", 102_400),
    ("1GiB", 2**29),
    ("1000B", 500),
    ("2%", 140_000_000),
    ("0.5 %", 35_000_000),
    ("100%", 7_000_000_000),
    ("1200000", 1_200_000),
    ("3Mparams", 3_000_000),
    ("3M params", 3_000_000),
    ("500k params", 500_000),
    ("1.5Bparams", 1_500_000_000),
    ("12param", 12),
])
def test_parse_budget(text, params):
    assert parse_budget(text, model_params=7_000_000_000, bytes_per_param=2) == params


def test_parse_budget_uses_the_factor_dtype():
    assert parse_budget("4MB", model_params=10, bytes_per_param=4) == 1_000_000


@pytest.mark.parametrize("text, message", [
    ("3M", "ambiguous: write 3MB for bytes or 3Mparams"),
    ("2.5k", "ambiguous"),
    ("50XB", "not a size"),
    ("fifty", "not a size"),
    ("1.5", "not a size"),
    ("-5MB", "not a size"),
    ("0%", r"in \(0, 100\]"),
    ("150%", r"in \(0, 100\]"),
    ("1B", "less than one parameter"),
    ("0", "less than one parameter"),
])
def test_parse_budget_errors_are_one_line(text, message):
    with pytest.raises(InvalidOptionError, match=message) as raised:
        parse_budget(text, model_params=1000, bytes_per_param=2)
    assert "\n" not in str(raised.value) and repr(text) in str(raised.value)


def test_avg_rank_budget_is_the_uniform_rank_size():
    out_ins = [(64, 64), (3, 256), (96, 64)]
    assert budget_for_avg_rank(16, out_ins) == 16 * 128 + 3 * 259 + 16 * 160
    assert budget_for_avg_rank(2.5, [(10, 10)]) == 50
    with pytest.raises(InvalidOptionError, match="positive"):
        budget_for_avg_rank(0, out_ins)


# ------------------------------------------------------------------------------------------------ end to end


def test_extract_with_a_budget_beats_uniform_rank_at_equal_size(tmp_path):
    """extract(budget=...) spends at most the budget and reproduces ΔW better than a uniform rank of that size."""
    import deltakit

    deltas = _heterogeneous_deltas()
    generator = torch.Generator().manual_seed(1)
    base = {f"{name}.weight": torch.randn(delta.shape, generator=generator) for name, delta in deltas.items()}
    finetuned = {name: weight + deltas[name.removesuffix(".weight")] for name, weight in base.items()}
    base_dir, ft_dir = write_safetensors_pair(tmp_path, base, finetuned)
    uniform = deltakit.extract(ft_dir, base_dir, tmp_path / "uniform", rank=4, svd="exact")
    size = sum(m.rank * sum(m.shape) for m in uniform.modules)
    budget = deltakit.extract(ft_dir, base_dir, tmp_path / "budget", budget=str(size), svd="exact",
                              budget_weighting="absolute")
    assert sum(m.rank * sum(m.shape) for m in budget.modules) <= size

    def squared_error(report: deltakit.ExtractReport) -> float:
        return sum((m.relative_error * m.delta_norm) ** 2 for m in report.modules)

    assert squared_error(budget) < 0.9 * squared_error(uniform)
