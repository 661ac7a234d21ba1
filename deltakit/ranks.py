"""Rank policies: how many singular triplets each module keeps.

A policy answers two questions per module: how many leading triplets to compute (``compute_rank``), and,
given their singular values and the module's exact total energy ‖ΔW‖², how many to keep (``choose``).
Each policy has its own name; none changes meaning with the type of its argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import InvalidOptionError
from .layers import ModuleName, matches_peft_pattern


class RankPolicy(Protocol):
    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int: ...

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float) -> int: ...


@dataclass(frozen=True)
class FixedRank:
    """The same rank everywhere (clamped to min(out, in) by the caller, which reports it)."""

    rank: int

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise InvalidOptionError(f"rank must be at least 1, got {self.rank}")

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        return self.rank

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float) -> int:
        return min(self.rank, len(s))


@dataclass(frozen=True)
class EnergyRank:
    """The smallest rank whose triplets hold at least ``fraction`` of ‖ΔW‖², capped at ``max_rank``."""

    fraction: float
    max_rank: int

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise InvalidOptionError(f"energy fraction must be in (0, 1], got {self.fraction}")
        if self.max_rank < 1:
            raise InvalidOptionError(f"max rank must be at least 1, got {self.max_rank}")

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        return self.max_rank

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float) -> int:
        return rank_for_energy(s, total_energy, self.fraction)


def rank_for_energy(s: torch.Tensor, total_energy: float, fraction: float) -> int:
    """Smallest k with Σ_{i≤k} s_i² ≥ fraction · total_energy; len(s) if the computed triplets fall short."""
    if total_energy <= 0.0 or len(s) == 0:
        return min(1, len(s))
    kept = torch.cumsum(s.double() ** 2, dim=0)
    # A tiny tolerance so that fraction = 1.0 is reachable despite rounding in the cumulative sum.
    reached = torch.nonzero(kept >= fraction * total_energy * (1.0 - 1e-9))
    return int(reached[0]) + 1 if len(reached) else len(s)


@dataclass(frozen=True)
class PatternRanks:
    """Per-module overrides, matched with PEFT's own rule for ``rank_pattern`` keys (the first match wins),
    falling back to ``default``."""

    patterns: tuple[tuple[str, int], ...]
    default: RankPolicy = field(default_factory=lambda: FixedRank(16))

    def __post_init__(self) -> None:
        for pattern, rank in self.patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidOptionError(f"rank pattern {pattern!r} is not a valid regex: {e}") from e
            if rank < 1:
                raise InvalidOptionError(f"rank pattern {pattern!r}: rank must be at least 1, got {rank}")

    def _override(self, module: ModuleName) -> int | None:
        for pattern, rank in self.patterns:
            if matches_peft_pattern(pattern, module):
                return rank
        return None

    def compute_rank(self, module: ModuleName, out_in: tuple[int, int]) -> int:
        rank = self._override(module)
        return rank if rank is not None else self.default.compute_rank(module, out_in)

    def choose(self, module: ModuleName, s: torch.Tensor, total_energy: float) -> int:
        rank = self._override(module)
        return min(rank, len(s)) if rank is not None else self.default.choose(module, s, total_energy)


def parse_rank_pattern(text: str) -> tuple[str, int]:
    """``'REGEX=R'`` → ``(REGEX, R)``; the last ``=`` splits, so the regex may contain ``=``."""
    pattern, sep, rank = text.rpartition("=")
    if not sep or not pattern or not rank.strip().isdigit():
        raise InvalidOptionError(f"rank pattern {text!r} must look like REGEX=RANK, e.g. 'mlp\\..*=32'")
    return pattern, int(rank)
