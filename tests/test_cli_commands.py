"""End to end through the CLI: merge, unmerge, stack, inspect and batch on tiny raw checkpoints, and Hub ids.

Inputs are raw safetensors checkpoints whose fine-tune differs from the base by an exact rank-2 delta on two
Linear weights (so a rank-2 extraction is lossless), and PEFT adapters written here by hand from known factors
(lora_alpha ≠ r, so a forgotten scaling shows). Expected outputs are computed from those tensors, never read
back through deltakit.

Most commands run in this process through :func:`deltakit.cli.main`, the function ``python -m deltakit`` calls
(click parsing, the error boundary, the exit codes and stderr are all real): a subprocess costs about 2 s of
interpreter and torch start-up on the 2-core machine, which would put this file far over its time budget. A
merge smoke test and every Hub test run as real ``python -m deltakit`` subprocesses with the test's environment
(offline, private cache), the Hub ones with the cache laid out by ``test_hub.seed_repo``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from builders import low_rank_delta, write_safetensors_pair
from safetensors.torch import load_file, save
from test_hub import COMMIT, CONFIG, seed_repo

from deltakit.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
Q_MODULE = "model.layers.0.self_attn.q_proj"
V_MODULE = "model.layers.0.self_attn.v_proj"
Q, V, NORM = f"{Q_MODULE}.weight", f"{V_MODULE}.weight", "model.norm.weight"
FT_COMMIT = hashlib.sha1(b"ft").hexdigest()
ADAPTER_COMMIT = hashlib.sha1(b"adapter").hexdigest()
FP32_EPS = torch.finfo(torch.float32).eps


# --- inputs ------------------------------------------------------------------------------------------------------


def _base_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {Q: torch.randn(32, 24, generator=generator), V: torch.randn(16, 24, generator=generator),
            NORM: torch.randn(24, generator=generator)}


def _finetuned_tensors() -> dict[str, torch.Tensor]:
    """The base plus an exact rank-2 delta (singular values 1 and 0.5) on q_proj and v_proj; the norm unchanged."""
    base = _base_tensors()
    return {Q: base[Q] + low_rank_delta(32, 24, 2, seed=1), V: base[V] + low_rank_delta(16, 24, 2, seed=2),
            NORM: base[NORM].clone()}


class HandAdapter:
    """A PEFT LoRA adapter built from known factors: ``delta(module)`` is what PEFT applies, (alpha / r) · B @ A."""

    def __init__(self, rank: int, alpha: float, shapes: dict[str, tuple[int, int]], seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.rank, self.alpha = rank, alpha
        self.factors = {module: (0.3 * torch.randn(rank, inp, generator=generator),  # A (r, in)
                                 0.3 * torch.randn(out, rank, generator=generator))  # B (out, r)
                        for module, (out, inp) in shapes.items()}

    def delta(self, module: str) -> torch.Tensor:
        a, b = self.factors[module]
        return self.alpha / self.rank * (b @ a)

    def files(self) -> dict[str, bytes]:
        """``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT 0.21 writes them."""
        config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "r": self.rank,
                  "lora_alpha": self.alpha, "use_rslora": False, "use_dora": False,
                  "target_modules": sorted(self.factors), "rank_pattern": {}, "alpha_pattern": {},
                  "fan_in_fan_out": False, "modules_to_save": None, "bias": "none", "lora_dropout": 0.0,
                  "inference_mode": True}
        weights = {}
        for module, (a, b) in self.factors.items():
            weights[f"base_model.model.{module}.lora_A.weight"] = a
            weights[f"base_model.model.{module}.lora_B.weight"] = b
        return {"adapter_config.json": json.dumps(config).encode(),
                "adapter_model.safetensors": save(weights, metadata={"format": "pt"})}

    def write(self, adapter_dir: Path) -> Path:
        adapter_dir.mkdir(parents=True)
        for name, data in self.files().items():
            (adapter_dir / name).write_bytes(data)
        return adapter_dir


# Adapter A: q_proj and v_proj, r=2, alpha=3 (scaling 1.5). Adapter B: q_proj only, r=3, alpha=6 (scaling 2).
ADAPTER_A = HandAdapter(2, 3.0, {Q_MODULE: (32, 24), V_MODULE: (16, 24)}, seed=10)
ADAPTER_B = HandAdapter(3, 6.0, {Q_MODULE: (32, 24)}, seed=11)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Read-only: ``base``, ``finetuned`` checkpoint directories and adapter directories ``a``, ``b``."""
    root = tmp_path_factory.mktemp("cli_inputs")
    base_dir, ft_dir = write_safetensors_pair(root, _base_tensors(), _finetuned_tensors())
    return {"base": base_dir, "finetuned": ft_dir,
            "a": ADAPTER_A.write(root / "adapter_a"), "b": ADAPTER_B.write(root / "adapter_b")}


# --- running the CLI ---------------------------------------------------------------------------------------------


@pytest.fixture
def deltakit_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``deltakit ARGS...`` in this process through ``cli.main``; returns exit code, stdout and stderr."""

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        argv = [str(a) for a in args]
        capsys.readouterr()
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code  # main exits with an int, or returns: 0
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(["deltakit", *argv], code, captured.out, captured.err)

    return run


def _subprocess(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m deltakit ARGS...`` with this test's environment (offline, private HF cache)."""
    # The package is not installed: from another working directory, it is found through PYTHONPATH.
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "deltakit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": pythonpath}, timeout=120)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single line a DeltakitError becomes on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltakit: error: "), result.stderr
    return lines[0]


def _peft_delta(adapter_dir: Path, module: str) -> torch.Tensor:
    """ΔW of one module as PEFT 0.21 computes it: r and alpha from the first matching pattern key, else the config."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")

    def pattern_value(field: str, default: float) -> float:
        # peft/utils/other.py::get_pattern_key: the first key (in dict order) that matches as a name suffix.
        return next((v for k, v in (config.get(field) or {}).items() if re.match(rf"(.*\.)?({k})$", module)), default)

    rank, alpha = pattern_value("rank_pattern", config["r"]), pattern_value("alpha_pattern", config["lora_alpha"])
    a = weights[f"base_model.model.{module}.lora_A.weight"]
    b = weights[f"base_model.model.{module}.lora_B.weight"]
    assert a.shape[0] == b.shape[1] == rank
    return alpha / rank * (b.float() @ a.float())


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --- merge -------------------------------------------------------------------------------------------------------


def test_merge_writes_base_plus_scaled_delta(inputs: dict[str, Path], tmp_path: Path) -> None:
    """A real ``python -m deltakit`` process: the summary on stderr, nothing on stdout, W = W0 + (α/r)·B@A."""
    out_dir = tmp_path / "merged"
    result = _subprocess("merge", inputs["base"], inputs["a"], "-o", out_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert f"wrote {out_dir}" in result.stderr and "tensors changed    : 2 (lora 2)" in result.stderr
    merged, base = load_file(out_dir / "model.safetensors"), _base_tensors()
    assert list(merged) == list(base)
    # By hand, for q_proj: scaling 3/2 times B (32, 2) @ A (2, 24).
    a, b = ADAPTER_A.factors[Q_MODULE]
    torch.testing.assert_close(merged[Q], base[Q] + 1.5 * (b @ a), rtol=0, atol=1e-5)
    torch.testing.assert_close(merged[V], base[V] + ADAPTER_A.delta(V_MODULE), rtol=0, atol=1e-5)
    assert torch.equal(merged[NORM], base[NORM])


def test_merge_weight_half_halves_the_delta(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    result = deltakit_cli("merge", inputs["base"], inputs["a"], "-w", "0.5", "-o", tmp_path / "half")
    assert result.returncode == 0, result.stderr
    assert "(weight 0.5)" in result.stderr
    merged, base = load_file(tmp_path / "half" / "model.safetensors"), _base_tensors()
    for name, module in ((Q, Q_MODULE), (V, V_MODULE)):
        torch.testing.assert_close(merged[name] - base[name], 0.5 * ADAPTER_A.delta(module), rtol=0, atol=1e-5)


def test_merge_of_two_adapters_adds_their_deltas(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    result = deltakit_cli("merge", inputs["base"], inputs["a"], inputs["b"], "-o", tmp_path / "ab")
    assert result.returncode == 0, result.stderr
    assert "adapter #2" in result.stderr
    merged, base = load_file(tmp_path / "ab" / "model.safetensors"), _base_tensors()
    torch.testing.assert_close(merged[Q], base[Q] + ADAPTER_A.delta(Q_MODULE) + ADAPTER_B.delta(Q_MODULE),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(merged[V], base[V] + ADAPTER_A.delta(V_MODULE), rtol=0, atol=1e-5)
    assert torch.equal(merged[NORM], base[NORM])


def test_merge_dry_run_writes_nothing_and_lists_the_changed_tensors(deltakit_cli, inputs: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    before = _listing(tmp_path)
    result = deltakit_cli("merge", inputs["base"], inputs["a"], inputs["b"], "--dry-run", "-o", tmp_path / "dry")
    assert result.returncode == 0, result.stderr
    assert _listing(tmp_path) == before
    assert f"would write {tmp_path / 'dry'}" in result.stderr
    changed = dict(re.findall(r"^\s+(\S+\.weight): (.+)$", result.stderr, flags=re.MULTILINE))
    assert changed == {Q: "lora #1 then lora #2", V: "lora #1"}


def test_merge_with_a_missing_adapter_is_one_line_exit_1(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    result = deltakit_cli("merge", inputs["base"], tmp_path / "no-such-adapter", "-o", tmp_path / "out")
    assert result.returncode == 1
    assert "no-such-adapter" in _one_error_line(result)
    assert not (tmp_path / "out").exists()


def test_merge_into_an_existing_output_is_exit_2_and_leaves_it(deltakit_cli, inputs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = deltakit_cli("merge", inputs["base"], inputs["a"], "-o", tmp_path / "out")
    assert result.returncode == 2
    assert "--overwrite" in _one_error_line(result)
    assert _listing(tmp_path / "out") == {"keep.txt"}


# --- unmerge -----------------------------------------------------------------------------------------------------


def test_unmerge_returns_the_base_within_fp32_rounding(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    assert deltakit_cli("merge", inputs["base"], inputs["a"], inputs["b"], "-w", "1", "-w", "0.5",
                    "-o", tmp_path / "merged").returncode == 0
    result = deltakit_cli("unmerge", tmp_path / "merged", inputs["a"], inputs["b"], "-o", tmp_path / "back")
    assert result.returncode == 0, result.stderr
    assert "receipt            : used" in result.stderr
    back, merged, base = (load_file(d / "model.safetensors") for d in (tmp_path / "back", tmp_path / "merged",
                                                                        inputs["base"]))
    assert list(back) == list(base)
    for name in (Q, V):
        assert not torch.equal(merged[name], base[name])
        # W + Δ − Δ in fp32: a few roundings, each at most half an ulp of the largest magnitude involved.
        bound = 4 * FP32_EPS * max(merged[name].abs().max(), base[name].abs().max())
        assert (back[name] - base[name]).abs().max() <= bound, name
    assert torch.equal(back[NORM], base[NORM])
    assert not (tmp_path / "back" / "deltakit_merge_receipt").exists()


# --- stack -------------------------------------------------------------------------------------------------------


def test_stack_exact_concatenates_and_sums_the_deltas(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    result = deltakit_cli("stack", inputs["a"], inputs["b"], "--exact", "-o", tmp_path / "ab")
    assert result.returncode == 0, result.stderr
    assert "method             : exact" in result.stderr
    weights = load_file(tmp_path / "ab" / "adapter_model.safetensors")
    assert weights[f"base_model.model.{Q_MODULE}.lora_A.weight"].shape == (2 + 3, 24)  # ranks add
    torch.testing.assert_close(_peft_delta(tmp_path / "ab", Q_MODULE),
                               ADAPTER_A.delta(Q_MODULE) + ADAPTER_B.delta(Q_MODULE), rtol=0, atol=1e-5)
    torch.testing.assert_close(_peft_delta(tmp_path / "ab", V_MODULE), ADAPTER_A.delta(V_MODULE), rtol=0, atol=1e-5)


def test_stack_rank_is_the_best_approximation_of_the_sum(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    result = deltakit_cli("stack", inputs["a"], inputs["b"], "--rank", "2", "-o", tmp_path / "ab2")
    assert result.returncode == 0, result.stderr
    total = (ADAPTER_A.delta(Q_MODULE) + ADAPTER_B.delta(Q_MODULE)).double()
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    assert s[1] > 1.01 * s[2]  # the best rank-2 approximation is unique (Eckart–Young)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(_peft_delta(tmp_path / "ab2", Q_MODULE).double(), best, rtol=0, atol=1e-4)
    # v_proj's sum has rank 2 already: kept as it is.
    torch.testing.assert_close(_peft_delta(tmp_path / "ab2", V_MODULE), ADAPTER_A.delta(V_MODULE), rtol=0, atol=1e-5)


def test_stack_without_a_mode_is_one_line_exit_2(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    result = deltakit_cli("stack", inputs["a"], inputs["b"], "-o", tmp_path / "ab")
    assert result.returncode == 2
    line = _one_error_line(result)
    assert all(flag in line for flag in ("--exact", "--rank", "--energy"))
    assert not (tmp_path / "ab").exists()


# --- inspect -----------------------------------------------------------------------------------------------------


def test_inspect_prints_a_table_and_writes_report_json(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    result = deltakit_cli("inspect", inputs["finetuned"], inputs["base"], "--ranks", "1,2", "--max-rank", "8",
                      "-o", tmp_path / "insp")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    rows = [line for line in result.stderr.splitlines() if line.startswith(("model.", "module "))]
    assert [row.split()[0] for row in rows] == ["module", Q_MODULE, V_MODULE]
    report = json.loads((tmp_path / "insp" / "report.json").read_text())
    modules = {m["module"]: m for m in report["modules"]}
    assert set(modules) == {Q_MODULE, V_MODULE}
    for module in modules.values():
        # The planted deltas have singular values 1 and 0.5: ‖ΔW‖² = 1.25, rank 1 keeps 1/1.25 of it.
        assert module["delta_norm"] == pytest.approx(1.25**0.5, rel=1e-5)
        assert module["energy_retained"]["1"] == pytest.approx(0.8, rel=1e-5)
        assert module["energy_retained"]["2"] == pytest.approx(1.0, rel=1e-5)


def test_inspect_json_goes_to_stdout(deltakit_cli, inputs: dict[str, Path]) -> None:
    result = deltakit_cli("inspect", inputs["finetuned"], inputs["base"], "--ranks", "2", "--json", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {m["module"] for m in report["modules"]} == {Q_MODULE, V_MODULE}
    assert Q_MODULE not in result.stderr  # the JSON replaces the table


def test_inspect_with_a_bad_rank_list_is_exit_2(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    result = deltakit_cli("inspect", inputs["finetuned"], inputs["base"], "--ranks", "4,x", "-o", tmp_path / "insp")
    assert result.returncode == 2
    assert "--ranks '4,x'" in _one_error_line(result)
    assert result.stdout == "" and not (tmp_path / "insp").exists()


# --- batch -------------------------------------------------------------------------------------------------------


def _manifest(folder: Path, inputs: dict[str, Path], base: str | Path | None = None) -> Path:
    """An extraction at rank 2 (lossless here) and a merge of its output into the base."""
    manifest_path = folder / "jobs.toml"
    manifest_path.write_text(f"""
[defaults]
svd = "exact"

[[jobs]]
op = "extract"
finetuned = "{inputs['finetuned']}"
base = "{base or inputs['base']}"
out = "adapters/ft-r2"
rank = 2

[[jobs]]
op = "merge"
base = "{inputs['base']}"
adapters = ["adapters/ft-r2"]
out = "merged/ft"
""")
    return manifest_path


def _statuses(stderr: str) -> dict[str, str]:
    """Job number → status, from the summary table's rows (job, op, status, seconds, out)."""
    rows = re.findall(r"^(\d+)\s+(?:extract|merge)\s+(\S+(?: \S+)?)\s{2,}", stderr, flags=re.MULTILINE)
    return dict(rows)


def test_batch_runs_extract_then_merge_and_a_rerun_skips_both(deltakit_cli, inputs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    manifest_path = _manifest(tmp_path, inputs)
    result = deltakit_cli("batch", manifest_path)
    assert result.returncode == 0, result.stderr
    assert _statuses(result.stderr) == {"1": "done", "2": "done"}
    assert (tmp_path / "adapters" / "ft-r2" / "adapter_config.json").is_file()
    merged_path = tmp_path / "merged" / "ft" / "model.safetensors"
    # The delta is exactly rank 2, so merging the rank-2 extraction gives back the fine-tune.
    merged, finetuned = load_file(merged_path), _finetuned_tensors()
    for name in (Q, V, NORM):
        torch.testing.assert_close(merged[name], finetuned[name], rtol=0, atol=1e-5)
    stamp = merged_path.stat().st_mtime_ns

    rerun = deltakit_cli("batch", manifest_path)
    assert rerun.returncode == 0, rerun.stderr
    assert _statuses(rerun.stderr) == {"1": "skipped", "2": "skipped"}
    assert "2 skipped" in rerun.stderr
    assert json.loads((tmp_path / "jobs.summary.json").read_text())["counts"] == {"skipped": 2}
    assert merged_path.stat().st_mtime_ns == stamp


def test_batch_job_with_a_missing_base_is_exit_1_and_named(deltakit_cli, inputs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    result = deltakit_cli("batch", _manifest(tmp_path, inputs, base=tmp_path / "no-such-base"))
    assert result.returncode == 1
    assert _statuses(result.stderr) == {"1": "failed", "2": "not run"}
    assert re.search(r"^job 1: .*no-such-base", result.stderr, flags=re.MULTILINE), result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("deltakit: error: ")
    summary = json.loads((tmp_path / "jobs.summary.json").read_text())
    assert [job["status"] for job in summary["jobs"]] == ["failed", "not run"]
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "merged").exists()


def test_batch_dry_run_writes_nothing(deltakit_cli, inputs: dict[str, Path], tmp_path: Path) -> None:
    manifest_path = _manifest(tmp_path, inputs)
    result = deltakit_cli("batch", manifest_path, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert _statuses(result.stderr) == {"1": "would run", "2": "would run"}
    assert _listing(tmp_path) == {"jobs.toml"}


# --- Hub ids -----------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_cache() -> None:
    """org/base (main → COMMIT), org/ft (main → FT_COMMIT) and org/adapter (adapter A) in the private HF cache."""
    seed_repo("org/base", COMMIT, {"config.json": CONFIG, "model.safetensors": save(_base_tensors())})
    seed_repo("org/ft", FT_COMMIT, {"config.json": CONFIG, "model.safetensors": save(_finetuned_tensors())})
    seed_repo("org/adapter", ADAPTER_COMMIT, ADAPTER_A.files())


def test_extract_from_hub_ids_names_the_bare_base_and_pins_its_commit(hub_cache: None, tmp_path: Path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    result = _subprocess("extract", "org/ft", "org/base@main", "-r", "2", "--svd", "exact", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/base"
    assert config["revision"] == COMMIT
    report = json.loads((tmp_path / "out" / "extract_report.json").read_text())
    assert (report["base"], report["base_revision"]) == ("org/base", COMMIT)
    assert (report["finetuned"], report["finetuned_revision"]) == ("org/ft", FT_COMMIT)
    base, finetuned = _base_tensors(), _finetuned_tensors()
    torch.testing.assert_close(_peft_delta(tmp_path / "out", Q_MODULE), finetuned[Q] - base[Q], rtol=0, atol=1e-5)


def test_extract_from_hub_ids_defaults_to_the_working_directory(hub_cache: None, tmp_path: Path) -> None:
    result = _subprocess("extract", "org/ft", "org/base", "-r", "2", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert _listing(tmp_path) >= {"ft-lora-r2", "ft-lora-r2/adapter_config.json"}
    assert {p.name for p in tmp_path.iterdir()} == {"ft-lora-r2"}


def test_merge_of_a_hub_adapter_into_a_hub_base(hub_cache: None, tmp_path: Path) -> None:
    result = _subprocess("merge", "org/base", "org/adapter", "-o", tmp_path / "merged", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    merged, base = load_file(tmp_path / "merged" / "model.safetensors"), _base_tensors()
    torch.testing.assert_close(merged[Q], base[Q] + ADAPTER_A.delta(Q_MODULE), rtol=0, atol=1e-5)
    torch.testing.assert_close(merged[V], base[V] + ADAPTER_A.delta(V_MODULE), rtol=0, atol=1e-5)
    assert (tmp_path / "merged" / "config.json").read_bytes() == CONFIG


def test_an_id_not_in_the_cache_is_exit_3_naming_it(hub_cache: None, tmp_path: Path) -> None:
    result = _subprocess("extract", "org/ft", "org/missing", "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 3
    assert _one_error_line(result) == ("deltakit: error: org/missing: not a local path, and not in the Hub cache; "
                                       "run once online, or unset HF_HUB_OFFLINE")
    assert _listing(tmp_path) == set()
