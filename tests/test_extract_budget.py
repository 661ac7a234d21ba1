"""extract under a global budget and with --rank auto: what is spent, what is reported, what is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from builders import low_rank_delta, write_safetensors_pair

import deltakit
from deltakit.errors import InvalidOptionError
from deltakit.math.ranks import BudgetRanks, ModuleSpectrum

SHAPES = {"layers.0.q_proj": (48, 32), "layers.0.up_proj": (64, 32), "layers.1.q_proj": (48, 32)}


@pytest.fixture
def pair(tmp_path):
    """Three modules whose deltas differ in size by 10× and in rank."""
    base, ft = {}, {}
    for i, (name, (out, inp)) in enumerate(SHAPES.items()):
        w0 = torch.randn(out, inp, generator=torch.Generator().manual_seed(i))
        base[f"{name}.weight"] = w0
        ft[f"{name}.weight"] = w0 + low_rank_delta(out, inp, 6, seed=10 + i, scale=10.0 ** -i, decay=0.7)
    return write_safetensors_pair(tmp_path, base, ft)


def test_budget_is_spent_within_its_size_and_reported(pair, tmp_path):
    base_dir, ft_dir = pair
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", budget="2000params", svd="exact",
                              budget_weighting="absolute")
    used = sum(m.rank * sum(m.shape) for m in report.modules)
    assert used <= 2000 and report.budget["params"] == 2000 and report.budget["params_used"] == used
    # The biggest delta gets the most rank.
    ranks = {m.module: m.rank for m in report.modules}
    assert ranks["layers.0.q_proj"] > ranks["layers.1.q_proj"]
    # The predicted error is the Eckart–Young error of the chosen ranks, which exact SVD attains (up to the
    # cancellation in ‖ΔW‖² − Σ s² with fp32 singular values: the tail here is 1e-4 of the energy).
    total = sum(m.delta_norm**2 for m in report.modules)
    measured = (sum((m.relative_error * m.delta_norm) ** 2 for m in report.modules) / total) ** 0.5
    assert report.budget["predicted_relative_error"] == pytest.approx(measured, rel=1e-2)
    written = json.loads((tmp_path / "a" / "extract_report.json").read_text())
    assert written["budget"]["params_used"] == used
    assert "budget" in (tmp_path / "a" / "README.md").read_text()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "extract_report.json"]  # no spill left


def test_budget_in_bytes_counts_the_stored_dtype(pair, tmp_path):
    base_dir, ft_dir = pair
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", budget="8KB", dtype="float16")
    spent = report.budget
    assert spent["bytes_per_param"] == 2 and spent["params"] <= 4000
    # The file's parts, each at its stored width, add up to its size, which the budget bounds.
    assert (spent["params_used"] * 2 + spent["carried_bytes"] + spent["header_bytes"] == spent["file_bytes"]
            == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size <= 8000)


def test_avg_rank_matches_the_uniform_adapter_size(pair, tmp_path):
    base_dir, ft_dir = pair
    uniform = deltakit.extract(ft_dir, base_dir, tmp_path / "u", rank=2, svd="exact")
    budget = deltakit.extract(ft_dir, base_dir, tmp_path / "b", avg_rank=2, svd="exact", budget_weighting="absolute")
    assert budget.budget["params"] == sum(m.rank * sum(m.shape) for m in uniform.modules)
    squared = [sum((m.relative_error * m.delta_norm) ** 2 for m in r.modules) for r in (uniform, budget)]
    assert squared[1] < squared[0]


def test_rank_auto_finds_the_planted_rank(tmp_path):
    out, inp, k = 200, 150, 5
    w0 = torch.randn(out, inp, generator=torch.Generator().manual_seed(0))
    signal = low_rank_delta(out, inp, k, seed=1, scale=1.0)
    noise = 1e-3 * torch.randn(out, inp, generator=torch.Generator().manual_seed(2))
    base_dir, ft_dir = write_safetensors_pair(tmp_path, {"q.weight": w0}, {"q.weight": w0 + signal + noise})
    report = deltakit.extract(ft_dir, base_dir, tmp_path / "a", rank="auto")
    assert [m.rank for m in report.modules] == [k]


@pytest.mark.parametrize("options, message", [
    ({"budget": "1MB", "energy": 0.9}, "give only one"),
    ({"budget": "1MB", "rank": "auto"}, "give only one"),
    ({"budget": "1MB", "rank_pattern": [("q_proj", 4)]}, "rank-pattern"),
    ({"budget": "1MB", "dora": True}, "dora"),
    ({"min_rank": 2}, "--min-rank only applies"),
    ({"max_rank": 8}, "--max-rank only applies"),
    ({"budget": "3M"}, "ambiguous"),
    ({"avg_rank": 2, "min_rank": 4, "max_rank": 2}, "below min rank"),
    ({"budget": "10params", "min_rank": 2}, "cannot pay"),
])
def test_conflicting_or_impossible_options_are_refused_before_writing(pair, tmp_path, options, message):
    base_dir, ft_dir = pair
    with pytest.raises(InvalidOptionError, match=message):
        deltakit.extract(ft_dir, base_dir, tmp_path / "a", **options)
    assert not (tmp_path / "a").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.")]  # no staging left either


def test_cli_budget_and_auto(pair, tmp_path):
    base_dir, ft_dir = pair

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "deltakit", "extract", str(ft_dir), str(base_dir), *args],
                              capture_output=True, text=True)

    result = run("--budget", "2000params", "-o", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert "budget" in result.stderr and "2,000 factor parameters" in result.stderr
    result = run("-r", "auto", "-o", str(tmp_path / "auto"))
    assert result.returncode == 0, result.stderr
    result = run("-r", "4", "--budget", "1MB", "-o", str(tmp_path / "c"))
    assert result.returncode == 2 and "give only one" in result.stderr
    result = run("-r", "many", "-o", str(tmp_path / "d"))
    assert result.returncode == 2 and "auto" in result.stderr


def test_default_budget_weighting_is_the_largest_uniform_rank_that_fits(pair, tmp_path):
    """Issue 14: neither spectrum weighting was never-worse than uniform rank on bench_quality.py, so the default
    allocation is uniform rank at the size asked for."""
    base_dir, ft_dir = pair
    uniform = deltakit.extract(ft_dir, base_dir, tmp_path / "u", rank=3, svd="exact")
    by_rank = deltakit.extract(ft_dir, base_dir, tmp_path / "r", avg_rank=3, svd="exact")
    assert [m.rank for m in by_rank.modules] == [m.rank for m in uniform.modules]
    assert by_rank.budget["weighting"] == "uniform"
    size = sum(m.rank * sum(m.shape) for m in uniform.modules)
    just_under = deltakit.extract(ft_dir, base_dir, tmp_path / "b", budget=f"{size - 1}params", svd="exact")
    assert {m.rank for m in just_under.modules} == {2}  # rank 3 no longer fits everywhere


def test_uniform_allocation_respects_caps_and_floors():
    spectra = [ModuleSpectrum("a", (4, 100), torch.ones(4), 4.0), ModuleSpectrum("b", (50, 60), torch.ones(50), 50.0)]
    # rank r costs min(r, 4)·104 + r·110: r = 10 costs 416 + 1100 = 1516
    assert BudgetRanks(1516, weighting="uniform").allocate(spectra) == [4, 10]
    assert BudgetRanks(1515, weighting="uniform").allocate(spectra) == [4, 9]
    assert BudgetRanks(1515, min_rank=6, weighting="uniform").allocate(spectra) == [4, 9]
