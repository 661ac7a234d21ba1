"""``inspect`` on a raw checkpoint pair with planted deltas (signal of known rank + Gaussian noise): the JSON report
against direct computation, the noise floor against the planted ranks, the frontier against the allocator's
promise, and the plots with and without matplotlib."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from builders import signal_plus_noise, write_safetensors_pair

from deltakit.ops import plots
from deltakit.errors import InvalidOptionError, NothingToExtractError, OutputExistsError
from deltakit.ops.inspect import REPORT_FILE, inspect
from deltakit.math.ranks import rank_for_energy

_NOISE = 1e-3
# module → (stored shape, (out, in) in PEFT's orientation, planted rank, strength in units of the noise bulk edge)
_PLANTED = {
    "model.layers.0.self_attn.q_proj": ((64, 64), (64, 64), 3, 5.0),
    "model.layers.0.mlp.up_proj": ((96, 64), (96, 64), 6, 8.0),
    "model.layers.1.self_attn.q_proj": ((64, 64), (64, 64), 1, 40.0),
    "model.layers.1.mlp.up_proj": ((96, 64), (96, 64), 10, 20.0),
    "model.embed_tokens": ((200, 64), (64, 200), 2, 10.0),  # nn.Embedding: (num_embeddings, dim), out = dim
    "transformer.h.0.attn.c_attn": ((64, 192), (192, 64), 4, 6.0),  # GPT-2 Conv1D: stored (in, out)
}


def _planted_delta(out_in: tuple[int, int], rank: int, strength: float, seed: int) -> torch.Tensor:
    return signal_plus_noise(out_in, rank, strength, _NOISE, seed)


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory: pytest.TempPathFactory):
    """(base_dir, ft_dir, {module: ΔW in (out, in), fp64}, {module: W0 stored})."""
    generator = torch.Generator().manual_seed(0)
    base, finetuned, deltas = {}, {}, {}
    for seed, (module, (stored, out_in, rank, strength)) in enumerate(_PLANTED.items()):
        weight = 0.05 * torch.randn(stored, generator=generator)
        delta = _planted_delta(out_in, rank, strength, seed)
        stored_delta = delta if stored == out_in else delta.T
        base[f"{module}.weight"] = weight
        finetuned[f"{module}.weight"] = (weight.double() + stored_delta).float()
        deltas[module] = finetuned[f"{module}.weight"].double() - weight.double()
        if stored != out_in:
            deltas[module] = deltas[module].T
    unchanged = 0.05 * torch.randn(32, 64, generator=generator)
    base["model.layers.1.self_attn.k_proj.weight"] = finetuned["model.layers.1.self_attn.k_proj.weight"] = unchanged
    base["model.norm.weight"], finetuned["model.norm.weight"] = torch.ones(64), torch.full((64,), 1.1)
    root = tmp_path_factory.mktemp("planted")
    base_dir, ft_dir = write_safetensors_pair(root, base, finetuned)
    return base_dir, ft_dir, deltas, base


def _without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import matplotlib`` fail as it does when the package is not installed."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_json_report_matches_direct_computation(planted_pair, tmp_path, monkeypatch):
    _without_matplotlib(monkeypatch)
    base_dir, ft_dir, deltas, base = planted_pair
    report = inspect(ft_dir, base_dir, tmp_path / "report", ranks=(2, 8, 48, 64), max_rank=32, svd="exact")
    written = json.loads((tmp_path / "report" / REPORT_FILE).read_text())
    assert written == json.loads(json.dumps(report.to_json()))
    assert written["summary"]["modules"] == len(_PLANTED)
    assert written["summary"]["unchanged_weights"] == 1
    assert written["summary"]["bytes_per_param"] == 4
    assert written["options"]["ranks"] == [2, 8, 48, 64] and written["options"]["max_rank"] == 32
    by_name = {m["module"]: m for m in written["modules"]}
    assert set(by_name) == set(_PLANTED)  # 1-D norms and unchanged weights are not listed
    for module, (stored, out_in, rank, _) in _PLANTED.items():
        entry, delta = by_name[module], deltas[module]
        s = torch.linalg.svdvals(delta)
        assert entry["shape"] == list(stored) and entry["out_in"] == list(out_in)
        assert entry["kind"] == {"model.embed_tokens": "embedding", "transformer.h.0.attn.c_attn": "conv1d"}.get(
            module, "linear")
        assert entry["delta_norm"] == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-6)
        base_norm = float(torch.linalg.norm(base[f"{module}.weight"].double()))
        assert entry["relative_change"] == pytest.approx(entry["delta_norm"] / base_norm, rel=1e-6)
        assert len(entry["singular_values"]) == 32
        assert entry["singular_values"] == pytest.approx(s[:32].tolist(), rel=1e-4, abs=1e-7)
        energy = s.square().cumsum(0) / s.square().sum()
        assert entry["energy_retained"]["2"] == pytest.approx(float(energy[1]), rel=1e-5)
        assert entry["energy_retained"]["8"] == pytest.approx(float(energy[7]), rel=1e-5)
        assert "48" not in entry["energy_retained"]  # above max_rank 32 and below min(out, in): unknown
        assert entry["energy_retained"]["64"] == 1.0  # min(out, in) is 64 everywhere: all of ΔW
        suggested = entry["suggested_ranks"]
        assert suggested["noise_floor"] == rank
        assert suggested["energy_0.9"] == rank_for_energy(s[:32], float(s.square().sum()), 0.9)
        assert entry["noise_sigma"] == pytest.approx(_NOISE, rel=0.1)
        assert entry["layer"] == (int(module.split(".")[2]) if ".layers." in module else
                                  0 if module.startswith("transformer.h.0") else None)
        assert entry["type"] == module.rpartition(".")[2]


def test_frontier_budget_is_never_worse_and_fits_the_uniform_size(planted_pair, monkeypatch):
    _without_matplotlib(monkeypatch)
    base_dir, ft_dir, _, _ = planted_pair
    report = inspect(ft_dir, base_dir, ranks=(1, 2, 4, 8, 16), max_rank=32, svd="exact")
    assert [p.rank for p in report.frontier] == [1, 2, 4, 8, 16]
    for point in report.frontier:
        chosen = [m.suggested_ranks[f"budget_r{point.rank}"] for m in report.modules]
        assert sum(r * sum(m.out_in) for r, m in zip(chosen, report.modules)) <= point.params
        assert point.params == sum(min(point.rank, *m.out_in) * sum(m.out_in) for m in report.modules)
        assert point.budget_squared_error <= point.uniform_squared_error * (1 + 1e-9)
    # Planted ranks 1..10 of very different strengths: between ranks 2 and 8 spending by σ²/(out+in) pays a lot
    # (at rank 1 there is nothing to move, at 16 every planted direction is in both).
    assert all(p.budget_squared_error < 0.5 * p.uniform_squared_error for p in report.frontier[1:4])


def test_table_lists_modules_frontier_and_notes(planted_pair, tmp_path, monkeypatch):
    _without_matplotlib(monkeypatch)
    base_dir, ft_dir, _, _ = planted_pair
    lines = inspect(ft_dir, base_dir, tmp_path / "report", ranks=(4, 16), max_rank=16).table_lines()
    text = "\n".join(lines)
    for module in _PLANTED:
        assert sum(line.startswith(module + " ") for line in lines) == 1
    assert "E@4" in lines[0] and "E@16" in lines[0] and "r auto" in lines[0]
    assert "uniform rank vs --budget allocation" in text
    assert "1 factorizable weight(s) unchanged" in text
    assert lines[-1] == plots.SKIPPED_NOTE


def test_plots_are_written_with_matplotlib(planted_pair, tmp_path):
    pytest.importorskip("matplotlib")
    base_dir, ft_dir, _, _ = planted_pair
    report = inspect(ft_dir, base_dir, tmp_path / "report", ranks=(2, 8), max_rank=16)
    assert report.plots == [plots.ENERGY_PLOT, plots.HEATMAP_PLOT, plots.FRONTIER_PLOT]
    for name in report.plots:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    written = json.loads((tmp_path / "report" / REPORT_FILE).read_text())
    assert written["plots"] == report.plots and written["notes"] == []


def test_without_matplotlib_the_report_says_so_and_writes_no_png(planted_pair, tmp_path, monkeypatch):
    _without_matplotlib(monkeypatch)
    base_dir, ft_dir, _, _ = planted_pair
    report = inspect(ft_dir, base_dir, tmp_path / "report", ranks=(2, 8), max_rank=16)
    assert report.plots == [] and report.notes == [
        "plots skipped: matplotlib is not installed (pip install 'deltakit[plot]')"]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [REPORT_FILE]
    assert json.loads((tmp_path / "report" / REPORT_FILE).read_text())["notes"] == report.notes


def test_without_out_nothing_is_written_and_no_plot_is_tried(planted_pair, tmp_path, monkeypatch):
    _without_matplotlib(monkeypatch)
    base_dir, ft_dir, _, _ = planted_pair
    monkeypatch.chdir(tmp_path)
    report = inspect(ft_dir, base_dir, ranks=(2,), max_rank=8)
    assert report.out is None and report.notes == [] and list(tmp_path.iterdir()) == []


def test_include_exclude_select_modules(planted_pair, monkeypatch):
    _without_matplotlib(monkeypatch)
    base_dir, ft_dir, _, _ = planted_pair
    report = inspect(ft_dir, base_dir, ranks=(2,), max_rank=8, include=[r"layers\.0\."], exclude=["mlp"])
    assert [m.module for m in report.modules] == ["model.layers.0.self_attn.q_proj"]


def test_existing_output_needs_overwrite(planted_pair, tmp_path, monkeypatch):
    _without_matplotlib(monkeypatch)
    base_dir, ft_dir, _, _ = planted_pair
    out_dir = tmp_path / "report"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        inspect(ft_dir, base_dir, out_dir, ranks=(2,), max_rank=8)
    inspect(ft_dir, base_dir, out_dir, ranks=(2,), max_rank=8, overwrite=True)
    assert sorted(p.name for p in out_dir.iterdir()) == [REPORT_FILE]


def test_identical_checkpoints_and_bad_options_are_refused(planted_pair, tmp_path):
    base_dir, ft_dir, _, _ = planted_pair
    with pytest.raises(NothingToExtractError, match="no factorizable weight differs"):
        inspect(base_dir, base_dir)
    with pytest.raises(InvalidOptionError, match="max-rank"):
        inspect(ft_dir, base_dir, max_rank=0)
    with pytest.raises(InvalidOptionError, match="ranks"):
        inspect(ft_dir, base_dir, ranks=(0, 8))
    assert not (tmp_path / "report").exists()
