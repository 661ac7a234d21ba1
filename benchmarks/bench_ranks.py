"""Uniform rank vs global budget allocation at equal adapter size, on a real fine-tuned pair.

The pair is the quickstart's model family (examples/quickstart.py), made bigger: a Llama-shaped transformer
(hidden 256, 4 layers, MLP 512) pretrained on modular addition, then fully fine-tuned on multiplication. Every 2-D
weight is factorized (attention and MLP projections, both embeddings, the head); the other changed tensors (norms)
are carried exactly, as extract does. For each uniform rank R, the budget allocation gets exactly the parameter
count of the uniform rank-R adapter (``--avg-rank R``) and chooses per-module ranks with ``BudgetRanks``.

Each adapter is applied as W0 + U_r·S_r·V_rᵀ (= W0 + scaling·B@A) from one exact SVD per module, and scored by:
- the total squared error Σ‖ΔW − ΔW_r‖² over all factorized modules, as a relative error √(Σ err / Σ‖ΔW‖²);
- the KL divergence KL(ft ‖ base+adapter) of the next-token distribution at the answer position, averaged over
  all 289 multiplication problems (the fine-tune's task) and over all 289 addition problems (the base's task,
  which the fine-tune was not trained on);
- the accuracy on multiplication.

    python benchmarks/bench_ranks.py [--ranks 2 4 8 16 32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import quickstart  # noqa: E402

from deltakit.math.factorize import truncated_svd  # noqa: E402
from deltakit.math.ranks import (
    BudgetRanks,
    ModuleSpectrum,
    NoiseFloorRank,
    adapter_params,
    budget_for_avg_rank,
    predicted_squared_error,
)


def _pair(workdir: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    return quickstart.train_pair(quickstart.ToyLlama(dim=256, layers=4, heads=4, hidden=512), workdir)


def _model(state: dict[str, torch.Tensor]) -> quickstart.ToyLlama:
    model = quickstart.ToyLlama(dim=256, layers=4, heads=4, hidden=512)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def _scores(model: quickstart.ToyLlama, reference: dict[int, torch.Tensor]) -> tuple[float, float, float]:
    """(KL on multiplication, KL on addition, accuracy on multiplication) against the fine-tune's log-probs."""
    kls = []
    for op in (quickstart.TIMES, quickstart.PLUS):
        inputs, _ = quickstart.task(op)
        log_probs = F.log_softmax(model(inputs)[:, -1].double(), dim=-1)
        kls.append(float(F.kl_div(log_probs, reference[op], log_target=True, reduction="batchmean")))
    return kls[0], kls[1], quickstart.accuracy(model, quickstart.TIMES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--workdir", type=Path, help="where the pair goes (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="deltakit-bench-ranks-"))
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))

    started = time.perf_counter()
    ft_dir, base_dir = _pair(workdir)
    print(f"trained base and fine-tune in {time.perf_counter() - started:.0f} s → {workdir}")
    base, finetuned = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    ft_model = _model(finetuned)
    reference = {}
    with torch.no_grad():
        for op in (quickstart.TIMES, quickstart.PLUS):
            reference[op] = F.log_softmax(ft_model(quickstart.task(op)[0])[:, -1].double(), dim=-1)
    base_scores = _scores(_model(base), reference)

    # One exact SVD per 2-D weight (the model's Linear and Embedding weights), kept for every configuration.
    names = [n for n, w in base.items() if w.ndim == 2 and not torch.equal(w, finetuned[n])]
    svds, spectra = {}, []
    for name in names:
        # PEFT's orientation: Linear (out, in) as stored; an Embedding (num, dim) is (out = dim, in = num).
        is_embedding = "embed" in name
        delta = finetuned[name] - base[name]
        delta = delta.T if is_embedding else delta
        svd = truncated_svd(delta, min(delta.shape), method="exact", device="cpu")
        svds[name] = (svd, is_embedding)
        spectra.append(ModuleSpectrum(name, tuple(delta.shape), svd.s, svd.total_energy))
    out_ins = [s.out_in for s in spectra]
    total_energy = sum(s.total_energy for s in spectra)
    print(f"{len(names)} factorized weights, shapes {sorted(set(out_ins))}; "
          f"base: KL(×) {base_scores[0]:.3f}, KL(+) {base_scores[1]:.3f}, acc(×) {base_scores[2]:.3f}; "
          f"fine-tune acc(×) {quickstart.accuracy(ft_model, quickstart.TIMES):.3f}")

    def evaluate(ranks: list[int]) -> tuple[int, float, float, float, float]:
        state = dict(finetuned)  # 1-D tensors (norms) carried exactly
        for name, rank in zip(names, ranks):
            svd, is_embedding = svds[name]
            delta_r = (svd.u[:, :rank] * svd.s[:rank]) @ svd.vh[:rank]  # = B @ A with B = U√S, A = √S·Vᵀ
            state[name] = base[name] + (delta_r.T if is_embedding else delta_r)
        relative_error = (predicted_squared_error(spectra, ranks) / total_energy) ** 0.5
        return (adapter_params(ranks, out_ins), relative_error, *_scores(_model(state), reference))

    rows = []
    for rank in args.ranks:
        uniform = [min(rank, *out_in) for out_in in out_ins]
        size = budget_for_avg_rank(rank, out_ins)
        rows.append((f"uniform r={rank}", uniform, evaluate(uniform)))
        for weighting in ("absolute", "relative"):
            chosen = BudgetRanks(size, max_rank=256, weighting=weighting).allocate(spectra)
            rows.append((f"budget {weighting}", chosen, evaluate(chosen)))
    auto = [NoiseFloorRank(256).choose(s.module, s.s, s.total_energy, s.out_in) for s in spectra]
    rows.append(("--rank auto", auto, evaluate(auto)))

    print(f"\n{'adapter':<18} {'params':>9} {'rel. err ΔW':>12} {'KL(×)':>9} {'KL(+)':>9} {'acc(×)':>7}  "
          "ranks (min/median/max)")
    for label, ranks, (params, error, kl_times, kl_plus, accuracy) in rows:
        ordered = sorted(ranks)
        print(f"{label:<18} {params:>9,} {error:>12.4f} {kl_times:>9.3g} {kl_plus:>9.3g} {accuracy:>7.3f}  "
              f"{ordered[0]}/{ordered[len(ordered) // 2]}/{ordered[-1]}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
