"""Output-aware low-rank fits: minimise E‖(ΔW − BA)x‖² over a module's calibration inputs x, not ‖ΔW − BA‖.

With C = E[xxᵀ], the (in, in) second moment of the module's inputs, and any L with L·Lᵀ = C,

    E‖(ΔW − M)x‖² = tr((ΔW − M)·C·(ΔW − M)ᵀ) = ‖(ΔW − M)·L‖_F².

So the rank-r M minimising it is found by whitening: truncate ΔW·L to rank r (Eckart–Young) and map back,
M = trunc_r(ΔW·L)·L⁻¹. Any M with M·L = trunc_r(ΔW·L) is as good; the map back is the one sought. When C is
singular (an input direction never excited) L has fewer columns than rows and L⁻¹ becomes the pseudo-inverse L⁺:
then M·L = trunc_r(ΔW·L) still holds (L⁺L = I), and M is zero on the directions C never saw, where the objective
cannot tell fits apart. Damping (below) keeps every direction, so this only happens with ``damping=0``.

Damping. The fit is made for C + λ·mean(diag C)·I, as GPTQ (Frantar et al. 2022) damps its Hessian: λ → 0 is
the pure output objective on the calibration inputs, λ → ∞ the plain SVD of ΔW. A little damping guards the
directions the calibration text excites rarely (and makes C invertible); it is applied once, in
:func:`whitening`, and the reported output errors are under the damped C as well.

Output side (Fisher weighting). An error in a module's output matters as much as the model's output moves with it.
With G = E[ggᵀ], g the gradient of the model's log-likelihood (of labels drawn from the model itself, so G is the
Fisher information's output factor) at the module's output, the Kronecker-factored (K-FAC) second-order
estimate of the KL divergence the error causes is ½·E‖Rᵀ(ΔW − M)L‖_F² with R·Rᵀ = G, and it is minimised the same
way: truncate Rᵀ·ΔW·L and map back on both sides, M = R⁻ᵀ·trunc_r(Rᵀ·ΔW·L)·L⁻¹. G is damped like C.

Embeddings. An embedding's input is a one-hot token, so its C is diagonal: the tokens' frequencies in the
calibration text, and the whitening scales column t of ΔE (PEFT's (dim, vocab) orientation) by √freq_t.

Error at every rank. A fit ΔW_r = Σ_{i≤r} s_i·u_i·ṽ_i (neither u nor ṽ need be orthonormal) has, under any
input moment C and output moment G, ‖ΔW − ΔW_r‖²_{G,C} = tr(G (ΔW − ΔW_r) C (ΔW − ΔW_r)ᵀ) =
tr(G ΔW C ΔWᵀ) − 2 Σ_{i≤r} s_i·u_iᵀ G ΔW C ṽ_iᵀ + Σ_{i,j≤r} s_i s_j (uᵀGu)_ij (ṽCṽᵀ)_ij. :class:`ErrorMeter`
evaluates that for r = 0..k in one pass (k×k Gram matrices): the weight-space error of a whitened fit (G = C = I),
the output error of a plain fit, or either under held-out statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from deltakit.errors import FactorizationError, InvalidOptionError
from deltakit.math.factorize import TruncatedSVD

__all__ = ["DEFAULT_DAMPING", "DeferredOutputAwareFit", "ErrorMeter", "OutputAwareFit", "WhitenedSVD", "Whitening", "output_aware_fit",
           "whitened_svd", "whitening"]

# λ of C + λ·mean(diag C)·I; GPTQ's default percdamp, see the README's calibration section for the measurement.
DEFAULT_DAMPING = 0.01
# Eigenvalues below this fraction of the largest count as zero when C is singular (an fp32 C of rank p has
# p eigenvalues near its scale and the rest at ~1e-7 of it).
_EIGEN_CUTOFF = 1e-6


@dataclass(frozen=True)
class Whitening:
    """A square root L of a (damped) second moment, L·Lᵀ = C, and the way back.

    Attributes:
        root: L. ``diagonal``: (in,), the diagonal of L. ``cholesky``: (in, in), lower-triangular. ``eigen``:
            (in, p), Q·Λ^½ over the p eigenvalues above the cut-off (C singular, no damping).
        kind: how L was found.
    """

    root: torch.Tensor
    kind: Literal["diagonal", "cholesky", "eigen"]

    @property
    def width(self) -> int:
        """Columns of L: ``in``, or the rank p of a singular C."""
        return self.root.shape[-1]

    def whiten(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW·L: (out, in) → (out, width)."""
        root = self.root.to(delta.device)
        return delta * root if self.kind == "diagonal" else delta @ root

    def whiten_rows(self, delta: torch.Tensor) -> torch.Tensor:
        """Lᵀ·ΔW: (out, in) → (width, in), for a root of the *output* moment."""
        root = self.root.to(delta.device)
        return delta * root[:, None] if self.kind == "diagonal" else root.T @ delta

    def unwhiten_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """L⁻ᵀ·columns (L⁺ᵀ for ``eigen``): (width, k) → (out, k), the map from whitened left factors back."""
        return self.unwhiten_rows(columns.T).T

    def unwhiten_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """rows·L⁻¹ (L⁺ for ``eigen``): (k, width) → (k, in), the map from whitened right factors back."""
        root = self.root.to(rows.device)
        if self.kind == "diagonal":
            return rows / root
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(root, rows, upper=False, left=False)
        # L = Q·Λ^½ with orthonormal Q: L⁺ = Λ^-½·Qᵀ = (L / Λ)ᵀ, and Λ_j = ‖L[:, j]‖².
        return rows @ (root / root.square().sum(dim=0)).T


def whitening(moment: torch.Tensor, damping: float = DEFAULT_DAMPING) -> Whitening:
    """L with L·Lᵀ = C + damping·mean(diag C)·I.

    Args:
        moment: C = E[xxᵀ], (in, in) symmetric positive semi-definite, or (in,) for a diagonal C.
        damping: λ ≥ 0, relative to the mean of C's diagonal.

    Returns:
        The :class:`Whitening`: Cholesky when the damped C is positive definite, otherwise (only possible with
        ``damping=0``, or a C too ill-conditioned for fp64 Cholesky) an eigendecomposition keeping the
        eigenvalues above 1e-6 of the largest.

    Raises:
        InvalidOptionError: a negative damping, a C of the wrong shape, or a C that is zero (no input seen).
        FactorizationError: C has non-finite values, or no eigenvalue above the cut-off.
    """
    if not damping >= 0:
        raise InvalidOptionError(f"calibration damping must be ≥ 0, got {damping}")
    if moment.ndim not in (1, 2) or (moment.ndim == 2 and moment.shape[0] != moment.shape[1]):
        raise InvalidOptionError(f"a second moment is (in, in) or (in,), got shape {tuple(moment.shape)}")
    c = moment.double()
    diagonal = c if c.ndim == 1 else c.diagonal()
    if not bool(torch.isfinite(c).all()):
        raise FactorizationError("the input second moment has non-finite values")
    scale = float(diagonal.mean())
    if not scale > 0:
        raise InvalidOptionError("the input second moment is zero: no calibration input reached this module")
    if c.ndim == 1:
        damped = c.clamp(min=0) + damping * scale
        keep = damped > _EIGEN_CUTOFF * float(damped.max())
        if bool(keep.all()):
            return Whitening(damped.sqrt().float(), "diagonal")
        # Tokens never seen (no damping): their columns leave the objective; drop them like a singular C.
        eye = torch.eye(len(c), dtype=torch.float64, device=c.device)[:, keep]
        return Whitening((eye * damped[keep].sqrt()).float(), "eigen")
    c = (c + c.T) / 2  # accumulated sums are symmetric only up to rounding
    damped = c + damping * scale * torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
    if damping > 0:
        root, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return Whitening(root.float(), "cholesky")
    values, vectors = torch.linalg.eigh(damped)  # ascending
    keep = values > _EIGEN_CUTOFF * float(values[-1])
    if not bool(keep.any()):
        raise FactorizationError("the input second moment has no positive eigenvalue")
    return Whitening((vectors[:, keep] * values[keep].sqrt()).float(), "eigen")


@dataclass
class WhitenedSVD:
    """The output-optimal truncations ΔW_r = u_r·diag(s_r)·vh_r, for every r ≤ k, with their errors.

    ``s`` is the spectrum of Rᵀ·ΔW·L (R = I without an output moment); ``u`` = R⁻ᵀ·U and ``vh`` = Vᵀ·L⁻¹ are
    mapped back, so neither is orthonormal in general; ``u``'s columns are scaled to unit norm (the scale moved
    into ``vh``'s rows) so that stored factors stay balanced. The energies below are E‖ΔW x‖²-type quantities
    under the damped moments.

    Attributes:
        whitened: the truncated SVD of Rᵀ·ΔW·L (u, s, its own orthonormal vh, output energies).
        u: (out, k) fp32, the left factors mapped back.
        vh: (k, in) fp32, the right factors mapped back.
        weight_energy: ‖ΔW‖_F².
        weight_errors: (k + 1,) fp64, ‖ΔW − ΔW_r‖_F² for r = 0..k.
    """

    whitened: TruncatedSVD
    u: torch.Tensor
    vh: torch.Tensor
    weight_energy: float
    weight_errors: torch.Tensor

    @property
    def s(self) -> torch.Tensor:
        return self.whitened.s

    @property
    def rank(self) -> int:
        return self.whitened.rank

    @property
    def total_energy(self) -> float:
        """E‖ΔW x‖² (Fisher-weighted with an output moment) under the damped moments: the energy rank policies and
        budgets weigh."""
        return self.whitened.total_energy

    @property
    def method(self) -> str:
        return f"{self.whitened.method}, whitened"

    def output_relative_error(self, rank: int) -> float:
        """√(E‖(ΔW − ΔW_r)x‖² / E‖ΔW x‖²) (Fisher-weighted with an output moment): the predicted output error,
        optimal at every rank."""
        return self.whitened.relative_error(rank)

    def weight_relative_error(self, rank: int) -> float:
        """‖ΔW − ΔW_r‖ / ‖ΔW‖ (never below the plain SVD's at that rank)."""
        if self.weight_energy == 0.0:
            return 0.0
        return math.sqrt(min(max(float(self.weight_errors[rank]) / self.weight_energy, 0.0), 1.0))


def whitened_svd(delta: torch.Tensor, whitening: Whitening, rank: int,
                 svd: Callable[[torch.Tensor, int], TruncatedSVD],
                 output: Whitening | None = None) -> WhitenedSVD:
    """Minimise E‖Rᵀ(ΔW − M)x‖² over rank-r M, for r = 1..``rank`` at once: SVD of Rᵀ·ΔW·L, mapped back.

    Args:
        delta: ΔW, (out, in) fp32, finite.
        whitening: a square root L of the (damped) second moment of the module's inputs (:func:`whitening`).
        rank: how many triplets to keep (at most min(width of R, width of L)).
        svd: the truncated SVD to run on Rᵀ·ΔW·L, e.g. ``functools.partial(truncated_svd, method="exact")``.
        output: a square root R of the (damped) second moment of the gradients at the module's outputs; None for
            R = I (every output direction alike).

    Returns:
        The :class:`WhitenedSVD`; its factors live on the CPU in fp32, like :func:`truncated_svd`'s.
    """
    target = whitening.whiten(delta)
    if output is not None:
        target = output.whiten_rows(target)
    whitened = svd(target, rank)
    del target
    vh = whitening.unwhiten_rows(whitened.vh.to(delta.device))
    u = whitened.u.to(delta.device)
    if output is not None:
        u = output.unwhiten_columns(u)
        norms = torch.linalg.vector_norm(u, dim=0).clamp(min=torch.finfo(u.dtype).tiny)
        u, vh = u / norms, vh * norms[:, None]
    u, vh = u.cpu(), vh.cpu()
    weight_errors = ErrorMeter(delta).curve(u, whitened.s, vh)
    return WhitenedSVD(whitened, u, vh, float(weight_errors[0]), weight_errors)


class ErrorMeter:
    """‖ΔW − u_r·diag(s_r)·vh_r‖²_{G,C} for r = 0..k, where ‖E‖²_{G,C} = tr(G·E·C·Eᵀ), for any fits of one ΔW
    under one input moment C and one output moment G.

    No orthonormality is assumed (see the module docstring). G·ΔW·C is formed once, in ``delta``'s dtype on its
    device; the sums run in fp64. Each value is a difference of terms of the size of tr(G ΔW C ΔWᵀ), so errors
    below ~1e-6 of it are rounding noise in fp32.

    Args:
        delta: ΔW, (out, in).
        moment: C, (in, in) or (in,) diagonal; None for C = I.
        output_moment: G, (out, out) or (out,) diagonal; None for G = I.
    """

    def __init__(self, delta: torch.Tensor, moment: torch.Tensor | None = None,
                 output_moment: torch.Tensor | None = None) -> None:
        self.delta = delta
        self.moment = None if moment is None else moment.to(delta.device, delta.dtype)
        self.output_moment = None if output_moment is None else output_moment.to(delta.device, delta.dtype)
        self.weighted = self._weigh_columns(self._weigh(delta))  # G·ΔW·C, (out, in)
        self.total = float((self.weighted.double() * delta.double()).sum())  # tr(G ΔW C ΔWᵀ)

    def _weigh(self, rows: torch.Tensor) -> torch.Tensor:
        """rows·C."""
        if self.moment is None:
            return rows
        return rows * self.moment if self.moment.ndim == 1 else rows @ self.moment

    def _weigh_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """G·columns."""
        if self.output_moment is None:
            return columns
        g = self.output_moment
        return columns * g[:, None] if g.ndim == 1 else g @ columns

    def curve(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        """(k + 1,) fp64 on the CPU: entry r the error of the leading r triplets (entry 0: tr(G ΔW C ΔWᵀ))."""
        device, dtype = self.delta.device, self.delta.dtype
        u, s, vh = u.to(device, dtype), s.to(device, torch.float64), vh.to(device, dtype)
        cross = ((u.T @ self.weighted) * vh).double().sum(dim=1)  # u_iᵀ G ΔW C ṽ_iᵀ, (k,)
        left = (u.T @ self._weigh_columns(u)).double()  # uᵀ G u, (k, k)
        right = (vh @ self._weigh(vh).T).double()  # ṽ C ṽᵀ, (k, k)
        own = s[:, None] * s[None, :] * left * right  # (k, k); Σ over the leading r×r block is r's own term
        own = own.cumsum(dim=0).cumsum(dim=1).diagonal()
        total = torch.tensor([self.total], dtype=torch.float64, device=device)
        return torch.cat([total, total + own - 2 * torch.cumsum(s * cross, dim=0)]).clamp(min=0).cpu()

    def relative(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> float:
        """√(error at ``rank`` / tr(G ΔW C ΔWᵀ)); 0 for a ΔW the inputs do not see."""
        if self.total <= 0:
            return 0.0
        return math.sqrt(min(float(self.curve(u[:, :rank], s[:rank], vh[:rank])[rank]) / self.total, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# One module's calibrated fit


@dataclass
class OutputAwareFit:
    """What a calibrated module was fitted with, and both candidates' errors at its rank.

    The fit is whitened unless the held-out check says otherwise: the whitened fit made from one half of the
    calibration sequences and the plain SVD are both scored on the *other* half's second moment at the module's
    rank, and the plain SVD is kept where it predicts the lower output error there (too few tokens for the
    module's input dimension, or inputs that shift between sequences: the whitened fit then fits noise).

    Attributes:
        svd: what the factors are cut from (:class:`WhitenedSVD` or the plain :class:`TruncatedSVD`).
        route: ``whitened`` or ``plain``.
        rank: the rank chosen.
        weight_relative_error: ‖ΔW − ΔW_r‖ / ‖ΔW‖ of the fit kept.
        output_relative_error: √(E‖(ΔW − ΔW_r)x‖² / E‖ΔW x‖²) of the fit kept, over all calibration inputs.
        plain_output_relative_error: the same for the plain SVD (what the peers store), for comparison.
        heldout_relative_errors: (whitened, plain) output errors on the held-out half that decided the route.
    """

    svd: TruncatedSVD | WhitenedSVD
    route: Literal["whitened", "plain"]
    rank: int
    weight_relative_error: float
    output_relative_error: float
    plain_output_relative_error: float
    heldout_relative_errors: tuple[float, float]

    def metrics(self) -> dict:
        """Per-module report fields."""
        return {"fit": self.route, "output_relative_error": self.output_relative_error,
                "plain_output_relative_error": self.plain_output_relative_error,
                "heldout_output_relative_errors": list(self.heldout_relative_errors)}


@dataclass
class DeferredOutputAwareFit:
    """A whitened fit whose rank is decided later (a budget across modules, from the whitened spectra): its
    errors at every rank r = 0..k, so that the report can be written once the rank is known.

    There is no held-out fallback here: the allocation chooses among whitened triplets, so every module stays
    whitened; the held-out errors are kept for the report.

    Attributes:
        svd: the whitened SVD (its ``s`` and ``total_energy`` are what the allocation weighs).
        weight_errors, output_errors, plain_output_errors: (k + 1,) relative errors: of ΔW, and the predicted
            output error of the whitened fit and of the plain SVD, over all calibration inputs.
        heldout_errors: (k + 1,) each, the output errors on the held-out half of a fit whitened on the other half
            and of the plain SVD.
    """

    svd: WhitenedSVD
    weight_errors: torch.Tensor
    output_errors: torch.Tensor
    plain_output_errors: torch.Tensor
    heldout_errors: tuple[torch.Tensor, torch.Tensor]

    def at(self, rank: int) -> OutputAwareFit:
        """The fit at the rank decided (its ``svd`` left out: the caller has the triplets)."""
        return OutputAwareFit(self.svd, "whitened", rank, float(self.weight_errors[rank]),
                              float(self.output_errors[rank]), float(self.plain_output_errors[rank]),
                              (float(self.heldout_errors[0][rank]), float(self.heldout_errors[1][rank])))


def _relative_curve(meter: ErrorMeter, fit: TruncatedSVD | WhitenedSVD) -> torch.Tensor:
    """√(error at r / error at 0) for r = 0..k; zeros for a ΔW the inputs do not see."""
    curve = meter.curve(fit.u, fit.s, fit.vh)
    return (curve / meter.total).clamp(max=1.0).sqrt() if meter.total > 0 else torch.zeros_like(curve)


def output_aware_fit(delta: torch.Tensor, moment: torch.Tensor, halves: tuple[torch.Tensor, torch.Tensor],
                     compute_rank: int, choose: Callable[[torch.Tensor, float], int | None],
                     svd: Callable[[torch.Tensor, int], TruncatedSVD],
                     damping: float = DEFAULT_DAMPING, output_moment: torch.Tensor | None = None,
                     output_halves: tuple[torch.Tensor, torch.Tensor] | None = None) -> OutputAwareFit:
    """Fit ΔW for E‖Rᵀ(ΔW − BA)x‖² over the calibration inputs (R·Rᵀ = G, the output moment, or I), falling back
    to the plain SVD where the held-out check (see :class:`OutputAwareFit`) says whitening would be worse at the
    rank chosen.

    Args:
        delta: ΔW, (out, in) fp32 on the math device.
        moment: E[xxᵀ] over all calibration inputs, (in, in) or (in,) diagonal.
        halves: E[xxᵀ] over each half of the calibration sequences (fit on the first, check on the second).
        compute_rank: how many whitened triplets to compute (at most min(out, in)).
        choose: the rank, from the whitened (output) singular values and the total output energy; None to leave
            it to a later allocation (then every rank's errors are returned, see :class:`DeferredOutputAwareFit`).
        svd: the truncated SVD to run, as for :func:`whitened_svd`.
        damping: λ of :func:`whitening`, for both moments.
        output_moment: G = E[ggᵀ] of the gradients at the module's output, (out, out) or (out,) diagonal; None
            to weigh every output direction alike.
        output_halves: G over each half, as ``halves`` (needed with ``output_moment``).

    Returns:
        The :class:`OutputAwareFit`, or the :class:`DeferredOutputAwareFit` when ``choose`` gives None.
    """
    def output_root(g: torch.Tensor | None) -> Whitening | None:
        return None if g is None else whitening(g, damping)

    fit_out, check_out = output_halves if output_moment is not None else (None, None)
    whitened = whitened_svd(delta, whitening(moment, damping), compute_rank, svd, output_root(output_moment))
    chosen = choose(whitened.s, whitened.total_energy)
    rank = whitened.rank if chosen is None else min(max(1, chosen), whitened.rank)
    plain = svd(delta, rank)
    fit_half, check_half = halves
    trial = whitened_svd(delta, whitening(fit_half, damping), rank, svd, output_root(fit_out))
    check = ErrorMeter(delta, check_half, check_out)
    if chosen is None:
        meter = ErrorMeter(delta, moment, output_moment)
        weight = (whitened.weight_errors / whitened.weight_energy).clamp(max=1.0).sqrt() \
            if whitened.weight_energy > 0 else torch.zeros_like(whitened.weight_errors)
        return DeferredOutputAwareFit(whitened, weight, _relative_curve(meter, whitened), _relative_curve(meter, plain),
                                      (_relative_curve(check, trial), _relative_curve(check, plain)))
    heldout = (check.relative(trial.u, trial.s, trial.vh, rank), check.relative(plain.u, plain.s, plain.vh, rank))
    del trial, check
    meter = ErrorMeter(delta, moment, output_moment)
    plain_output = meter.relative(plain.u, plain.s, plain.vh, rank)
    if heldout[0] >= heldout[1]:
        return OutputAwareFit(plain, "plain", rank, plain.relative_error(rank), plain_output, plain_output, heldout)
    return OutputAwareFit(whitened, "whitened", rank, whitened.weight_relative_error(rank),
                          meter.relative(whitened.u, whitened.s, whitened.vh, rank), plain_output, heldout)
