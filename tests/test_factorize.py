"""Truncated SVD against theory: exact recovery, Eckart–Young optimality, the LoRA split, fallbacks.

Matrices are planted, M = U·diag(σ)·Vᵀ with random orthogonal U and V, so the optimal rank-r error
√(Σ_{i>r} σ_i² / Σ σ_i²) is known without an SVD.
"""

from __future__ import annotations

import math

import pytest
import torch

from deltakit.math import factorize
from deltakit.errors import DeviceUnavailableError, FactorizationError, InvalidOptionError
from deltakit.math.factorize import DeltaBuffer, TruncatedSVD, resolve_device, truncated_svd
from deltakit.math.lowrank import balanced_factors


def _planted(shape: tuple[int, int], sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    big, small = max(shape), min(shape)
    u = torch.linalg.qr(torch.randn(big, small, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(small, small, generator=generator, dtype=torch.float64)).Q
    matrix = (u * sigma.double()) @ v.T  # (big, small)
    return (matrix if shape[0] >= shape[1] else matrix.T).float()


def _low_rank(shape: tuple[int, int], rank: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=generator) @ torch.randn(rank, shape[1], generator=generator)


def _optimal_error(sigma: torch.Tensor, rank: int) -> float:
    energy = sigma.double().square()
    return math.sqrt(float(energy[rank:].sum() / energy.sum()))


def _factors(svd: TruncatedSVD, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rank = svd.rank if rank is None else rank
    return balanced_factors(svd.u[:, :rank], svd.s[:rank], svd.vh[:rank])


def _measured_error(matrix: torch.Tensor, svd: TruncatedSVD, rank: int | None = None) -> float:
    lora_b, lora_a = _factors(svd, rank)
    residual = matrix.double() - lora_b.double() @ lora_a.double()
    return float(torch.linalg.matrix_norm(residual) / torch.linalg.matrix_norm(matrix.double()))


def _harmonic(size: int) -> torch.Tensor:
    return 1.0 / torch.arange(1, size + 1, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(200, 120), (120, 200), (256, 256)])
@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("rank", [7, 12])
def test_rank_k_delta_is_recovered_to_fp32_precision(shape, method, rank):
    delta = _low_rank(shape, 7)
    svd = truncated_svd(delta, rank, method=method, device="cpu")
    assert svd.method == method
    assert svd.u.shape == (shape[0], rank) and svd.s.shape == (rank,) and svd.vh.shape == (rank, shape[1])
    assert _measured_error(delta, svd) < 1e-5
    # The residual is measured, not total − kept, so it resolves errors far below √eps_fp32.
    assert svd.relative_error() < 1e-5
    assert svd.relative_error(6) > 0.01


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
@pytest.mark.parametrize("rank", [1, 5, 20, 60])
def test_exact_error_is_the_eckart_young_optimum(shape, rank):
    sigma = _harmonic(200)
    delta = _planted(shape, sigma)
    svd = truncated_svd(delta, rank, method="exact", device="cpu")
    torch.testing.assert_close(svd.s, sigma[:rank].float(), rtol=1e-5, atol=1e-6)
    assert svd.relative_error() == pytest.approx(_optimal_error(sigma, rank), rel=1e-5)
    assert _measured_error(delta, svd) == pytest.approx(svd.relative_error(), rel=1e-5)
    assert svd.energy_retained() == pytest.approx(1 - svd.relative_error() ** 2, abs=1e-12)


@pytest.mark.parametrize("shape", [(400, 300), (300, 400)])
@pytest.mark.parametrize("rank", [8, 16, 48])
def test_randomized_relative_error_is_its_true_error_at_every_rank(shape, rank):
    """The randomized factors are P·M for an orthogonal projection P, so tail = total − kept holds
    for them and for each of their truncations; relative_error must equal the measured error."""
    delta = _planted(shape, torch.linspace(1.0, 0.01, 300))
    svd = truncated_svd(delta, rank, method="randomized", device="cpu")
    for r in (rank, rank // 2, 1):
        assert _measured_error(delta, svd, r) == pytest.approx(svd.relative_error(r), rel=1e-5)
    truncated = svd.truncate(rank // 2)
    assert truncated.relative_error() == pytest.approx(svd.relative_error(rank // 2), rel=1e-12)
    assert truncated.rank == rank // 2


@pytest.mark.parametrize("spectrum", ["harmonic", "exponential"])
@pytest.mark.parametrize("rank", [4, 16, 48])
def test_randomized_is_within_3_percent_of_optimal_on_decaying_spectra(spectrum, rank):
    sigma = _harmonic(300) if spectrum == "harmonic" else torch.exp(-torch.arange(300.0) / 10)
    delta = _planted((400, 300), sigma)
    svd = truncated_svd(delta, rank, method="randomized", device="cpu")
    assert svd.relative_error() / _optimal_error(sigma, rank) <= 1.03


def test_randomized_on_a_flat_spectrum_loses_energy_but_stays_near_one():
    """Noise-like spectra are the randomized route's worst case: with nothing to separate the top
    directions, it keeps measurably less energy than the optimum (0.92× here; 0.86–0.88× on the
    Marchenko–Pastur spectra of bench_svd.py) while the error ratio stays near 1 (1.004 here), because
    both errors are close to 1."""
    sigma = torch.linspace(1.0, 0.5, 300)
    delta = _planted((400, 300), sigma)
    rank = 16
    svd = truncated_svd(delta, rank, method="randomized", device="cpu")
    optimum = _optimal_error(sigma, rank)
    assert 1.0 <= svd.relative_error() / optimum < 1.02
    assert 0.6 < svd.energy_retained() / (1 - optimum**2) <= 1.0


def test_truncating_an_exact_svd_equals_the_lower_rank_exact_svd():
    delta = _planted((250, 180), _harmonic(180))
    high = truncated_svd(delta, 30, method="exact", device="cpu").truncate(6)
    low = truncated_svd(delta, 6, method="exact", device="cpu")
    for name in ("u", "s", "vh"):
        torch.testing.assert_close(getattr(high, name), getattr(low, name), rtol=0, atol=1e-6)
    assert high.relative_error() == pytest.approx(low.relative_error(), rel=1e-9)


@pytest.mark.parametrize("scaling", [1.0, 0.25, 4.0])
def test_balanced_factors_split_singular_values_evenly_with_scaling_folded_in(scaling):
    delta = _planted((160, 96), _harmonic(96) * 3)
    svd = truncated_svd(delta, 10, method="exact", device="cpu")
    lora_b, lora_a = balanced_factors(svd.u, svd.s, svd.vh, scaling)  # (out, r), (r, in)
    assert lora_b.shape == (160, 10) and lora_a.shape == (10, 96)
    torch.testing.assert_close(scaling * lora_b @ lora_a, (svd.u * svd.s) @ svd.vh, rtol=1e-5, atol=1e-6)
    root = (svd.s / scaling).sqrt()
    torch.testing.assert_close(lora_b.norm(dim=0), root, rtol=1e-5, atol=0)
    torch.testing.assert_close(lora_a.norm(dim=1), root, rtol=1e-5, atol=0)


def test_factors_are_orthonormal_and_sign_normalized():
    delta = _planted((220, 140), _harmonic(140))
    exact = truncated_svd(delta, 12, method="exact", device="cpu")
    randomized = truncated_svd(delta, 12, method="randomized", device="cpu")
    for svd in (exact, randomized):
        torch.testing.assert_close(svd.u.T @ svd.u, torch.eye(12), rtol=0, atol=1e-5)
        torch.testing.assert_close(svd.vh @ svd.vh.T, torch.eye(12), rtol=0, atol=1e-5)
        pivots = svd.u.abs().argmax(dim=0)
        assert bool((svd.u[pivots, torch.arange(12)] > 0).all())
        assert bool((svd.s[:-1] >= svd.s[1:]).all())
    # Well-separated leading singular values: both routes find the same vectors, signs included.
    torch.testing.assert_close(randomized.u[:, :4], exact.u[:, :4], rtol=0, atol=1e-3)
    torch.testing.assert_close(randomized.vh[:4], exact.vh[:4], rtol=0, atol=1e-3)


def test_same_seed_gives_bitwise_identical_factors():
    delta = _planted((300, 200), _harmonic(200))
    for method in ("exact", "randomized"):
        first = truncated_svd(delta, 16, method=method, seed=7, device="cpu")
        second = truncated_svd(delta, 16, method=method, seed=7, device="cpu")
        for name in ("u", "s", "vh"):
            assert torch.equal(getattr(first, name), getattr(second, name))


def test_different_seeds_differ_slightly_and_both_stay_near_optimal():
    sigma = _harmonic(200)
    delta = _planted((300, 200), sigma)
    first = truncated_svd(delta, 16, method="randomized", seed=0, device="cpu")
    second = truncated_svd(delta, 16, method="randomized", seed=1, device="cpu")
    assert not torch.equal(first.s, second.s)
    for svd in (first, second):
        assert svd.relative_error() / _optimal_error(sigma, 16) <= 1.03


def test_global_random_state_is_neither_used_nor_changed():
    delta = _planted((300, 200), _harmonic(200))
    state = torch.get_rng_state()
    first = truncated_svd(delta, 16, method="randomized", device="cpu")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)
    second = truncated_svd(delta, 16, method="randomized", device="cpu")
    assert torch.equal(first.u, second.u)


class _FailingSvd:
    """Stands in for torch.linalg.svd: fails on inputs of the given dtypes, else calls the real one."""

    def __init__(self, failing: tuple[torch.dtype, ...], how: str = "raise") -> None:
        self.real = torch.linalg.svd
        self.failing = failing
        self.how = how
        self.calls: list[torch.dtype] = []

    def __call__(self, matrix, full_matrices=True, *, driver=None):
        self.calls.append(matrix.dtype)
        if matrix.dtype in self.failing:
            if self.how == "raise":
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            u, s, vh = self.real(matrix, full_matrices=full_matrices)
            return u, torch.full_like(s, float("nan")), vh
        return self.real(matrix, full_matrices=full_matrices, driver=driver)


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("how", ["raise", "nan"])
def test_fp32_failure_falls_back_to_fp64_and_says_so(monkeypatch, method, how):
    sigma = _harmonic(150)
    delta = _planted((220, 150), sigma)
    fake = _FailingSvd((torch.float32,), how)
    monkeypatch.setattr(torch.linalg, "svd", fake)
    svd = truncated_svd(delta, 10, method=method, device="cpu")
    assert svd.method == f"{method}-fp64"
    assert fake.calls == [torch.float32, torch.float64]
    assert svd.s.dtype == svd.u.dtype == svd.vh.dtype == torch.float32
    assert _measured_error(delta, svd) == pytest.approx(svd.relative_error(), rel=1e-5)
    assert svd.relative_error() / _optimal_error(sigma, 10) <= (1 + 1e-5 if method == "exact" else 1.03)


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_every_route_failing_raises_factorization_error(monkeypatch, how):
    monkeypatch.setattr(torch.linalg, "svd", _FailingSvd((torch.float32, torch.float64), how))
    with pytest.raises(FactorizationError, match="220×150") as caught:
        truncated_svd(_planted((220, 150), _harmonic(150)), 10, method="exact", device="cpu")
    assert "\n" not in str(caught.value)
    if how == "raise":
        assert isinstance(caught.value.__cause__, torch.linalg.LinAlgError)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")
    for name in ("cuda", "cuda:0", torch.device("cuda:1")):
        with pytest.raises(DeviceUnavailableError) as caught:
            resolve_device(name)
        assert caught.value.exit_code == 3
    with pytest.raises(DeviceUnavailableError):
        truncated_svd(torch.ones(4, 4), 2, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceUnavailableError, match="only 1 CUDA device"):
        resolve_device("cuda:3")
    for bad in ("gpu", "cuda:x", "", "meta"):
        with pytest.raises(InvalidOptionError) as caught:
            resolve_device(bad)
        assert caught.value.exit_code == 2


@pytest.mark.parametrize("method", ["exact", "randomized", "auto"])
def test_zero_matrix_gives_zero_factors_and_zero_error(method):
    svd = truncated_svd(torch.zeros(30, 20), 4, method=method, device="cpu")
    assert svd.method == "zero"
    assert svd.total_energy == 0.0
    assert torch.equal(svd.s, torch.zeros(4))
    torch.testing.assert_close(svd.u.T @ svd.u, torch.eye(4))
    lora_b, lora_a = _factors(svd, 4)
    assert torch.equal(lora_b @ lora_a, torch.zeros(30, 20))
    assert svd.relative_error() == 0.0 and svd.relative_error(0) == 0.0
    assert svd.energy_retained() == 1.0


@pytest.mark.parametrize("shape", [(1, 50), (50, 1)])
def test_single_row_or_column_is_factorized_exactly(shape):
    delta = torch.linspace(-2.0, 3.0, 50).reshape(shape)
    svd = truncated_svd(delta, 8, method="randomized", device="cpu")
    assert svd.rank == 1 and svd.method == "exact"
    assert svd.s.item() == pytest.approx(float(delta.double().norm()), rel=1e-6)
    assert _measured_error(delta, svd) < 1e-6
    assert svd.relative_error(0) == pytest.approx(1.0, abs=1e-6)


def test_rank_at_or_above_min_dim_is_the_full_exact_svd():
    delta = _planted((90, 40), _harmonic(40))
    svd = truncated_svd(delta, 100, method="randomized", device="cpu")
    assert svd.method == "exact" and svd.rank == 40
    assert _measured_error(delta, svd) < 1e-6


def test_auto_picks_exact_for_small_or_wide_sketches_and_randomized_otherwise():
    assert truncated_svd(_low_rank((300, 200), 5), 4, device="cpu").method == "exact"
    tall = _low_rank((600, 520), 5)
    assert truncated_svd(tall, 4, device="cpu").method == "randomized"
    assert truncated_svd(tall, 4, oversample=130, device="cpu").method == "exact"
    assert truncated_svd(tall, 130, device="cpu").method == "exact"


def test_half_precision_input_gives_fp32_factors_on_cpu_and_exact_energy():
    delta = _low_rank((64, 48), 3).to(torch.bfloat16)
    svd = truncated_svd(delta, 3, method="exact", device="cpu")
    assert svd.u.dtype == svd.s.dtype == svd.vh.dtype == torch.float32
    assert svd.u.device.type == "cpu"
    assert svd.total_energy == pytest.approx(float(delta.double().square().sum()), rel=1e-12)


def test_total_energy_is_accumulated_in_fp64():
    # 1 + tiny values: an fp32 running sum over 1.2M entries would drift by far more than 1e-9.
    delta = 1.0 + 1e-3 * _low_rank((1200, 1000), 2)
    svd = truncated_svd(delta, 2, method="randomized", device="cpu")
    assert svd.total_energy == pytest.approx(float(delta.double().square().sum()), rel=1e-9)


def test_input_is_not_modified_and_views_work():
    delta = _planted((150, 110), _harmonic(110))
    before = delta.clone()
    svd = truncated_svd(delta.T, 5, method="randomized", device="cpu")  # a (110, 150) non-contiguous view
    assert torch.equal(delta, before)
    contiguous = truncated_svd(delta.T.contiguous(), 5, method="randomized", device="cpu")
    torch.testing.assert_close(svd.u, contiguous.u, rtol=0, atol=1e-6)
    assert svd.relative_error() == pytest.approx(contiguous.relative_error(), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"rank": 0}, {"rank": -3}, {"method": "fast"}, {"oversample": -1}, {"niter": -1}, {"device": "tpu:0"}],
)
def test_bad_options_raise_invalid_option_error(kwargs):
    arguments = {"rank": 4, **kwargs}
    with pytest.raises(InvalidOptionError):
        truncated_svd(torch.ones(10, 8), **arguments)


@pytest.mark.parametrize("matrix", [torch.ones(3, 4, 5), torch.ones(7), torch.ones(0, 5)])
def test_non_matrix_input_raises_invalid_option_error(matrix):
    with pytest.raises(InvalidOptionError, match="2-D"):
        truncated_svd(matrix, 2)


def test_rank_outside_the_computed_range_raises():
    svd = truncated_svd(_low_rank((20, 10), 3), 4, device="cpu")
    for call in (svd.truncate, svd.relative_error, svd.energy_retained):
        with pytest.raises(InvalidOptionError, match="outside 0..4"):
            call(5)


def test_relative_error_without_measured_residual_uses_total_minus_kept():
    # A TruncatedSVD built by hand (e.g. from stacked factors) has no measured residual.
    svd = TruncatedSVD(
        u=torch.eye(3, 2), s=torch.tensor([3.0, 1.0]), vh=torch.eye(2, 4), total_energy=11.0, method="exact"
    )
    assert svd.relative_error() == pytest.approx(math.sqrt(1 / 11))
    assert svd.relative_error(1) == pytest.approx(math.sqrt(2 / 11))
    assert svd.truncate(1).relative_error() == pytest.approx(math.sqrt(2 / 11))


def test_module_exports():
    assert set(factorize.__all__) == {"DeltaBuffer", "SvdMethod", "TruncatedSVD", "resolve_device", "truncated_svd"}


# --- ΔW in a reused buffer, and the rank-dependent defaults -----------------------------------------------------


@pytest.mark.parametrize(("ft_dtype", "base_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16),
                                                      (torch.float32, torch.float16)])
@pytest.mark.parametrize("shape", [(300, 200), (2, 700_000), (5000, 3)])
def test_delta_buffer_forms_the_fp32_difference_and_its_fp64_energy(ft_dtype, base_dtype, shape):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator).to(base_dtype)
    finetuned = (base.float() + 1e-2 * torch.randn(shape, generator=generator)).to(ft_dtype)
    delta, energy = DeltaBuffer(torch.device("cpu")).form(finetuned, base)
    expected = finetuned.float() - base.float()
    assert delta.dtype == torch.float32 and delta.shape == shape
    assert torch.equal(delta, expected)  # bit for bit: each element converted exactly, subtracted once
    assert energy == pytest.approx(float(expected.double().square().sum()), rel=1e-12)
    # ‖W0‖² from the same pass, for the report's relative change
    buffer = DeltaBuffer(torch.device("cpu"))
    buffer.form(finetuned, base)
    assert buffer.base_energy == pytest.approx(float(base.double().square().sum()), rel=1e-12)


@pytest.mark.parametrize("shape", [(1, 5000), (3000, 700)])
def test_delta_buffer_gives_the_same_bits_on_one_thread_or_several(shape):
    """A Ray task fits on one thread, a local run on several: their energies (in the report) must be equal."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=generator).to(torch.bfloat16)
    finetuned = (base.float() + 1e-2 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            buffer = DeltaBuffer(torch.device("cpu"))
            delta, energy = buffer.form(finetuned, base)
            results.append((delta.clone(), energy, buffer.base_energy))
            assert torch.get_num_threads() == count  # restored after the single-threaded blocks
    finally:
        torch.set_num_threads(threads)
    (delta1, energy1, base1), (delta2, energy2, base2) = results
    assert torch.equal(delta1, delta2) and energy1 == energy2 and base1 == base2


def test_delta_buffer_reuses_its_memory_across_modules():
    buffer = DeltaBuffer(torch.device("cpu"))
    big, _ = buffer.form(torch.ones(64, 48), torch.zeros(64, 48))
    where = big.data_ptr()
    for shape in [(48, 64), (10, 7), (64, 48)]:
        delta, energy = buffer.form(torch.full(shape, 3.0), torch.ones(shape))
        assert delta.data_ptr() == where  # no fresh allocation for a module no larger than the largest seen
        assert torch.equal(delta, torch.full(shape, 2.0)) and energy == 4.0 * delta.numel()
    grown, _ = buffer.form(torch.ones(100, 100), torch.zeros(100, 100))
    assert torch.equal(grown, torch.ones(100, 100))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_delta_buffer_energy_is_non_finite_exactly_when_the_delta_is(bad):
    buffer = DeltaBuffer(torch.device("cpu"))
    finetuned = torch.zeros(300, 200, dtype=torch.bfloat16)
    finetuned[250, 3] = bad
    assert not math.isfinite(buffer.form(finetuned, torch.zeros(300, 200))[1])
    # Huge but finite fp32 differences: their squares would overflow fp32, not the fp64 sum; a difference
    # beyond fp32's range is infinite, and so is its energy.
    huge = torch.full((4, 5), 3e38)
    assert math.isfinite(buffer.form(huge, torch.zeros(4, 5))[1])
    assert not math.isfinite(buffer.form(huge, -huge)[1])


def test_given_total_energy_is_used_as_is():
    delta = _planted((400, 300), _harmonic(300))
    measured = truncated_svd(delta, 16, device="cpu")
    given = truncated_svd(delta, 16, device="cpu", total_energy=measured.total_energy)
    assert given.total_energy == measured.total_energy
    assert torch.equal(given.u, measured.u) and torch.equal(given.s, measured.s)


@pytest.mark.parametrize(("rank", "niter"), [(16, 2), (64, 2), (65, 3), (96, 3)])
def test_power_iterations_default_by_rank(rank, niter):
    delta = _planted((1200, 1000), _harmonic(1000))
    default = truncated_svd(delta, rank, method="randomized", device="cpu")
    explicit = truncated_svd(delta, rank, method="randomized", niter=niter, device="cpu")
    assert torch.equal(default.u, explicit.u) and torch.equal(default.s, explicit.s)
    assert default.relative_error() / _optimal_error(_harmonic(1000), rank) < 1.01
