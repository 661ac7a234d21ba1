"""PNG plots of an :class:`~deltakit.inspect_delta.InspectReport`, with matplotlib (the optional ``plot`` extra).

matplotlib is imported only when plots are drawn, so deltakit runs without it. Figures are built with the
object-oriented API (``matplotlib.figure.Figure``, the Agg canvas), never ``pyplot``: no global state and no GUI
backend is touched in the caller's process.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltakit.ops.inspect import InspectReport

SKIPPED_NOTE = "plots skipped: matplotlib is not installed (pip install 'deltakit[plot]')"
ENERGY_PLOT = "energy_by_module_type.png"
HEATMAP_PLOT = "relative_change_heatmap.png"
FRONTIER_PLOT = "size_error_frontier.png"


def is_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(report: InspectReport, out_dir: Path) -> list[Path]:
    """Draw the report's plots into ``out_dir``.

    - ``energy_by_module_type.png``: energy of ΔW retained against rank, one panel per module type (the last
      name component: q_proj, k_proj, ...), one curve per module, coloured by layer;
    - ``relative_change_heatmap.png``: ‖ΔW‖/‖W0‖ per layer (rows) and module type (columns), for modules with a
      layer index (drawn only when some module has one);
    - ``size_error_frontier.png``: total relative error of ΔW against adapter size, uniform rank vs budget
      allocation (drawn only when the report has a frontier).

    Args:
        report: what :func:`deltakit.inspect_delta.inspect` returned.
        out_dir: an existing directory.

    Returns:
        The files written.

    Raises:
        ImportError: matplotlib is not installed (check :func:`is_available` first).
    """
    from matplotlib.figure import Figure

    written = [_energy_by_type(Figure, report, out_dir / ENERGY_PLOT)]
    if any(m.layer is not None for m in report.modules):
        written.append(_relative_change_heatmap(Figure, report, out_dir / HEATMAP_PLOT))
    if report.frontier:
        written.append(_frontier(Figure, report, out_dir / FRONTIER_PLOT))
    return written


def _energy_by_type(figure_class: type, report: InspectReport, path: Path) -> Path:
    from matplotlib import colormaps

    by_type: dict[str, list] = {}
    for module in report.modules:
        by_type.setdefault(module.module_type, []).append(module)
    columns = min(4, len(by_type))
    rows = math.ceil(len(by_type) / columns)
    figure = figure_class(figsize=(4 * columns, 3.2 * rows), layout="constrained")
    layers = [m.layer for m in report.modules if m.layer is not None]
    top_layer = max(layers, default=0)
    colormap = colormaps["viridis"]
    for index, (module_type, modules) in enumerate(by_type.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        for module in modules:
            energies = [v * v for v in module.singular_values]
            total = module.delta_norm**2
            retained, running = [], 0.0
            for energy in energies:
                running += energy
                retained.append(min(running / total, 1.0) if total > 0 else 1.0)
            shade = (module.layer or 0) / top_layer if top_layer else 0.5
            axes.plot(range(1, len(retained) + 1), retained, color=colormap(shade), linewidth=1)
        axes.axhline(0.9, color="grey", linestyle=":", linewidth=0.8)
        axes.set_xscale("log", base=2)
        axes.set_ylim(0, 1.02)
        axes.set_title(f"{module_type} ({len(modules)})", fontsize=10)
        axes.set_xlabel("rank")
        axes.set_ylabel("energy of ΔW retained")
        axes.grid(True, alpha=0.3)
    figure.suptitle("Energy retained against rank (colour: layer, dark = first)")
    figure.savefig(path, dpi=100)
    return path


def _relative_change_heatmap(figure_class: type, report: InspectReport, path: Path) -> Path:
    layered = [m for m in report.modules if m.layer is not None]
    layers = sorted({m.layer for m in layered})
    types = list(dict.fromkeys(m.module_type for m in layered))
    grid = [[math.nan] * len(types) for _ in layers]
    for module in layered:
        grid[layers.index(module.layer)][types.index(module.module_type)] = module.relative_change
    figure = figure_class(figsize=(1.2 + 0.9 * len(types), 1.5 + 0.3 * len(layers)), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    axes.set_xticks(range(len(types)), types, rotation=45, ha="right")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    axes.set_title("Relative change ‖ΔW‖ / ‖W0‖")
    figure.colorbar(image, ax=axes)
    figure.savefig(path, dpi=100)
    return path


def _frontier(figure_class: type, report: InspectReport, path: Path) -> Path:
    from matplotlib.ticker import NullFormatter

    figure = figure_class(figsize=(6, 4.2), layout="constrained")
    axes = figure.add_subplot()
    params = [p.params for p in report.frontier]
    axes.plot(params, [p.uniform_relative_error for p in report.frontier], "o-", label="uniform rank")
    axes.plot(params, [p.budget_relative_error for p in report.frontier], "s-", label="budget allocation")
    for point in report.frontier:
        axes.annotate(f"r={point.rank}", (point.params, point.uniform_relative_error), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    axes.set_xscale("log")
    axes.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on a short log axis
    axes.set_xlabel("adapter parameters (factors)")
    axes.set_ylabel("relative error of ΔW, all modules")
    axes.set_title("Size / error frontier")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)
    return path
