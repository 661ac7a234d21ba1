"""The README's table of checkpoint kinds × operations, each cell run here on a tiny real checkpoint of that kind.

``TABLE`` is the table; ``test_readme_table_is_this_table`` keeps README.md ("Supported checkpoints") equal to
it, and ``test_cell`` runs every cell: "yes" cells must do the operation exactly (up to the storage dtype),
"refused" cells must fail before writing with a one-line error.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from builders import ModelPair, quantize_checkpoint_fp8

import deltakit
from deltakit.adapters.layers import WeightKind
from deltakit.errors import DeltakitError

OPS = ("extract", "merge", "unmerge", "stack", "inspect")
TABLE = {
    # kind: (fixture or builder, cells in OPS order)
    "dense (Llama, Qwen2, BERT)": ("llama_pair", ("yes", "yes", "yes", "yes", "yes")),
    "tied embeddings (GPT-2, tied Llama)": ("llama_tied_pair", ("yes", "yes", "yes", "yes", "yes")),
    "Conv1D (GPT-2)": ("gpt2_pair", ("yes", "yes", "yes", "yes", "yes")),
    "mixture-of-experts (Mixtral, Qwen3-MoE)": ("mixtral_pair", ("yes", "yes", "yes", "yes", "yes")),
    "FP8 block-scaled": ("fp8_pair", ("yes", "yes", "yes", "yes", "yes")),
    "sharded (+ index), bf16": ("llama_pair_bf16_sharded", ("yes", "yes", "yes", "yes", "yes")),
    "legacy .bin": ("bin_pair", ("yes", "refused", "refused", "yes", "yes")),
}
README = Path(__file__).resolve().parents[1] / "README.md"
# What "exactly" means per kind: the storage dtype's rounding (bf16: 2^-8; FP8 e4m3: 2^-4) bounds a merge.
TOLERANCE = {"fp8_pair": 0.05, "llama_pair_bf16_sharded": 0.01}


@pytest.fixture(scope="module")
def fp8_pair(llama_pair, tmp_path_factory) -> ModelPair:
    root = tmp_path_factory.mktemp("matrix_fp8")
    return ModelPair("llama", quantize_checkpoint_fp8(llama_pair.base_dir, root / "base"),
                     quantize_checkpoint_fp8(llama_pair.ft_dir, root / "finetuned"), llama_pair.config)


@pytest.fixture(scope="module")
def bin_pair(llama_pair, tmp_path_factory) -> ModelPair:
    """The llama pair as legacy ``pytorch_model.bin`` state dicts (written with torch.save)."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("matrix_bin")
    dirs = []
    for side, src in (("base", llama_pair.base_dir), ("finetuned", llama_pair.ft_dir)):
        (root / side).mkdir()
        torch.save(load_file(src / "model.safetensors"), root / side / "pytorch_model.bin")
        (root / side / "config.json").write_bytes((src / "config.json").read_bytes())
        dirs.append(root / side)
    return ModelPair("llama", dirs[0], dirs[1], llama_pair.config)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / max(float(b.float().norm()), 1e-12))


def _assert_weights_match(got_dir: Path, want_dir: Path, tolerance: float) -> None:
    got, want = deltakit.open_checkpoint(got_dir), deltakit.open_checkpoint(want_dir)
    assert set(got) == set(want)
    worst = max((_relative(got.get(n), want.get(n)), n) for n in want)
    assert worst[0] <= tolerance, worst


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """``extracted(pair, rank)``: the adapter extracted at that rank (fp32 factors) and its report, made once."""
    cache: dict[tuple[Path, int], tuple[Path, deltakit.ExtractReport]] = {}

    def get(pair: ModelPair, rank: int) -> tuple[Path, deltakit.ExtractReport]:
        if (pair.base_dir, rank) not in cache:
            out = tmp_path_factory.mktemp("matrix_adapter") / "a"
            cache[pair.base_dir, rank] = out, deltakit.extract(pair.ft_dir, pair.base_dir, out, rank=rank,
                                                               svd="exact", dtype="float32")
        return cache[pair.base_dir, rank]

    return get


CELLS = [(kind, op, cell) for kind, (_, cells) in TABLE.items() for op, cell in zip(OPS, cells)]


@pytest.mark.parametrize(("kind", "op", "cell"), CELLS, ids=[f"{k.split(' ')[0]}-{o}" for k, o, _ in CELLS])
def test_cell(kind, op, cell, request, extracted, tmp_path):
    fixture = TABLE[kind][0]
    pair = request.getfixturevalue(fixture)
    adapter, report = extracted(pair, 128)
    tolerance = TOLERANCE.get(fixture, 1e-5)
    if op == "extract":
        # At full rank a module's factors are larger than its weight: it is carried whole (exact) unless PEFT needs
        # factors there (a tied embedding, experts).
        assert max((m.relative_error for m in report.modules), default=0.0) < 1e-5 and not report.fates("dropped")
        assert report.fates("carried")
    elif op == "merge" and cell == "yes":
        deltakit.merge(pair.base_dir, [adapter], tmp_path / "merged")
        _assert_weights_match(tmp_path / "merged", pair.ft_dir, tolerance)
    elif op == "unmerge" and cell == "yes":
        deltakit.merge(pair.base_dir, [adapter], tmp_path / "merged")
        deltakit.unmerge(tmp_path / "merged", [adapter], tmp_path / "unmerged")
        _assert_weights_match(tmp_path / "unmerged", pair.base_dir, 2 * tolerance)
    elif op in ("merge", "unmerge"):
        operation = getattr(deltakit, op)
        with pytest.raises(DeltakitError) as caught:
            operation(pair.base_dir, [adapter], tmp_path / "out")
        assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()
    elif op == "stack":
        # The full-rank adapter and a rank-2 one of the same pair (same carried tensors): ΔW adds up per module.
        low, _ = extracted(pair, 2)
        deltakit.stack([adapter, low], tmp_path / "s", exact=True)
        full, small, stacked = (deltakit.read_adapter(a) for a in (adapter, low, tmp_path / "s"))
        factor_kinds = {True: WeightKind.EMBEDDING, False: WeightKind.LINEAR}
        for module, entry in full.modules.items():
            if entry.key_a is not None:
                kind_ = factor_kinds[entry.is_embedding]
                expected = full.factors(module, kind_).delta() + small.factors(module, kind_).delta()
                assert _relative(stacked.factors(module, kind_).delta(), expected) < 1e-5, module
        # A weight the full-rank adapter carries whole gets the rank-2 adapter's ΔW added, as stored.
        whole = [n for n in full.saved if n.endswith(".weight") and n.removesuffix(".weight") in small.modules]
        assert whole
        for name in whole:
            module = name.removesuffix(".weight")
            is_linear = not small.modules[module].is_embedding and not small.is_conv1d(module)
            delta = small.factors(module, WeightKind.LINEAR if is_linear else WeightKind.CONV1D).delta()
            expected = full.weights.get(full.saved[name]).float() + (delta if is_linear else delta.T)
            assert _relative(stacked.weights.get(stacked.saved[name]), expected) < tolerance, name  # stored dtype
    elif op == "inspect":
        inspected = {m.module: m.delta_norm for m in deltakit.inspect(pair.ft_dir, pair.base_dir, svd="exact").modules}
        norms = {m.module: m.delta_norm for m in report.modules}
        assert {m: inspected[m] for m in norms} == pytest.approx(norms, rel=1e-5)
        whole = {t.tensor.removesuffix(".weight") for t in report.fates("carried") if "carried whole" in t.reason}
        assert set(inspected) == set(norms) | whole


def test_readme_table_is_this_table():
    text = README.read_text()
    section = text[text.index("## Supported checkpoints"):]
    rows = [line for line in section.splitlines()[1:] if line.startswith("| ") and "---" not in line]
    header, *body = rows[: len(TABLE) + 1]
    columns = [c.strip() for c in header.strip("|").split("|")]
    positions = [columns.index(op) for op in OPS]  # other columns (e.g. serving) are another test's
    readme = {}
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        readme[cells[0]] = tuple(re.sub(r"\W+$", "", cells[i].split(" ")[0]).lower() for i in positions)
    assert readme == {kind: cells for kind, (_, cells) in TABLE.items()}
