"""Truncated SVD of a weight delta: exact or randomized, on CPU or CUDA, with fallbacks.

``truncated_svd(delta, rank)`` returns the leading ``rank`` singular triplets of a 2-D matrix as a
:class:`TruncatedSVD`, which also knows the matrix's total energy ‖M‖_F² and the energy the factors
leave out, so rank policies and error reports need no second pass over the matrix.

Routes
    exact       ``torch.linalg.svd(full_matrices=False)`` of the tall orientation (M or Mᵀ), then
                truncation: Eckart–Young optimal.
    randomized  Halko, Martinsson & Tropp (2011), "Finding structure with randomness", Alg. 4.4
                (subspace iteration, re-orthonormalized by QR after every multiply) and Alg. 5.1
                (SVD of the small projected matrix, i.e. Rayleigh–Ritz). The Gaussian test matrix comes
                from a CPU ``torch.Generator`` seeded with ``seed``, so one seed gives one test matrix on
                every machine and device.
    auto        exact when ``min(shape) <= 512`` or ``rank + oversample >= min(shape) / 4``, else
                randomized.

If an SVD does not converge (``torch.linalg.LinAlgError``) or returns non-finite values, the next route is
tried: the ``gesvd`` driver on CUDA, then fp64 on the CPU; ``method`` records the route that ran
(``"exact"``, ``"exact-gesvd"``, ``"exact-fp64"``, ``"randomized"``, ...). When all fail,
:class:`~deltakit.errors.FactorizationError`.

Error accounting. ``U_k S_k Vh_k`` of the randomized route is ``P M`` with ``P = U_k U_kᵀ`` an orthogonal
projection: ``U_k = Q Ũ_k`` has orthonormal columns and ``S_k Vh_k = Ũ_kᵀ B = U_kᵀ M`` for ``B = Qᵀ M``.
So ``‖M − P M‖² = ‖M‖² − ‖U_kᵀ M‖² = total − Σ_{i≤k} s_i²`` holds for these final Rayleigh–Ritz factors
(and for any factors of the form ``U (Uᵀ M)`` with orthonormal ``U``), not for arbitrary
``U_k S_k Vh_k``. In fp32 that subtraction cancels: Σ s_i² is off by 1e-7–1e-6 of the total, so relative
errors below ~1e-3 are noise (a rank-7 2048×1024 delta at r=10: 3.5e-4 reported for a true 5.5e-7). Instead ``residual_energy`` is measured without cancellation:
the exact route sums the discarded singular values squared, the randomized route adds the Ritz values it
discards to ``‖M − Q B‖²``, which it measures directly (one more pass over M, in row blocks) when it is below
1% of ‖M‖²; above that, ‖M‖² − Σ (Ritz values)² is already within 1e-4 of it.

Defaults, measured on 2 cores of an AMD EPYC (Zen 5, MKL, torch 2.13 CPU), planted matrices
``U·diag(σ)·Vᵀ`` with known σ so the optimal error is analytic (``benchmarks/bench_svd.py``):

    oversample=8; niter=2 up to rank 64, 3 above. Error over the optimum, err/opt, for σ_i = 1/i
    (and σ_i = 1/√i):
        oversample:niter      r=16             r=64             r=128*           r=256*           r=512*
        8:2             1.0009 (1.0017)  1.0067 (1.0052)  1.0106 (1.0076)  1.0136 (1.0106)  1.0172 (1.0152)
        8:3             1.0001 (1.0005)  1.0024 (1.0022)  1.0044 (1.0035)  1.0062 (1.0051)  1.0084 (1.0076)
        16:3            1.0000 (1.0001)  1.0007 (1.0013)  1.0021 (1.0024)  1.0048 (1.0045)  1.0070 (1.0069)
        8:4             1.0000 (1.0002)  1.0010 (1.0011)  1.0022 (1.0019)  1.0034 (1.0029)  1.0048 (1.0045)
    (11008×4096; * 4096×4096). niter=2 misses 1.01 from r=128 on, niter=3 stays under it up to r=512
    (1.0102 / 1.0114 at r=1000, where auto switches to exact); oversample 16 gains little for ~10% more
    time at r=64. Each extra niter is two more passes over M: niter=2 takes 20–24% less CPU time than 3
    (11008×4096, one thread: 0.37 vs 0.46 s at r=16, 0.69 vs 0.91 s at r=64) for err/opt ≤ 1.0084 up to
    r=64 (4096×4096: 1.0011 at r=16, 1.0029 at r=32, 1.0084 at r=64), hence the default by rank.
    niter=1 would save another ~30% of the time but reaches err/opt 1.0102 at r=16 and 1.0328 at r=64
    (4096×4096) and keeps 0.74× of a flat spectrum's optimal energy: not taken.
    Speed at 11008×4096 (bench_svd.py, load average ~2): full thin SVD 15.9 s, auto (randomized) 0.24 s
    at r=16 (66×) and 0.46 s at r=64 (34×); 4096×4096: 10.4 s vs 0.095 s (109×). With one thread each
    on a loaded machine: 46 s vs 0.46 s (100×) at r=16.
    Flat (Gaussian-noise, Marchenko–Pastur) spectra are the randomized route's weak spot: err/opt stays
    ≈1.001–1.005 only because every error is near 1; the retained energy is 0.81–0.82× the optimum at
    r=16 (niter=3: 0.86×) and 0.84× at r=64 with niter=2 (niter=3: 0.87×, niter=6: 0.92×). Pass
    ``niter`` (``--niter``) where such spectra matter.
    auto: exact up to min(shape) = 512, where it costs ≤ 0.06 s on one core (randomized 0.004 s) and is
    optimal; and once rank + oversample ≥ min(shape)/4, where randomized is only ~3× faster (4096², r=1000:
    7.3 s vs 22 s on one core) and its err/opt reaches 1.01. In between randomized is 5–25× faster
    (1024², r=16: 23×; 4096², r=256: 13×).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from deltakit.errors import DeviceUnavailableError, FactorizationError, InvalidOptionError
from deltakit.math.threads import one_cpu_thread

__all__ = ["DeltaBuffer", "SvdMethod", "TruncatedSVD", "resolve_device", "truncated_svd"]

SvdMethod = Literal["exact", "randomized", "auto"]

_METHODS = ("exact", "randomized", "auto")
# auto picks exact below this size: there the full SVD takes well under a second and is optimal.
_AUTO_EXACT_MAX_DIM = 512
# ...and when the sketch would cover this fraction of min(shape): randomized then saves little time
# and loses accuracy.
_AUTO_EXACT_FRACTION = 0.25
# Row blocks of about 4 MiB (fp32) for the energy sums.
_BLOCK_ELEMENTS = 1 << 20
# Row blocks of 1 MiB (fp32) for forming ΔW: the block, the base's block and the fp64 widening (4 MiB in all)
# stay in a core's L2 cache from the conversion to the sum of squares.
_DELTA_BLOCK_ELEMENTS = 1 << 18
# ΔW's rows are formed in this many parts, on as many threads where torch has more than one.
_DELTA_PARTS = 2
# The randomized route measures ‖M − Q Qᵀ M‖² directly (a pass over M) only below this fraction of ‖M‖².
_DIRECT_RESIDUAL_BELOW = 0.01
# Power iterations by rank when not given: 2 up to here (err/opt ≤ 1.009 measured), 3 above.
_FEWER_ITERATIONS_MAX_RANK = 64


def _default_niter(rank: int) -> int:
    return 2 if rank <= _FEWER_ITERATIONS_MAX_RANK else 3


@dataclass
class TruncatedSVD:
    """The leading singular triplets of a matrix M, with what is needed to judge them.

    Attributes:
        u: (out, k) fp32, orthonormal columns; the largest-magnitude entry of each column is positive.
        s: (k,) fp32, descending, non-negative.
        vh: (k, in) fp32, orthonormal rows.
        total_energy: ‖M‖_F², accumulated in fp64.
        method: the route that produced the factors ("exact", "randomized", "exact-fp64", "zero", ...).
        residual_energy: ‖M − u·diag(s)·vh‖_F² measured without cancellation (see the module docstring);
            None means unknown, and ``total_energy − Σ s²`` is used instead.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    total_energy: float
    method: str
    residual_energy: float | None = None

    @property
    def rank(self) -> int:
        """How many triplets are held."""
        return self.s.shape[0]

    def truncate(self, rank: int) -> TruncatedSVD:
        """The leading ``rank`` triplets, with the residual updated to match.

        Args:
            rank: 0 ≤ rank ≤ self.rank.

        Returns:
            A new TruncatedSVD sharing storage with this one.

        Raises:
            InvalidOptionError: rank out of range.
        """
        rank = self._check_rank(rank)
        return TruncatedSVD(
            u=self.u[:, :rank],
            s=self.s[:rank],
            vh=self.vh[:rank],
            total_energy=self.total_energy,
            method=self.method,
            residual_energy=self._tail_energy(rank),
        )

    def relative_error(self, rank: int | None = None) -> float:
        """‖M − U_r S_r Vh_r‖_F / ‖M‖_F for the leading ``rank`` triplets (all when None); 0 for M = 0.

        For the exact route this is the Eckart–Young optimum √(tail energy / total energy).

        Raises:
            InvalidOptionError: rank out of range.
        """
        if self.total_energy == 0.0:
            return 0.0
        return math.sqrt(self._tail_fraction(self._check_rank(rank)))

    def energy_retained(self, rank: int | None = None) -> float:
        """1 − ‖M − U_r S_r Vh_r‖_F² / ‖M‖_F² for the leading ``rank`` triplets; 1 for M = 0.

        Raises:
            InvalidOptionError: rank out of range.
        """
        if self.total_energy == 0.0:
            return 1.0
        return 1.0 - self._tail_fraction(self._check_rank(rank))

    def _check_rank(self, rank: int | None) -> int:
        if rank is None:
            return self.rank
        if not 0 <= rank <= self.rank:
            raise InvalidOptionError(f"rank {rank} is outside 0..{self.rank}, the rank this SVD was computed at")
        return rank

    def _tail_energy(self, rank: int) -> float:
        dropped = float(self.s[rank:].double().square().sum())
        if self.residual_energy is not None:
            return self.residual_energy + dropped
        kept = float(self.s[:rank].double().square().sum())
        return max(self.total_energy - kept, 0.0)

    def _tail_fraction(self, rank: int) -> float:
        return min(max(self._tail_energy(rank) / self.total_energy, 0.0), 1.0)


class DeltaBuffer:
    """ΔW = W_ft − W0 in fp32, formed in memory reused from one module to the next, with ‖ΔW‖_F² on the way.

    A fresh fp32 tensor per module costs a page fault and the kernel's zero-fill for every page of it, as much
    as the conversion itself; here one buffer grows to the largest module and stays. On the CPU the difference
    is formed in blocks of rows that stay in cache from the conversion through the subtraction to the fp64 sum of
    squares, so ΔW is written once and never read back for its energy. That sum is finite exactly when ΔW is (an
    fp32 value squared cannot overflow fp64): it is also the finiteness check. The base's own ‖W0‖_F² is summed
    in the same pass (:attr:`base_energy`), while its converted block is in cache.

    The rows are split in two halves, each summed on its own; where torch has more than one thread the second
    half of a matrix of at least two blocks runs on a thread of its own, each op on one core
    (:func:`~deltakit.math.threads.one_cpu_thread`). Torch's own threads would split every 1 MiB op and wake each
    other for it: ΔW of 30 modules took 0.58 s this way, 1.02 s on one thread and 2.08 s on torch's two passive
    threads. The halves are the same whatever the thread count, so are the sums: a 1-thread run (a Ray task) gives
    the same bits.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._memory = torch.empty(0, dtype=torch.float32, device=device)
        self._scratch = [self._new_scratch(_DELTA_BLOCK_ELEMENTS) for _ in range(_DELTA_PARTS)]
        self.base_energy = 0.0  # ‖W0‖_F² (fp64) of the last call's base

    def form(self, finetuned: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, float]:
        """ΔW and ‖ΔW‖_F² (fp64; NaN or ±Inf when ΔW holds one).

        Args:
            finetuned, base: the two stored weights, of one shape, any float dtypes, on the CPU.

        Returns:
            ΔW in fp32 on the buffer's device, in the stored shape: a view of this buffer, valid until the next
            call. Each element is ``float32(finetuned) − float32(base)``, rounded once, whatever the route.
        """
        if finetuned.shape != base.shape:  # the plan refuses such pairs before any math
            raise ValueError(f"cannot subtract a {list(base.shape)} weight from a {list(finetuned.shape)} one")
        numel = finetuned.numel()
        if self._memory.numel() < numel:
            self._memory = torch.empty(0, dtype=torch.float32, device=self.device)  # the old one goes first
            self._memory = torch.empty(numel, dtype=torch.float32, device=self.device)
        delta = self._memory[:numel].view(finetuned.shape)
        if self.device.type != "cpu" or numel == 0:
            delta.copy_(finetuned)
            widened_base = base.to(self.device)
            delta.sub_(widened_base)  # upcast exactly, subtracted in fp32: the same rounding as below
            if not numel:
                self.base_energy = 0.0
                return delta, 0.0
            self.base_energy = _sum_squares(widened_base.reshape(delta.shape[0], -1))
            return delta, _sum_squares(delta.reshape(delta.shape[0], -1))
        rows_out = delta.reshape(delta.shape[0], -1)
        rows_ft, rows_base = finetuned.reshape(rows_out.shape), base.reshape(rows_out.shape)
        rows = max(1, _DELTA_BLOCK_ELEMENTS // rows_out.shape[1])
        if self._scratch[0][1].numel() < rows * rows_out.shape[1]:  # a single row longer than a block
            self._scratch = [self._new_scratch(rows * rows_out.shape[1]) for _ in range(_DELTA_PARTS)]
        bounds = [rows_out.shape[0] * k // _DELTA_PARTS for k in range(_DELTA_PARTS + 1)]
        parts = [(rows_out[a:b], rows_ft[a:b], rows_base[a:b], rows, *scratch)
                 for (a, b), scratch in zip(zip(bounds, bounds[1:]), self._scratch)]
        # A thread for the second half only where there is a core for it and a few blocks of work.
        spread = torch.get_num_threads() > 1 and numel >= _DELTA_PARTS * _DELTA_BLOCK_ELEMENTS
        with one_cpu_thread(self.device):
            if spread:
                with ThreadPoolExecutor(_DELTA_PARTS - 1) as pool:
                    others = [pool.submit(_form_rows, *part) for part in parts[1:]]
                    sums = [_form_rows(*parts[0])] + [other.result() for other in others]
            else:
                sums = [_form_rows(*part) for part in parts]
        self.base_energy = float(sum(base for _, base in sums))
        return delta, float(sum(total for total, _ in sums))

    @staticmethod
    def _new_scratch(elements: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(elements, dtype=torch.float32), torch.empty(elements, dtype=torch.float64)


def _form_rows(out: torch.Tensor, finetuned: torch.Tensor, base: torch.Tensor, rows: int, base_block: torch.Tensor,
               widened: torch.Tensor) -> tuple[float, float]:
    """ΔW of some rows into ``out``, a block of ``rows`` rows at a time; (‖ΔW‖², ‖W0‖²) of those rows in fp64."""
    total = torch.zeros((), dtype=torch.float64)
    base_total = torch.zeros((), dtype=torch.float64)
    for start in range(0, out.shape[0], rows):
        block = out[start : start + rows]
        block.copy_(finetuned[start : start + rows])
        base_rows = base_block[: block.numel()].view(block.shape)
        base_rows.copy_(base[start : start + rows])
        wide = widened[: block.numel()]
        wide.view(block.shape).copy_(base_rows)
        base_total += torch.dot(wide, wide)
        block.sub_(base_rows)
        wide.view(block.shape).copy_(block)
        total += torch.dot(wide, wide)
    return float(total), float(base_total)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device the math runs on.

    Args:
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" or a torch.device.

    Returns:
        The torch.device.

    Raises:
        DeviceUnavailableError: CUDA (or that CUDA device) was asked for and is not available.
        InvalidOptionError: the string names no device, or a device other than CPU or CUDA.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidOptionError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise InvalidOptionError(f"unsupported device {str(device)!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {str(device)!r} requested but CUDA is not available; use --device cpu or auto"
        )
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise DeviceUnavailableError(
            f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return resolved


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    method: SvdMethod = "auto",
    oversample: int = 8,
    niter: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    total_energy: float | None = None,
) -> TruncatedSVD:
    """The leading ``rank`` singular triplets of ``matrix``.

    The math runs in fp32 on ``device`` (fp64 on the CPU as a fallback); the factors come back on the CPU
    in fp32. The input is never modified. Same input, seed and machine give bitwise identical factors.

    Args:
        matrix: (out, in), any float dtype, finite (the caller checks).
        rank: how many triplets, ≥ 1. At or above min(out, in) the full thin SVD is computed exactly,
            whatever ``method`` says, and k = min(out, in).
        method: "exact", "randomized" or "auto" (see the module docstring for the rule).
        oversample: extra sketch columns of the randomized route (the sketch has rank + oversample).
        niter: power (subspace) iterations of the randomized route; None: 2 up to rank 64, 3 above (see the
            module docstring).
        seed: seeds the randomized route's Gaussian test matrix (a local CPU generator).
        device: where the math runs, as for :func:`resolve_device`.
        total_energy: ‖matrix‖_F² (fp64), where the caller already has it (:meth:`DeltaBuffer.form` sums it
            while forming ΔW); None: summed here, one more pass over the matrix.

    Returns:
        A TruncatedSVD with k = min(rank, out, in) triplets. For a zero matrix no SVD runs: s = 0,
        u and vh are the leading columns and rows of the identity, total_energy = 0, method "zero".

    Raises:
        InvalidOptionError: a bad rank, method, oversample, niter or device, or a matrix that is not a
            non-empty 2-D tensor.
        DeviceUnavailableError: CUDA was asked for and is not available.
        FactorizationError: every route failed to converge or gave non-finite factors.
    """
    if matrix.ndim != 2 or matrix.numel() == 0:
        raise InvalidOptionError(f"truncated_svd needs a non-empty 2-D matrix, got shape {tuple(matrix.shape)}")
    if rank < 1:
        raise InvalidOptionError(f"rank must be at least 1, got {rank}")
    if method not in _METHODS:
        raise InvalidOptionError(f"unknown SVD method {method!r}; use one of {', '.join(_METHODS)}")
    if niter is None:
        niter = _default_niter(rank)
    if oversample < 0 or niter < 0:
        raise InvalidOptionError(f"oversample and niter must be ≥ 0, got {oversample} and {niter}")
    math_device = resolve_device(device)
    out_features, in_features = matrix.shape
    min_dim = min(out_features, in_features)
    k = min(rank, min_dim)

    delta = matrix.to(device=math_device, dtype=torch.float32)  # (out, in); no copy when already so
    if total_energy is None:
        total_energy = _sum_squares(delta)
    if not math.isfinite(total_energy):
        raise FactorizationError(
            f"the {out_features}×{in_features} matrix has non-finite values (or values beyond fp32's range)"
        )
    if total_energy == 0.0:
        return TruncatedSVD(
            u=torch.eye(out_features, k),
            s=torch.zeros(k),
            vh=torch.eye(k, in_features),
            total_energy=0.0,
            method="zero",
            residual_energy=0.0,
        )

    if rank >= min_dim:
        route = "exact"
    elif method == "auto":
        is_small = min_dim <= _AUTO_EXACT_MAX_DIM
        is_wide_sketch = rank + oversample >= _AUTO_EXACT_FRACTION * min_dim
        route = "exact" if is_small or is_wide_sketch else "randomized"
    else:
        route = method

    # (suffix for `method`, dtype, device, cuSOLVER driver); the CPU has a single LAPACK driver.
    attempts = [("", torch.float32, math_device, None)]
    if math_device.type == "cuda":
        attempts.append(("-gesvd", torch.float32, math_device, "gesvd"))
    attempts.append(("-fp64", torch.float64, torch.device("cpu"), None))
    last_error: torch.linalg.LinAlgError | None = None
    for suffix, dtype, attempt_device, driver in attempts:
        work = delta.to(device=attempt_device, dtype=dtype)
        try:
            if route == "exact":
                u, s, vh, residual = _exact(work, k, driver)
            else:
                u, s, vh, residual = _randomized(work, k, oversample, niter, seed, driver, total_energy)
        except torch.linalg.LinAlgError as e:
            last_error = e
            continue
        if not (math.isfinite(residual) and all(bool(t.isfinite().all()) for t in (u, s, vh))):
            continue
        u, vh = _normalize_signs(u, vh)
        return TruncatedSVD(
            u=u.to("cpu", torch.float32),
            s=s.to("cpu", torch.float32),
            vh=vh.to("cpu", torch.float32),
            total_energy=total_energy,
            method=route + suffix,
            residual_energy=residual,
        )
    tried = ", ".join(suffix.lstrip("-") or "fp32" for suffix, *_ in attempts)
    raise FactorizationError(
        f"{route} SVD of a {out_features}×{in_features} matrix did not converge or gave non-finite values "
        f"({tried}); check the tensor for extreme values"
    ) from last_error


def _exact(
    delta: torch.Tensor, k: int, driver: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    # full_matrices=False: the thin SVD; the full one would also build an (out, out) U for nothing.
    # MKL factors a wide matrix 2.2× slower than its transpose (4096×11008: 37 s, its transpose 17 s),
    # so always factor the tall orientation.
    if delta.shape[0] >= delta.shape[1]:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False, driver=driver)
    else:
        v, s, uh = torch.linalg.svd(delta.T, full_matrices=False, driver=driver)
        u, vh = uh.T, v.T
    residual = float(s[k:].double().square().sum())
    return u[:, :k], s[:k], vh[:k], residual


def _randomized(
    delta: torch.Tensor, k: int, oversample: int, niter: int, seed: int, driver: str | None, total_energy: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    # Sketch the larger side so the Gaussian test matrix and the final small SVD are on the smaller one.
    # Each pass over the matrix costs out·in·width either way.
    is_tall = delta.shape[0] >= delta.shape[1]
    tall = delta if is_tall else delta.T  # (big, small)
    small = tall.shape[1]
    width = min(k + oversample, small)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    test = torch.randn(small, width, generator=generator, dtype=torch.float32)  # (small, width)
    test = test.to(device=tall.device, dtype=tall.dtype)

    # Orthonormalize after every multiply: without it the columns all collapse onto the top singular
    # vector in fp32 after a pass or two (Halko et al. §4.5).
    q = torch.linalg.qr(tall @ test).Q  # (big, width)
    for _ in range(niter):
        p = torch.linalg.qr(tall.T @ q).Q  # (small, width)
        q = torch.linalg.qr(tall @ p).Q  # (big, width)
    projected = q.T @ tall  # (width, small)
    u_small, s, vh = torch.linalg.svd(projected, full_matrices=False, driver=driver)
    u = q @ u_small[:, :k]  # (big, k)

    # ‖M − Q Qᵀ M‖² is orthogonal to what the Ritz values account for, so the rank-k residual is that
    # plus the Ritz values dropped from the sketch. It is ‖M‖² − ‖Qᵀ M‖², whose fp32 rounding (≤ 1e-6 of
    # ‖M‖²) is below 1e-4 of the difference once that is a percent of ‖M‖²; only a smaller one is worth
    # another pass over M to measure directly.
    outside = total_energy - float(s.double().square().sum())
    if outside < _DIRECT_RESIDUAL_BELOW * total_energy:
        outside = _sum_squares(delta, q, projected) if is_tall else _sum_squares(delta, projected.T, q.T)
    residual = outside + float(s[k:].double().square().sum())
    if is_tall:
        return u, s[:k], vh[:k], residual
    return vh[:k].T, s[:k], u.T, residual


def _sum_squares(matrix: torch.Tensor, left: torch.Tensor | None = None, right: torch.Tensor | None = None) -> float:
    """‖matrix‖_F², or ‖matrix − left @ right‖_F², squared and summed in fp64.

    Squaring in fp32 would drop the δ² of entries 1 + δ (a bias, not noise), so each block is widened
    first. Blocks go through reused buffers: the difference never exists whole, and no block lands on
    fresh pages (16 MiB temporaries ran 10× slower on CPU, all page faults).
    """
    if matrix.stride(0) < matrix.stride(1):  # a column-major view: walk its transpose's rows instead
        matrix = matrix.T
        left, right = (None, None) if left is None or right is None else (right.T, left.T)
    rows = max(1, _BLOCK_ELEMENTS // matrix.shape[1])
    block_shape = (min(rows, matrix.shape[0]), matrix.shape[1])
    difference = matrix.new_empty(block_shape) if left is not None else None
    widened = torch.empty(block_shape[0] * block_shape[1], dtype=torch.float64, device=matrix.device)
    total = torch.zeros((), dtype=torch.float64, device=matrix.device)
    for start in range(0, matrix.shape[0], rows):
        block = matrix[start : start + rows]
        if left is not None and right is not None and difference is not None:
            block = torch.addmm(block, left[start : start + rows], right, alpha=-1, out=difference[: len(block)])
        flat = widened[: block.numel()]
        flat.view(block.shape).copy_(block)
        total += torch.dot(flat, flat)
    return float(total)


def _normalize_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Singular vectors are defined up to a joint sign flip of (u_i, vh_i); fixing it makes the factors
    # comparable across methods, devices and runs.
    pivot = u.abs().argmax(dim=0)  # (k,)
    signs = torch.where(u.gather(0, pivot[None]).squeeze(0) < 0, -1.0, 1.0).to(u.dtype)  # (k,)
    return u * signs, vh * signs[:, None]
