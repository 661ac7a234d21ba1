"""Whitened fits against brute force: optimal for E‖(ΔW − BA)x‖², plain SVD when E[xxᵀ] = I, errors exact."""

from __future__ import annotations

import functools

import pytest
import torch

from deltakit.errors import InvalidOptionError
from deltakit.math.factorize import truncated_svd
from deltakit.math.whiten import ErrorMeter, output_aware_fit, whitened_svd, whitening

EXACT = functools.partial(truncated_svd, method="exact", device="cpu")


def _problem(out: int = 14, inp: int = 10, tokens: int = 200, seed: int = 0,
             rank_x: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW, inputs X (tokens, in) with very unequal scales per direction, and C = XᵀX / tokens."""
    generator = torch.Generator().manual_seed(seed)
    delta = torch.randn(out, inp, generator=generator, dtype=torch.float64)
    width = rank_x or inp
    mix = torch.randn(width, inp, generator=generator, dtype=torch.float64)
    scales = torch.logspace(1, -1, width, dtype=torch.float64)
    x = (torch.randn(tokens, width, generator=generator, dtype=torch.float64) * scales) @ mix
    return delta.float(), x.float(), (x.T @ x / tokens).float()


def _objective(delta: torch.Tensor, fit: torch.Tensor, x: torch.Tensor) -> float:
    """E‖(ΔW − M)x‖² over the rows of x, directly."""
    return float(((x.double() @ (delta.double() - fit.double()).T) ** 2).sum(dim=1).mean())


def _truncation(fit, rank: int) -> torch.Tensor:
    """u_r·diag(s_r)·vh_r of a plain or whitened SVD, in fp64."""
    return (fit.u[:, :rank].double() * fit.s[:rank].double()) @ fit.vh[:rank].double()


def _descend(delta: torch.Tensor, x: torch.Tensor, rank: int, seed: int) -> float:
    """Brute force, without whitening: alternating least squares on B and A from a random start (each step
    minimises the objective exactly over one factor, so the objective never rises)."""
    generator = torch.Generator().manual_seed(seed)
    target, c = delta.double(), (x.double().T @ x.double()) / x.shape[0]
    a = torch.randn(rank, delta.shape[1], generator=generator, dtype=torch.float64)
    for _ in range(500):
        b = target @ c @ a.T @ torch.linalg.pinv(a @ c @ a.T)  # (out, r)
        a = torch.linalg.pinv(b) @ target  # (r, in); optimal for any C ≻ 0
    return _objective(delta, b @ a, x)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_whitened_fit_is_optimal_on_the_output_objective(rank: int) -> None:
    """No rank-r fit found by descent from several random starts beats the closed form; plain SVD is worse."""
    delta, x, moment = _problem()
    fit = whitened_svd(delta, whitening(moment, damping=0.0), rank, EXACT)
    ours = _objective(delta, _truncation(fit, rank), x)
    plain = EXACT(delta, rank)
    plain_objective = _objective(delta, _truncation(plain, rank), x)
    assert ours < 0.9 * plain_objective
    for seed in range(3):
        assert ours <= _descend(delta, x, rank, seed) * (1 + 1e-4)
    # The predicted output error is the objective itself.
    assert fit.output_relative_error(rank) ** 2 * fit.total_energy == pytest.approx(ours, rel=1e-4)


def test_identity_second_moment_gives_the_plain_svd() -> None:
    delta, _, _ = _problem()
    fit = whitened_svd(delta, whitening(torch.eye(delta.shape[1]), damping=0.0), 4, EXACT)
    plain = EXACT(delta, 4)
    torch.testing.assert_close(_truncation(fit, 4), _truncation(plain, 4), atol=1e-5, rtol=0)
    assert fit.weight_relative_error(4) == pytest.approx(plain.relative_error(4), rel=1e-5)
    assert fit.output_relative_error(4) == pytest.approx(plain.relative_error(4), rel=1e-5)


def test_heavy_damping_tends_to_the_plain_svd() -> None:
    delta, _, moment = _problem()
    light = whitened_svd(delta, whitening(moment, damping=0.01), 3, EXACT)
    heavy = whitened_svd(delta, whitening(moment, damping=1e4), 3, EXACT)
    plain = EXACT(delta, 3)
    assert heavy.weight_relative_error(3) == pytest.approx(plain.relative_error(3), rel=1e-3)
    assert light.weight_relative_error(3) > 1.05 * plain.relative_error(3)


def test_rank_deficient_inputs_fit_the_seen_directions_and_leave_the_rest_alone() -> None:
    """With C of rank 4 < in and no damping: the optimum on the inputs, and zero on the directions never seen."""
    delta, x, moment = _problem(rank_x=4)
    found = whitening(moment, damping=0.0)
    assert found.kind == "eigen" and found.width == 4
    fit = whitened_svd(delta, found, 2, EXACT)
    fitted = _truncation(fit, 2)
    assert _objective(delta, fitted, x) <= _descend(delta, x, 2, seed=0) * (1 + 1e-4)
    unseen = torch.linalg.svd(x.double(), full_matrices=True).Vh[4:]  # (in − 4, in): directions C never saw
    assert float((fitted @ unseen.T).abs().max()) < 1e-4
    # Damping makes the same C invertible again: Cholesky.
    assert whitening(moment).kind == "cholesky"


def test_diagonal_moment_matches_the_full_diagonal_matrix() -> None:
    """Embeddings: token frequencies as a (vocab,) vector give the same fit as diag(freq) as a matrix."""
    delta, _, _ = _problem(out=8, inp=12)
    frequencies = torch.rand(12, generator=torch.Generator().manual_seed(3))
    frequencies[5] = 0.0  # a token never seen
    as_vector = whitened_svd(delta, whitening(frequencies), 3, EXACT)
    as_matrix = whitened_svd(delta, whitening(torch.diag(frequencies)), 3, EXACT)
    torch.testing.assert_close(_truncation(as_vector, 3), _truncation(as_matrix, 3),
                               atol=1e-4, rtol=1e-4)
    # Without damping the unseen token's column is left out of the fit entirely.
    undamped = whitened_svd(delta, whitening(frequencies, damping=0.0), 3, EXACT)
    assert float(_truncation(undamped, 3)[:, 5].abs().max()) < 1e-6


@pytest.mark.parametrize("kind", ["identity", "full", "diagonal"])
def test_error_meter_matches_the_errors_computed_directly(kind: str) -> None:
    delta, x, moment = _problem()
    weights = {"identity": None, "full": moment, "diagonal": moment.diagonal().clone()}[kind]
    for fit in (EXACT(delta, 6), whitened_svd(delta, whitening(moment), 6, EXACT)):
        curve = ErrorMeter(delta, weights).curve(fit.u, fit.s, fit.vh)
        for rank in range(7):
            residual = delta.double() - _truncation(fit, rank) if rank else delta.double()
            c = torch.eye(delta.shape[1]) if weights is None else weights if weights.ndim == 2 else torch.diag(weights)
            expected = float(torch.trace(residual @ c.double() @ residual.T))
            assert float(curve[rank]) == pytest.approx(expected, rel=1e-4, abs=1e-6 * float(curve[0]))


def test_weight_error_of_the_whitened_fit_is_never_below_the_plain_svd() -> None:
    delta, _, moment = _problem()
    fit = whitened_svd(delta, whitening(moment), 8, EXACT)
    plain = EXACT(delta, 8)
    for rank in range(1, 9):
        assert fit.weight_relative_error(rank) >= plain.relative_error(rank) * (1 - 1e-5)


def test_bad_second_moments_are_refused() -> None:
    with pytest.raises(InvalidOptionError, match="zero"):
        whitening(torch.zeros(4, 4))
    with pytest.raises(InvalidOptionError, match="damping"):
        whitening(torch.eye(4), damping=-1.0)
    with pytest.raises(InvalidOptionError, match="shape"):
        whitening(torch.ones(3, 4))


def test_output_aware_fit_whitens_when_the_held_out_half_agrees() -> None:
    delta, x, moment = _problem(tokens=2000)
    halves = (x[0::2].T @ x[0::2] / 1000, x[1::2].T @ x[1::2] / 1000)
    fit = output_aware_fit(delta, moment, halves, 10, lambda s, total: 3, EXACT)
    assert fit.route == "whitened" and fit.heldout_relative_errors[0] < fit.heldout_relative_errors[1]
    assert fit.output_relative_error < 0.9 * fit.plain_output_relative_error
    assert fit.weight_relative_error > EXACT(delta, 3).relative_error(3)
    ours = _objective(delta, _truncation(fit.svd, 3), x)
    assert fit.output_relative_error ** 2 == pytest.approx(ours / _objective(delta, torch.zeros_like(delta), x),
                                                           rel=1e-3)


def test_output_aware_fit_falls_back_to_the_plain_svd_where_whitening_does_not_generalize() -> None:
    """Each half of the calibration inputs excites other directions: a fit whitened on one half neglects what
    the other half needs, so the held-out check keeps the plain SVD."""
    delta, _, _ = _problem()
    generator = torch.Generator().manual_seed(4)
    first = torch.zeros(500, 10)
    first[:, :5] = torch.randn(500, 5, generator=generator)
    second = torch.zeros(500, 10)
    second[:, 5:] = torch.randn(500, 5, generator=generator)
    halves = (first.T @ first / 500, second.T @ second / 500)
    fit = output_aware_fit(delta, (halves[0] + halves[1]) / 2, halves, 3, lambda s, total: 3, EXACT)
    assert fit.route == "plain" and fit.heldout_relative_errors[0] > fit.heldout_relative_errors[1]
    assert fit.weight_relative_error == pytest.approx(EXACT(delta, 3).relative_error(3))
    assert fit.output_relative_error == fit.plain_output_relative_error


# --- the output side: Fisher-weighted (K-FAC) fits


def _output_moment(out: int = 14, tokens: int = 300, seed: int = 7) -> torch.Tensor:
    """G = E[ggᵀ] of gradients at the outputs, with very unequal scales per direction."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(out, out, generator=generator, dtype=torch.float64)
    g = (torch.randn(tokens, out, generator=generator, dtype=torch.float64) * torch.logspace(.5, -.5, out)) @ mix
    return (g.T @ g / tokens).float()


def _weighted_objective(delta: torch.Tensor, fit: torch.Tensor, moment: torch.Tensor, output: torch.Tensor) -> float:
    """tr(G (ΔW − M) C (ΔW − M)ᵀ), directly."""
    residual = delta.double() - fit.double()
    g = output.double() if output.ndim == 2 else torch.diag(output.double())
    return float(torch.trace(g @ residual @ moment.double() @ residual.T))


def _descend_weighted(delta: torch.Tensor, moment: torch.Tensor, output: torch.Tensor, rank: int, seed: int) -> float:
    """Alternating least squares on tr(G (ΔW − BA) C (ΔW − BA)ᵀ): each step is exact in one factor."""
    generator = torch.Generator().manual_seed(seed)
    target, c, g = delta.double(), moment.double(), output.double()
    a = torch.randn(rank, delta.shape[1], generator=generator, dtype=torch.float64)
    for _ in range(500):
        b = target @ c @ a.T @ torch.linalg.pinv(a @ c @ a.T)
        a = torch.linalg.pinv(b.T @ g @ b) @ b.T @ g @ target
    return _weighted_objective(delta, b @ a, moment, output)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_fisher_weighted_fit_is_optimal_on_the_two_sided_objective(rank: int) -> None:
    """With an output moment G too, no rank-r fit beats the closed form R⁻ᵀ·trunc(RᵀΔW L)·L⁻¹ on tr(G E C Eᵀ), and
    the input-only fit (which ignores G) is worse."""
    delta, _, moment = _problem()
    output = _output_moment()
    fit = whitened_svd(delta, whitening(moment, damping=0.0), rank, EXACT, whitening(output, damping=0.0))
    ours = _weighted_objective(delta, _truncation(fit, rank), moment, output)
    input_only = whitened_svd(delta, whitening(moment, damping=0.0), rank, EXACT)
    assert ours < 0.99 * _weighted_objective(delta, _truncation(input_only, rank), moment, output)
    for seed in range(3):
        assert ours <= _descend_weighted(delta, moment, output, rank, seed) * (1 + 1e-4)
    assert fit.output_relative_error(rank) ** 2 * fit.total_energy == pytest.approx(ours, rel=1e-4)
    # The left factors are mapped back (not orthonormal) but scaled to unit norm, for balanced stored factors.
    torch.testing.assert_close(torch.linalg.vector_norm(fit.u, dim=0), torch.ones(rank), atol=1e-5, rtol=0)


def test_diagonal_output_moment_matches_the_full_diagonal_matrix() -> None:
    """The head's output moment is kept as its diagonal: as a vector it fits as diag(G) does as a matrix."""
    delta, _, moment = _problem()
    diagonal = _output_moment().diagonal().clone()
    as_vector = whitened_svd(delta, whitening(moment), 3, EXACT, whitening(diagonal))
    as_matrix = whitened_svd(delta, whitening(moment), 3, EXACT, whitening(torch.diag(diagonal)))
    torch.testing.assert_close(_truncation(as_vector, 3), _truncation(as_matrix, 3), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["full", "diagonal"])
def test_error_meter_with_an_output_moment_matches_the_errors_computed_directly(kind: str) -> None:
    """No orthonormality is assumed: the two-sided fit's u and vh are both skewed, and the errors still agree."""
    delta, _, moment = _problem()
    output = _output_moment()
    output = output if kind == "full" else output.diagonal().clone()
    fits = (EXACT(delta, 6), whitened_svd(delta, whitening(moment), 6, EXACT),
            whitened_svd(delta, whitening(moment), 6, EXACT, whitening(output)))
    for fit in fits:
        curve = ErrorMeter(delta, moment, output).curve(fit.u, fit.s, fit.vh)
        for rank in range(7):
            expected = _weighted_objective(delta, _truncation(fit, rank), moment, output)
            assert float(curve[rank]) == pytest.approx(expected, rel=1e-4, abs=1e-6 * float(curve[0]))
        # and the weight-space errors of a skewed fit (G = C = I)
        plain_curve = ErrorMeter(delta).curve(fit.u, fit.s, fit.vh)
        for rank in range(7):
            expected = float(((delta.double() - _truncation(fit, rank)) ** 2).sum())
            assert float(plain_curve[rank]) == pytest.approx(expected, rel=1e-4, abs=1e-6 * float(plain_curve[0]))


def test_output_aware_fit_with_an_output_moment_reports_the_weighted_errors() -> None:
    delta, x, moment = _problem(tokens=2000)
    output = _output_moment()
    halves = (x[0::2].T @ x[0::2] / 1000, x[1::2].T @ x[1::2] / 1000)
    fit = output_aware_fit(delta, moment, halves, 10, lambda s, total: 3, EXACT, damping=0.0, output_moment=output,
                           output_halves=(output, output))
    assert fit.route == "whitened"
    ours = _weighted_objective(delta, _truncation(fit.svd, 3), moment, output)
    assert fit.output_relative_error ** 2 == pytest.approx(ours / _weighted_objective(delta, 0 * delta, moment, output),
                                                           rel=1e-3)
    assert fit.output_relative_error < 0.9 * fit.plain_output_relative_error


def test_output_aware_fit_with_an_output_moment_still_falls_back_where_whitening_does_not_generalize() -> None:
    """The planted case of the fallback test on both sides: each half excites other inputs, and its gradients
    other outputs, so a fit whitened on one half misses what the other needs and the plain SVD is kept."""
    delta, _, _ = _problem()
    generator = torch.Generator().manual_seed(4)

    def split(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = torch.zeros(500, width), torch.zeros(500, width)
        first[:, : width // 2] = torch.randn(500, width // 2, generator=generator)
        second[:, width // 2:] = torch.randn(500, width - width // 2, generator=generator)
        return first.T @ first / 500, second.T @ second / 500

    halves, output_halves = split(10), split(14)
    fit = output_aware_fit(delta, (halves[0] + halves[1]) / 2, halves, 3, lambda s, total: 3, EXACT,
                           output_moment=(output_halves[0] + output_halves[1]) / 2, output_halves=output_halves)
    assert fit.route == "plain" and fit.heldout_relative_errors[0] > fit.heldout_relative_errors[1]
    assert fit.output_relative_error == fit.plain_output_relative_error


def test_deferred_fit_reports_at_every_rank_what_the_fixed_rank_fit_reports() -> None:
    """A budget decides the rank later: the errors kept for every rank are those a fit at that rank reports."""
    from deltakit.math.whiten import DeferredOutputAwareFit

    delta, x, moment = _problem(tokens=2000)
    output = _output_moment()
    halves = (x[0::2].T @ x[0::2] / 1000, x[1::2].T @ x[1::2] / 1000)
    deferred = output_aware_fit(delta, moment, halves, 8, lambda s, total: None, EXACT, output_moment=output,
                                output_halves=(output, output))
    assert isinstance(deferred, DeferredOutputAwareFit) and deferred.svd.rank == 8
    for rank in (1, 3, 8):
        fixed = output_aware_fit(delta, moment, halves, 8, lambda s, total, rank=rank: rank, EXACT,
                                 output_moment=output, output_halves=(output, output))
        assert fixed.route == "whitened"
        at = deferred.at(rank)
        for ours, theirs in ((at.weight_relative_error, fixed.weight_relative_error),
                             (at.output_relative_error, fixed.output_relative_error),
                             (at.plain_output_relative_error, fixed.plain_output_relative_error),
                             *zip(at.heldout_relative_errors, fixed.heldout_relative_errors)):
            assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)
