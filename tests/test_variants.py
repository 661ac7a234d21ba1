"""The adapter-variant interface (adapters/variants.py) on its own: each variant's fit, its deferred completion,
and its block steps, which must merge as the whole-matrix DoRA/LoRA math does and unmerge back exactly."""

from __future__ import annotations

import pytest
import torch
from builders import low_rank_delta

from deltakit.adapters.layers import WeightKind
from deltakit.adapters.variants import DORA, LORA, DeltaPair, FitSettings
from deltakit.math.dora import apply_dora
from deltakit.math.lowrank import SvdOptions

SETTINGS = FitSettings(alpha=None, use_rslora=False, svd=SvdOptions("exact"), device=torch.device("cpu"))


def _pair(rank: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 8, generator=generator)
    return base, base + low_rank_delta(12, 8, rank, seed=seed + 1)


def _fit(variant, base, ft, rank, choose=None):
    pair = DeltaPair(base.clone(), ft - base, ft.clone() if variant.needs_weights else None)
    return variant.fit(pair, rank, choose or (lambda s, total: rank), "m", WeightKind.LINEAR, torch.float32, SETTINGS)


@pytest.mark.parametrize("variant", [LORA, DORA])
def test_fit_at_the_delta_rank_recovers_the_finetune(variant):
    base, ft = _pair(rank=3)
    fit = _fit(variant, base, ft, 3)
    factors = fit.factors
    assert factors.rank == 3 and fit.pending is None
    if factors.magnitude is None:
        rebuilt = base + factors.delta()
    else:
        rebuilt, _ = apply_dora(base, factors.delta(), factors.magnitude)
    torch.testing.assert_close(rebuilt, ft, rtol=0, atol=1e-4)
    assert fit.metrics["relative_error"] < 1e-4
    assert fit.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(ft - base)), rel=1e-5)
    assert ("lora_relative_error" in fit.metrics) == (variant is DORA)


def test_lora_fit_left_to_a_budget_completes_as_a_direct_fit():
    base, ft = _pair(rank=5)
    deferred = _fit(LORA, base, ft, 5, choose=lambda s, total: None)
    assert deferred.factors is None and deferred.pending is not None
    factors, metrics = LORA.complete(deferred.pending, 2, "m", WeightKind.LINEAR, torch.float32, SETTINGS)
    direct = _fit(LORA, base, ft, 5, choose=lambda s, total: 2)
    assert torch.equal(factors.a, direct.factors.a) and torch.equal(factors.b, direct.factors.b)
    assert metrics == direct.metrics


def test_only_lora_can_leave_its_rank_to_a_budget():
    assert LORA.budget_refusal is None and DORA.budget_refusal is not None


def _blocks(steps, matrix, *, inverse, rows_per_block):
    """Apply block steps as merge does: block by block of rows, each step in turn."""
    out = matrix.clone()
    for r0 in range(0, matrix.shape[0], rows_per_block):
        rows = slice(r0, min(matrix.shape[0], r0 + rows_per_block))
        work, base = out[rows].clone(), matrix[rows].clone()
        for step in steps:
            work = step.unmerge(work, rows) if inverse else step.merge(work, base, rows)
        out[rows] = work
    return out


@pytest.mark.parametrize("rows_per_block", [1, 5, 12])
def test_block_steps_merge_like_the_whole_matrix_math_and_unmerge_back(rows_per_block):
    base, ft = _pair(rank=3)
    lora = _fit(LORA, base, ft, 2).factors
    dora = _fit(DORA, base, ft, 2).factors
    weight = 0.5
    steps = [LORA.block_step(lora, weight, torch.device("cpu")), DORA.block_step(dora, 1.0, torch.device("cpu"))]
    merged = _blocks(steps, base, inverse=False, rows_per_block=rows_per_block)
    # PEFT's order: the DoRA norms are of W0 + ΔW_dora, the rescaling applies to what was merged before it too.
    expected_norms = torch.linalg.vector_norm(base + dora.delta(), dim=1)
    expected = (dora.magnitude / expected_norms)[:, None] * (base + weight * lora.delta() + dora.delta())
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps[1].state, expected_norms, rtol=1e-6, atol=0)
    assert steps[0].state is None and LORA.has_state is False and DORA.has_state is True
    undo = [LORA.block_step(lora, weight, torch.device("cpu")),
            DORA.block_step(dora, 1.0, torch.device("cpu"), steps[1].state)]
    restored = _blocks(undo[::-1], merged, inverse=True, rows_per_block=rows_per_block)
    torch.testing.assert_close(restored, base, rtol=1e-5, atol=1e-5)


def test_dora_block_step_keeps_a_zero_norm_row_zero():
    """W0 + ΔW = 0 in a row: PEFT would divide by zero there; the merged row stays 0, not NaN."""
    base, ft = _pair()
    factors = _fit(DORA, base, ft, 2).factors
    zero_row_base = base.clone()
    zero_row_base[3] = -factors.delta()[3]
    merged = _blocks([DORA.block_step(factors, 1.0, torch.device("cpu"))], zero_row_base, inverse=False,
                     rows_per_block=12)
    assert torch.isfinite(merged).all() and torch.equal(merged[3], torch.zeros(8))
