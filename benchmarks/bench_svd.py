"""Time and accuracy of deltakit's truncated SVD routes against the full SVD that peers run.

Run from the repository root:

    python -m benchmarks.bench_svd --quick            # smoke run, about a minute on 2 cores
    python -m benchmarks.bench_svd                    # the full table (minutes: full SVDs of 11008×4096)
    python -m benchmarks.bench_svd --device cuda --json /tmp/svd.json

Test matrices are planted, M = U·diag(σ)·Vᵀ with random orthogonal U, V and a chosen spectrum σ, so the
optimal (Eckart–Young) rank-r error √(Σ_{i>r} σ_i² / Σ σ_i²) is known without any SVD. Spectra:

    decaying  σ_i = 1/i (a power law, as in the head of a fine-tuning delta's spectrum)
    flat      the singular values of pure Gaussian noise (Marchenko–Pastur quantiles): the worst case for a
              randomized range finder, because nothing separates the top r directions from the rest

Rows, for every shape × rank × spectrum:

    exact       deltakit's exact route (thin SVD + truncation); its time does not depend on the rank, so it
                runs once per shape and spectrum, at the largest rank, and the smaller ranks are truncations
    randomized  deltakit's randomized route at the default oversample / niter
    auto        deltakit's default (method="auto")
    peer-thin   torch.linalg.svd(full_matrices=False), as mergekit calls it (once per shape and spectrum)
    peer-full   torch.linalg.svd(full_matrices=True), kohya-ss's default: on a non-square matrix it also
                builds the full (big, big) orthogonal factor (first spectrum only: slow)

Columns: seconds (best of --repeat for the fast routes; the full SVDs run once), relative error measured
directly as ‖M − B·A‖_F / ‖M‖_F, its ratio to the optimum, the ratio of retained energy to the optimal
retained energy (telling on flat spectra, where every error ratio is near 1), speed-up over peer-thin, and
the peak anonymous memory above the matrix itself (RssAnon sampled every 5 ms; CUDA: peak allocated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a file (python benchmarks/bench_svd.py): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.memory import PeakMemory  # noqa: E402
from deltakit.math.factorize import resolve_device, truncated_svd  # noqa: E402
from deltakit.math.lowrank import balanced_factors  # noqa: E402

FULL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(1024, 1024), (2752, 1024), (1024, 2752)]
SPECTRA = ("decaying", "flat")


@dataclass
class Row:
    shape: str
    spectrum: str
    rank: int
    route: str
    method: str
    seconds: float
    relative_error: float
    optimal_error: float
    error_ratio: float
    energy_ratio: float
    speedup: float | None
    peak_anon_mib: float
    peak_cuda_mib: float | None


def spectrum(kind: str, size: int, aspect: float) -> np.ndarray:
    """``size`` singular values, descending, for an (m, n) matrix with aspect = min/max ≤ 1."""
    if kind == "decaying":
        return 1.0 / np.arange(1, size + 1, dtype=np.float64)
    if kind == "flat":
        return _marchenko_pastur_quantiles(size, aspect)
    raise ValueError(f"unknown spectrum {kind!r}")


def _marchenko_pastur_quantiles(size: int, aspect: float) -> np.ndarray:
    # Singular values of an m×n Gaussian matrix (scaled by 1/√max): density
    # √((b − σ²)(σ² − a)) / (π·c·σ) on [√a, √b], a, b = (1 ∓ √c)²; inverted at the mid-quantiles.
    lo, hi = (1 - math.sqrt(aspect)) ** 2, (1 + math.sqrt(aspect)) ** 2
    grid = np.linspace(math.sqrt(lo), math.sqrt(hi), 200_001)
    density = np.sqrt(np.clip((hi - grid**2) * (grid**2 - lo), 0, None)) / (math.pi * aspect * np.maximum(grid, 1e-12))
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(grid))])
    cdf /= cdf[-1]
    quantiles = (np.arange(size, 0, -1) - 0.5) / size
    return np.interp(quantiles, cdf, grid)


class PlantedMatrices:
    """Planted test matrices, with the random orthogonal bases cached per shape (each costs a QR)."""

    def __init__(self, seed: int = 1234) -> None:
        self._seed = seed
        self._bases: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, shape: tuple[int, int], kind: str) -> tuple[torch.Tensor, np.ndarray]:
        """M (fp32, CPU) of this shape and its singular values σ (fp64, descending)."""
        big, small = max(shape), min(shape)
        u, v = self._basis(big, small)  # (big, small), (small, small)
        sigma = np.ascontiguousarray(spectrum(kind, small, small / big))
        matrix = (u * torch.from_numpy(sigma).float()) @ v.T  # (big, small)
        if shape[0] < shape[1]:
            matrix = matrix.T.contiguous()
        return matrix, sigma

    def _basis(self, big: int, small: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (big, small) not in self._bases:
            generator = torch.Generator().manual_seed(self._seed)
            u = torch.linalg.qr(torch.randn(big, small, generator=generator)).Q
            v = torch.linalg.qr(torch.randn(small, small, generator=generator)).Q
            self._bases[(big, small)] = (u, v)
        return self._bases[(big, small)]


def optimal_error(sigma: np.ndarray, rank: int) -> float:
    """Eckart–Young: √(Σ_{i>rank} σ_i² / Σ σ_i²)."""
    energy = sigma**2
    return math.sqrt(energy[rank:].sum() / energy.sum())


def _measured_error(matrix: torch.Tensor, lora_b: torch.Tensor, lora_a: torch.Tensor) -> float:
    rebuilt = lora_b.double() @ lora_a.double()
    return float(torch.linalg.matrix_norm(matrix.double() - rebuilt) / torch.linalg.matrix_norm(matrix.double()))


def _timed(fn: Callable[[], object], repeat: int, device: torch.device) -> tuple[object, float, PeakMemory]:
    best, result, peak = math.inf, None, PeakMemory()
    for _ in range(repeat):
        with PeakMemory() as current:
            start = time.perf_counter()
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
        if elapsed < best:
            best, peak = elapsed, current
    return result, best, peak


def run(
    shapes: list[tuple[int, int]],
    ranks: list[int],
    spectra: list[str],
    device: torch.device,
    repeat: int,
    with_full_matrices: bool,
    progress: Callable[[str], None],
) -> list[Row]:
    """Every row of the table; see the module docstring."""
    planted = PlantedMatrices()
    rows: list[Row] = []
    for shape in shapes:
        for kind in spectra:
            matrix, sigma = planted.get(shape, kind)
            on_device = matrix.to(device)
            shape_name = f"{shape[0]}x{shape[1]}"
            progress(f"{shape_name} {kind}")

            def add(route: str, rank: int, method: str, seconds: float, error: float, peak: PeakMemory) -> None:
                best = optimal_error(sigma, rank)
                rows.append(
                    Row(
                        shape=shape_name,
                        spectrum=kind,
                        rank=rank,
                        route=route,
                        method=method,
                        seconds=seconds,
                        relative_error=error,
                        optimal_error=best,
                        error_ratio=error / best,
                        energy_ratio=(1 - error**2) / (1 - best**2),
                        speedup=None,
                        peak_anon_mib=peak.anon_delta_bytes / 2**20,
                        peak_cuda_mib=None if peak.cuda_peak_bytes is None else peak.cuda_peak_bytes / 2**20,
                    )
                )

            (u, s, vh), seconds, peak = _timed(
                lambda: torch.linalg.svd(on_device, full_matrices=False), 1, device
            )
            for rank in ranks:
                root = s[:rank].sqrt()
                error = _measured_error(matrix, (u[:, :rank] * root).cpu(), (root[:, None] * vh[:rank]).cpu())
                add("peer-thin", rank, "torch.linalg.svd", seconds, error, peak)
            peer_seconds = seconds
            del u, s, vh

            # Its time hardly depends on the spectrum: measure it once per shape.
            if with_full_matrices and kind == spectra[0]:
                (u, s, vh), seconds, peak = _timed(
                    lambda: torch.linalg.svd(on_device, full_matrices=True), 1, device
                )
                for rank in ranks:
                    root = s[:rank].sqrt()
                    error = _measured_error(matrix, (u[:, :rank] * root).cpu(), (root[:, None] * vh[:rank]).cpu())
                    add("peer-full", rank, "torch.linalg.svd(full_matrices=True)", seconds, error, peak)
                del u, s, vh

            exact, seconds, peak = _timed(
                lambda: truncated_svd(matrix, max(ranks), method="exact", device=device), 1, device
            )
            for rank in ranks:
                error = _measured_error(matrix, *balanced_factors(exact.u[:, :rank], exact.s[:rank], exact.vh[:rank]))
                add("exact", rank, exact.method, seconds, error, peak)

            for rank in ranks:
                for route in ("randomized", "auto"):
                    result, seconds, peak = _timed(
                        lambda: truncated_svd(matrix, rank, method=route, device=device), repeat, device
                    )
                    error = _measured_error(matrix, *balanced_factors(result.u, result.s, result.vh))
                    add(route, rank, result.method, seconds, error, peak)

            for row in rows:
                if row.shape == shape_name and row.spectrum == kind:
                    row.speedup = peer_seconds / row.seconds
            del matrix, on_device
    return rows


def format_table(rows: list[Row]) -> str:
    """The rows as a fixed-width text table."""
    header = (
        f"{'shape':<11} {'spectrum':<8} {'r':>3} {'route':<10} {'method':<12} {'seconds':>8} {'speedup':>8} "
        f"{'rel.err':>8} {'optimum':>8} {'err/opt':>8} {'energy/opt':>10} {'anon MiB':>9} {'cuda MiB':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in sorted(rows, key=lambda r: (r.shape, r.spectrum, r.rank)):
        method = row.method if row.method.startswith(("exact", "randomized")) else "-"
        cuda = "-" if row.peak_cuda_mib is None else f"{row.peak_cuda_mib:.0f}"
        lines.append(
            f"{row.shape:<11} {row.spectrum:<8} {row.rank:>3} {row.route:<10} {method:<12} {row.seconds:>8.3f} "
            f"{row.speedup:>7.1f}x {row.relative_error:>8.5f} {row.optimal_error:>8.5f} {row.error_ratio:>8.4f} "
            f"{row.energy_ratio:>10.4f} {row.peak_anon_mib:>9.0f} {cuda:>9}"
        )
    return "\n".join(lines)


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        out_features, in_features = item.lower().split("x")
        shapes.append((int(out_features), int(in_features)))
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--shapes", type=_parse_shapes, help="e.g. 4096x4096,11008x4096 (out x in)")
    parser.add_argument("--ranks", default="16,64", help="comma-separated ranks (default: 16,64)")
    parser.add_argument("--spectra", default=",".join(SPECTRA), help="decaying,flat")
    parser.add_argument("--quick", action="store_true", help="shapes a quarter as wide: a smoke run")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for the fast routes (default: 3)")
    parser.add_argument("--no-full-matrices", action="store_true", help="skip the full_matrices=True row")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and the environment as JSON")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    ranks = [int(r) for r in args.ranks.split(",")]
    spectra = args.spectra.split(",")
    started = time.perf_counter()
    rows = run(
        shapes,
        ranks,
        spectra,
        device,
        args.repeat,
        with_full_matrices=not args.no_full_matrices,
        progress=lambda text: print(f"... {text}", file=sys.stderr, flush=True),
    )
    environment = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average": os.getloadavg(),
    }
    print(format_table(rows))
    decaying = [r.error_ratio for r in rows if r.route == "auto" and r.spectrum == "decaying"]
    if decaying:
        print(f"\nauto on decaying spectra: worst error ratio {max(decaying):.4f}, "
              f"median speed-up {statistics.median(r.speedup for r in rows if r.route == 'auto'):.1f}x")
    print(f"environment: {json.dumps(environment)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": environment, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
