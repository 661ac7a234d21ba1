"""DoRA vs LoRA on a real fine-tuned pair: error against rank at equal parameter count, and extraction time.

The pair is the quickstart's (examples/quickstart.py): a Llama-shaped transformer pretrained on modular addition,
then fully fine-tuned on multiplication. For each rank the table gives the total relative error
‖W_ft − W_adapter‖ / ‖W_ft − W_base‖ over all factorized modules, for LoRA at that rank, DoRA at that rank, and
LoRA at rank + 1 (at least DoRA's parameter count), plus the wall time of each extraction.

    python benchmarks/bench_dora.py [--ranks 1 2 4 8 16 32] [--repeat 3] [--svd exact]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import quickstart  # noqa: E402

import deltakit  # noqa: E402


def _pair(workdir: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    return quickstart.train_pair(quickstart.ToyLlama(dim=256, layers=2, heads=4, hidden=512), workdir)


def _timed_extract(ft: Path, base: Path, out: Path, repeat: int, **options) -> tuple[float, deltakit.ExtractReport]:
    best, report = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        report = deltakit.extract(ft, base, out, overwrite=True, **options)
        best = min(best, time.perf_counter() - started)
    return best, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--svd", default="auto")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="deltakit-bench-dora-"))
    ft, base = _pair(workdir)
    common = {"svd": args.svd, "include": [r"layers\."]}  # the transformer blocks: Linear weights only

    print(f"{'rank':>4} {'LoRA r':>8} {'DoRA r':>8} {'LoRA r+1':>9} {'DoRA wins':>10} {'LoRA s':>8} {'DoRA s':>8} "
          f"{'DoRA/LoRA time':>15}")
    for rank in args.ranks:
        lora_s, _ = _timed_extract(ft, base, workdir / "lora", args.repeat, rank=rank, **common)
        dora_s, dora = _timed_extract(ft, base, workdir / "dora", args.repeat, rank=rank, dora=True, **common)
        s = dora.error_summary()
        print(f"{rank:>4} {s['lora_total_relative_error_same_rank']:>8.4f} {s['total_relative_error']:>8.4f} "
              f"{s['lora_total_relative_error_same_params']:>9.4f} "
              f"{s['modules_where_dora_beats_lora_same_rank']:>4}/{len(dora.modules):<5} {lora_s:>8.3f} "
              f"{dora_s:>8.3f} {dora_s / lora_s:>14.2f}×")


if __name__ == "__main__":
    main()
