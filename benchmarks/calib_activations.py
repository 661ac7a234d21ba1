"""Which model's activations should a calibrated (whitened) fit use? A measurement, not a benchmark of peers.

On the pairs of ``bench_quality.py`` (a Llama-shaped bf16 pair and a GPT-2-shaped fp32 pair, pretrained on Python
source, fully fine-tuned on docstrings), every factorizable module is fitted at rank r by
- ``plain``: the truncated SVD of ΔW (what the peers store);
- ``ft``: whitened by the input second moments of the fine-tuned model;
- ``base``: whitened by those of the base model;
- ``adapted``: sequentially, as GPTQ does: block i is fitted on the inputs the already adapted blocks < i give it;
- ``ft self``: as ``ft``, with calibration text sampled from the fine-tuned model instead of the data set;
and the adapted model (base weights + fits, every other tensor the fine-tune's, as extract carries them) is
scored by KL(ft ‖ adapted) per token on held-out text of both domains. The fits are made in memory with
deltakit's own pieces (math/whiten.py, ops/calibrate.py), so only the choice of activations differs.

    python benchmarks/calib_activations.py [--ranks 4 8 16 32] [--damping 0.01] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality  # noqa: E402

from deltakit.adapters.layers import from_out_in, to_out_in  # noqa: E402
from deltakit.io.checkpoint import open_checkpoint  # noqa: E402
from deltakit.math.factorize import truncated_svd  # noqa: E402
from deltakit.math.whiten import whitened_svd, whitening  # noqa: E402
from deltakit.ops.calibrate import BlockwiseModel, collect_moments, sample_sequences, tokenize_source  # noqa: E402
from deltakit.ops.plan import plan_extract  # noqa: E402

CPU = torch.device("cpu")
EXACT = functools.partial(truncated_svd, method="exact", device="cpu")


def _deltas(ft, base) -> dict[str, tuple[str, object, torch.Tensor]]:
    """module → (weight tensor name, kind, ΔW (out, in) fp32)."""
    plan = plan_extract(ft, base)
    out = {}
    for m in plan.modules:
        if m.weight is not None and m.kind.is_factorizable:
            delta = to_out_in(ft.get(m.weight).float(), m.kind) - to_out_in(base.get(m.weight).float(), m.kind)
            if bool(delta.any()):
                out[m.module] = (m.weight, m.kind, delta)
    return out


def _fit(delta: torch.Tensor, rank: int, moment: torch.Tensor | None, damping: float) -> torch.Tensor:
    rank = min(rank, *delta.shape)
    fit = EXACT(delta, rank) if moment is None else whitened_svd(delta, whitening(moment, damping), rank, EXACT)
    return (fit.u * fit.s) @ fit.vh


def _adapted_state(ft, base, deltas, fits) -> dict[str, torch.Tensor]:
    state = {}
    for module, (weight, kind, _) in deltas.items():
        state[weight] = base.get(weight).float() + from_out_in(fits[module], kind)
    return state


@torch.no_grad()
def _log_probs(model, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {d: torch.cat([F.log_softmax(model(input_ids=c).logits.double(), -1) for c in t.split(16)])
            for d, t in tokens.items()}


def _kl(ref, got) -> dict[str, float]:
    return {d: float((ref[d].exp() * (ref[d] - got[d])).sum(-1).mean()) for d in ref}


@torch.no_grad()
def _sequential_fits(model: BlockwiseModel, ft, base, deltas, ids, rank, damping, spill: Path):
    """GPTQ-style: fit block i on the inputs that the adapted blocks before it produce."""
    fits = {}
    embed = model.tensor_name(ft, f"{model.layout.embed}.weight").removesuffix(".weight")
    counts = torch.bincount(ids.flatten(), minlength=model.config.vocab_size).double()
    if embed in deltas:
        fits[embed] = _fit(deltas[embed][2], rank, (counts / counts.sum()).float(), damping)
    # The adapted embedding gives block 0's inputs.
    embedding = model.load(ft, model.layout.embed)
    if embed in fits:
        embedding.weight.data = base.get(deltas[embed][0]).float() + from_out_in(fits[embed], deltas[embed][1])
    hidden = embedding(ids)
    if model.layout.positions is not None:
        hidden = hidden + model.load(ft, model.layout.positions)(torch.arange(ids.shape[1]))
    for index in range(model.num_blocks):
        prefix = model.block_name(index)
        # Moments of this block's inputs under the adapted prefix: run the fine-tuned block with hooks.
        block_dir = spill / f"b{index}"
        block_dir.mkdir()
        moments = _block_moments(model, ft, index, hidden, block_dir)
        block = model.load(ft, prefix)
        for name, module in block.named_modules():
            found = model.tensor_name_or_none(ft, f"{prefix}.{name}.weight") if name else None
            full = found.removesuffix(".weight") if found else None
            if full in deltas:
                weight, kind, delta = deltas[full]
                fits[full] = _fit(delta, rank, moments.moment(full), damping)
                module.weight.data = base.get(weight).float() + from_out_in(fits[full], kind)
        hidden = model.run_block(block, hidden)
    head = model.tensor_name_or_none(ft, "lm_head.weight")
    if head is not None and head.removesuffix(".weight") in deltas:
        norm = model.load(ft, model.layout.norm)
        x = norm(hidden).reshape(-1, hidden.shape[-1])
        fits["lm_head"] = _fit(deltas["lm_head"][2], rank, x.T @ x / x.shape[0], damping)
    return fits


@torch.no_grad()
def _block_moments(model: BlockwiseModel, weights, index: int, hidden: torch.Tensor, spill: Path):
    """Collect one block's input moments from given hidden states (collect_moments with the embedding skipped)."""
    from deltakit.ops import calibrate

    moments = calibrate.CalibrationMoments(spill)
    block = model.load(weights, model.block_name(index))
    hooks = calibrate._MomentHooks(block, model.block_name(index),
                                   lambda n: model.tensor_name(weights, f"{n}.weight").removesuffix(".weight"))
    odd = torch.arange(hidden.shape[0]) % 2 == 1
    hooks.next_batch(odd)
    model.run_block(block, hidden)
    hooks.remove()
    calibrate._spill(moments, moments.sites, "block.safetensors", hooks.moments)
    return moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(bench_quality.RECIPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16, 32])
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--routes", nargs="+", default=["plain", "ft", "base", "adapted", "ft self"])
    parser.add_argument("--workdir", type=Path, default=bench_quality.WORKDIR)
    args = parser.parse_args()
    torch.manual_seed(0)
    seq_len = bench_quality.SEQ_LEN
    print(f"KL(ft ‖ adapted) per token on held-out text; damping {args.damping}, {args.tokens} calibration tokens "
          f"of {seq_len}")
    print(f"{'pair':<11} {'rank':>4} " + " ".join(f"{r + ' ' + d[:4]:>14}" for r in args.routes
                                                   for d in ("ft domain", "base domain")))
    for pair in bench_quality.load_pairs(args.pairs, args.workdir):
        ft, base = open_checkpoint(pair.finetuned), open_checkpoint(pair.base)
        model = BlockwiseModel(ft, CPU)
        ids = tokenize_source(pair.calib_text, pair.finetuned, tokens=args.tokens, seq_len=seq_len).token_ids
        deltas = _deltas(ft, base)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            moments = {}
            for route, weights, source in (("ft", ft, ids), ("base", base, ids)):
                (tmp / route).mkdir()
                moments[route] = collect_moments(model, weights, source, tmp / route)
            if "ft self" in args.routes:
                sampled = sample_sequences(model, ft, sequences=args.tokens // seq_len, seq_len=seq_len)
                (tmp / "self").mkdir()
                moments["ft self"] = collect_moments(model, ft, sampled, tmp / "self")
            from transformers import AutoModelForCausalLM

            reference_model = AutoModelForCausalLM.from_pretrained(pair.finetuned, dtype=torch.float32).eval()
            reference = _log_probs(reference_model, pair.heldout)
            for rank in args.ranks:
                cells = []
                for route in args.routes:
                    if route == "adapted":
                        (tmp / f"seq{rank}").mkdir()
                        fits = _sequential_fits(model, ft, base, deltas, ids, rank, args.damping, tmp / f"seq{rank}")
                    else:
                        fits = {m: _fit(d, rank, None if route == "plain" else moments[route].moment(m), args.damping)
                                for m, (_, _, d) in deltas.items()}
                    adapted = AutoModelForCausalLM.from_pretrained(pair.finetuned, dtype=torch.float32).eval()
                    adapted.load_state_dict(_adapted_state(ft, base, deltas, fits), strict=False)
                    if getattr(adapted.config, "tie_word_embeddings", False):
                        adapted.tie_weights()
                    kl = _kl(reference, _log_probs(adapted, pair.heldout))
                    cells += [kl["ft domain"], kl["base domain"]]
                print(f"{pair.name:<11} {rank:>4} " + " ".join(f"{c:>14.4g}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
