"""DoRA extraction and application: exactness, quality against the naive fit, degenerate rows."""

from __future__ import annotations

import pytest
import torch
from builders import write_safetensors_pair
from safetensors.torch import load_file

import deltakit
from deltakit.math.dora import apply_dora, fit_magnitude, projection_scales, row_norms, unapply_dora

Q = "model.layers.0.self_attn.q_proj"
P = "base_model.model."


def _finetune_like(out: int, inp: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and a fine-tune that rescales rows (what DoRA's magnitudes capture) and adds a full-rank tail."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(out, inp, generator=gen)
    row_scale = 1 + 0.3 * torch.randn(out, 1, generator=gen)
    low_rank = torch.randn(out, 4, generator=gen) @ torch.randn(4, inp, generator=gen) * 0.3
    return base, row_scale * base + low_rank + 0.02 * torch.randn(out, inp, generator=gen)


def _adapter_weight(adapter_dir, base: torch.Tensor) -> torch.Tensor:
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    delta = tensors[f"{P}{Q}.lora_B.weight"].float() @ tensors[f"{P}{Q}.lora_A.weight"].float()
    return apply_dora(base, delta, tensors[f"{P}{Q}.lora_magnitude_vector"])[0]


def test_full_rank_dora_reproduces_finetune(tmp_path):
    base, ft = _finetune_like(40, 24, seed=0)
    base_dir, ft_dir = write_safetensors_pair(tmp_path, {f"{Q}.weight": base}, {f"{Q}.weight": ft})
    deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=24, dora=True, svd="exact", carry=False)  # factors
    got = _adapter_weight(tmp_path / "a", base)
    assert (got - ft).norm() / ft.norm() < 1e-5


@pytest.mark.parametrize("rank", [1, 2, 4, 8])
def test_dora_beats_naive_fit_and_lora_at_equal_rank(tmp_path, rank):
    """Naive: m = ‖w_ft‖ per row with the rank-r SVD of W_ft − W0 as direction (what a simple extractor does)."""
    base, ft = _finetune_like(64, 48, seed=rank)
    base_dir, ft_dir = write_safetensors_pair(tmp_path, {f"{Q}.weight": base}, {f"{Q}.weight": ft})
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=rank, dora=True, svd="exact")
    ours = (_adapter_weight(tmp_path / "a", base) - ft).norm()

    u, s, vh = torch.linalg.svd(ft - base, full_matrices=False)
    lora_delta = (u[:, :rank] * s[:rank]) @ vh[:rank]
    naive = (apply_dora(base, lora_delta, row_norms(ft))[0] - ft).norm()
    lora = (base + lora_delta - ft).norm()
    assert ours < naive and ours < lora
    (module,) = report.modules
    assert module.relative_error == pytest.approx(float(ours / (ft - base).norm()), rel=1e-4)
    assert module.lora_relative_error == pytest.approx(float(lora / (ft - base).norm()), rel=1e-4)


def test_zero_rows_and_negative_scales_give_no_nan():
    base = torch.randn(6, 5)
    ft = base.clone()
    base[0] = 0  # a dead row in the base
    ft[0] = 0
    ft[1] = -base[1]  # anti-correlated: the projection scale would be negative
    ft[2] = 0  # a row the fine-tune zeroed
    scales = projection_scales(base, ft)
    assert torch.all(scales > 0)
    magnitude = fit_magnitude(base, ft)
    merged, norms = apply_dora(base, torch.zeros_like(base), magnitude)
    assert torch.isfinite(merged).all() and torch.isfinite(norms).all()
    assert torch.equal(merged[0], torch.zeros(5))
    restored = unapply_dora(merged, torch.zeros_like(base), magnitude, norms)
    assert torch.isfinite(restored).all()


def test_unchanged_module_is_skipped_under_dora(tmp_path):
    base, ft = _finetune_like(16, 12, seed=3)
    other = "model.layers.0.self_attn.k_proj.weight"
    base_dir, ft_dir = write_safetensors_pair(
        tmp_path, {f"{Q}.weight": base, other: base.clone()}, {f"{Q}.weight": ft, other: base.clone()})
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank=2, dora=True)
    assert [m.module for m in report.modules] == [Q]
    assert report.unchanged == 1
