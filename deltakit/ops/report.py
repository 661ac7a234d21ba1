"""What an operation did: numbers for the JSON reports, the printed summaries and the model card.

Extract's report is built module by module; merge and unmerge share :class:`MergeReport`. Keeps numbers and
names, never tensors.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict, dataclass, field

import json
from pathlib import Path

from deltakit.adapters.variants import LORA, AdapterVariant
from deltakit.io.fp8 import Requantization
from deltakit.names import ModuleName, TensorName

EXTRACT_REPORT_FILE = "extract_report.json"  # beside the adapter; merge reads the adapter's own error from it


@dataclass
class ModuleReport:
    module: ModuleName
    kind: str
    shape: tuple[int, ...]  # as stored in the checkpoint
    rank: int
    relative_error: float  # ‖ΔW − ΔW_r‖ / ‖ΔW‖
    energy_retained: float  # ‖ΔW_r‖² / ‖ΔW‖²
    delta_norm: float  # ‖ΔW‖
    seconds: float
    method: str
    note: str | None = None  # e.g. a clamped rank
    # ‖ΔW_stored − ΔW_r‖ / ‖ΔW‖: what storing the rank-r factors (rounding, 8-bit codes) adds to relative_error
    quantization_error: float | None = None
    # With --dora, relative_error is ‖W_ft − W_dora‖ / ‖ΔW‖; these are plain LoRA's on the same ΔW:
    lora_relative_error: float | None = None  # at the same rank
    lora_relative_error_same_params: float | None = None  # at rank + 1, at least DoRA's parameter count
    # With --calib: the fit kept ("whitened" or "plain"), its predicted output error √(E‖(ΔW − ΔW_r)x‖² / E‖ΔW x‖²)
    # over the calibration inputs, the plain SVD's at the same rank, and the held-out (whitened, plain) output
    # errors that chose between them:
    fit: str | None = None
    output_relative_error: float | None = None
    plain_output_relative_error: float | None = None
    heldout_output_relative_errors: list[float] | None = None


def _calibration_card(report: ExtractReport) -> list[str]:
    c = report.calibration
    lines = [
        "## Output-aware fit",
        "",
        "Each module's factors minimise its predicted output error E‖Rᵀ(ΔW − BA)x‖² over calibration inputs x, "
        "weighted by R·Rᵀ = E[ggᵀ], the gradients at the module's output of labels drawn from the model (Fisher "
        "weighting; left out for a tied embedding): the truncated SVD of Rᵀ·ΔW·L with L·Lᵀ = E[xxᵀ], both damped, "
        "mapped back; except where a held-out half of the calibration text predicted a lower error for the plain "
        "SVD of ΔW, which is then kept.",
        "",
        f"- calibration source: `{c['source']}` (sha256 `{c['sha256']}`), {c['tokens']:,} tokens in "
        f"{c['sequences']} sequences of {c['seq_len']}" + (f", sampled with seed {c['seed']}" if c.get("seed") is not
                                                          None else "")
        + (f" ({c['base_sequences']} of them from the base model)" if c.get("base_sequences") else ""),
        f"- inputs (and output gradients) taken from the {c['activations']} model; damping {c['damping']:g}",
        f"- summary: {calibration_text(report)}",
        "",
        "| module | rank | fit | relative error of ΔW | predicted output error | plain SVD's output error |",
        "|---|---|---|---|---|---|",
    ]
    for m in report.modules:
        output = f"{m.output_relative_error:.4f}" if m.output_relative_error is not None else "–"
        plain = f"{m.plain_output_relative_error:.4f}" if m.plain_output_relative_error is not None else "–"
        lines.append(f"| `{m.module}` | {m.rank} | {m.fit or 'plain'} | {m.relative_error:.4f} | {output} | {plain} |")
    return lines + [""]


@dataclass
class TensorFate:
    """A tensor that was not factorized, and why: carried exactly, dropped, or only present on one side."""

    tensor: TensorName
    fate: str  # "carried", "folded" (a norm's scale, into the Linear layers reading it), "dropped", "only-in-base"
    reason: str
    # Of a dropped or folded tensor, what leaving it out costs: ‖t_ft − t_base‖, and that over ‖t_base‖ (None for
    # a zero base, e.g. a bias initialised to 0, or where the shapes differ).
    change_norm: float | None = None
    relative_change: float | None = None

    def describe(self) -> str:
        if self.relative_change is not None:
            return f"{self.reason} (relative change {self.relative_change:.3g})"
        if self.change_norm is not None:
            return f"{self.reason} (‖Δ‖ = {self.change_norm:.3g}; the base is 0)"
        return self.reason


@dataclass
class ExtractReport:
    finetuned: str
    base: str  # a local path, or a bare Hub repo id (what PEFT's base_model_name_or_path wants)
    out: str
    options: dict
    finetuned_revision: str | None = None  # the Hub commit an input was fetched at; None for a local path
    base_revision: str | None = None
    modules: list[ModuleReport] = field(default_factory=list)
    tensors: list[TensorFate] = field(default_factory=list)
    unchanged: int = 0  # tensors identical in both checkpoints
    adapter_bytes: int = 0
    seconds: float = 0.0
    command: str = ""
    notes: list[str] = field(default_factory=list)
    budget: dict | None = None  # under --budget/--avg-rank: asked, allowed, used, predicted error
    experts: list[dict] | None = None  # mixture-of-experts layers: which experts changed, per-expert error
    variant: AdapterVariant = LORA  # what kind of adapter was written (not in the JSON: its options say)
    calibration: dict | None = None  # with --calib: the source, its sha256, the tokens, whose activations

    def fates(self, fate: str) -> list[TensorFate]:
        return [t for t in self.tensors if t.fate == fate]

    def error_summary(self) -> dict:
        """Mean and worst relative error, and energy retained over all modules (weighted by ‖ΔW‖²)."""
        if not self.modules:
            return {"mean_relative_error": 0.0, "max_relative_error": 0.0, "energy_retained": 1.0}
        total = sum(m.delta_norm**2 for m in self.modules)
        kept = sum(m.delta_norm**2 * m.energy_retained for m in self.modules)
        worst = max(self.modules, key=lambda m: m.relative_error)
        summary = {
            "mean_relative_error": sum(m.relative_error for m in self.modules) / len(self.modules),
            "max_relative_error": worst.relative_error,
            "max_relative_error_module": worst.module,
            "energy_retained": kept / total if total > 0 else 1.0,
        }
        stored = [m for m in self.modules if m.quantization_error is not None]
        if stored and total > 0:
            # ‖ΔW‖-weighted totals, as the budget's predicted error: ‖Σ errors‖ / ‖Σ ΔW‖ over all modules.
            summary["total_truncation_error"] = (sum((m.relative_error * m.delta_norm) ** 2 for m in stored)
                                                 / total) ** 0.5
            summary["total_quantization_error"] = (sum((m.quantization_error * m.delta_norm) ** 2 for m in stored)
                                                   / total) ** 0.5
        compared = [m for m in self.modules if m.lora_relative_error is not None]
        if compared:
            # Totals as ‖Σ errors‖ / ‖Σ ΔW‖ over all modules, so large modules weigh in proportion.
            def total_error(errors: list[float]) -> float:
                squared = sum((e * m.delta_norm) ** 2 for e, m in zip(errors, compared))
                return (squared / total) ** 0.5 if total > 0 else 0.0

            summary["total_relative_error"] = total_error([m.relative_error for m in compared])
            summary["lora_total_relative_error_same_rank"] = total_error([m.lora_relative_error for m in compared])
            summary["lora_total_relative_error_same_params"] = total_error(
                [m.lora_relative_error_same_params for m in compared])
            summary["modules_where_dora_beats_lora_same_rank"] = sum(
                m.relative_error < m.lora_relative_error for m in compared)
        return summary

    def factor_storage(self) -> str:
        """How the factors are stored, in words."""
        compact = self.options.get("factor_dtype")
        if compact in ("int8", "float8_e4m3fn"):
            return f"{compact}, one scale per factor in alpha_pattern"
        return self.options.get("dtype") or "the base's dtype"

    def to_json(self) -> dict:
        return {
            "finetuned": self.finetuned,
            "finetuned_revision": self.finetuned_revision,
            "base": self.base,
            "base_revision": self.base_revision,
            "out": self.out,
            "command": self.command,
            "options": self.options,
            "summary": {
                "modules_factorized": len(self.modules),
                "ranks": sorted({m.rank for m in self.modules}),
                "adapter_bytes": self.adapter_bytes,
                "tensors_unchanged": self.unchanged,
                "tensors_carried": len(self.fates("carried")),
                "tensors_folded": len(self.fates("folded")),
                "tensors_dropped": len(self.fates("dropped")),
                "tensors_only_in_base": len(self.fates("only-in-base")),
                "seconds": round(self.seconds, 3),
                **self.error_summary(),
            },
            "budget": self.budget,
            "calibration": self.calibration,
            "experts": self.experts,
            "notes": self.notes,
            "modules": [asdict(m) for m in self.modules],
            "tensors": [asdict(t) for t in self.tensors],
        }

    def summary_lines(self) -> list[str]:
        """The human summary the CLI prints after a run."""
        s = self.error_summary()
        ranks = sorted({m.rank for m in self.modules})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]} (per module)" if ranks else "–"
        lines = [
            f"wrote {self.out}",
            f"  modules factorized : {len(self.modules)}  rank {rank_text}",
            f"  adapter size       : {format_bytes(self.adapter_bytes)}",
            *([f"  budget             : {budget_text(self.budget)}"] if self.budget else []),
            *([f"  calibrated fit     : {calibration_text(self)}"] if self.calibration else []),
            f"  relative error     : mean {s['mean_relative_error']:.4f}, worst {s['max_relative_error']:.4f}"
            + (f" ({s['max_relative_error_module']})" if self.modules else ""),
            f"  energy retained    : {s['energy_retained']:.4f}",
            *([f"  storage error      : {s['total_quantization_error']:.4f} of ΔW ({self.factor_storage()}) beside "
               f"{s['total_truncation_error']:.4f} from truncation"] if "total_quantization_error" in s else []),
            *([f"  DoRA vs LoRA       : total error {s['total_relative_error']:.4f} vs "
               f"{s['lora_total_relative_error_same_rank']:.4f} (same rank), "
               f"{s['lora_total_relative_error_same_params']:.4f} (rank + 1, ≥ same parameters); DoRA better on "
               f"{s['modules_where_dora_beats_lora_same_rank']}/{len(self.modules)} modules"]
              if "total_relative_error" in s else []),
            f"  unchanged tensors  : {self.unchanged}",
            f"  wall time          : {self.seconds:.1f} s",
            *[f"  experts            : {line}" for line in experts_lines(self.experts or [])],
        ]
        for fate, label in (("carried", "carried exactly"), ("folded", "folded into Linear"), ("dropped", "DROPPED"),
                            ("only-in-base", "only in base")):
            items = self.fates(fate)
            if items:
                lines.append(f"  {label:<19}: {len(items)}")
                lines += [f"    {t.tensor}: {t.describe()}" for t in items[:10]]
                if len(items) > 10:
                    lines.append(f"    ... {len(items) - 10} more in extract_report.json")
        noted = [m for m in self.modules if m.note]
        lines += [f"  note: {m.module}: {m.note}" for m in noted[:10]]
        if len(noted) > 10:
            lines.append(f"  note: ... {len(noted) - 10} more modules with notes in extract_report.json")
        lines += [f"  note: {n}" for n in self.notes]
        return lines


def experts_lines(experts: list[dict]) -> list[str]:
    """One line per MoE layer: the experts that changed (with their worst relative error) and those that did not."""
    lines = []
    for layer in experts:
        errors = ", ".join(f"{e} ({err:.2g})" for e, err in layer["max_relative_error"].items())
        lines.append(f"{layer['block']}: changed {len(layer['changed'])}/{layer['experts']} [{errors}]; unchanged "
                     f"{layer['unchanged'] or 'none'}" + ("; router changed" if layer["router_changed"] else ""))
    return lines


def own_error(adapter_dir: Path) -> float | None:
    """An adapter's worst relative error of ΔW, from the report extract wrote beside it (None if there is none)."""
    try:
        report = json.loads((Path(adapter_dir) / EXTRACT_REPORT_FILE).read_text(encoding="utf-8"))
        return float(report["summary"]["max_relative_error"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def budget_text(budget: dict) -> str:
    """One line: what was asked, what it allows, what was used, and the error the allocation predicts."""
    text = (f"{budget['requested']} = {budget['params']:,} factor parameters, {budget['params_used']:,} used "
            f"({budget['weighting']} error, ranks {budget['min_rank']}–{budget['max_rank']}); predicted total "
            f"relative error {budget['predicted_relative_error']:.4f}")
    if budget.get("carried_whole"):
        text += f"; {budget['carried_whole']} module(s) carried whole, cheaper than their factors"
    if budget.get("file_bytes") is not None:
        text += (f"; the file's {format_bytes(budget['file_bytes'])} hold {format_bytes(budget['carried_bytes'])} of "
                 f"tensors carried exactly and a {format_bytes(budget['header_bytes'])} header")
    return text


def calibration_text(report: ExtractReport) -> str:
    """One line: how many modules were whitened, and the output error predicted against plain SVD's."""
    fitted = [m for m in report.modules if m.output_relative_error is not None]
    whitened = sum(m.fit == "whitened" for m in fitted)
    total = sum(m.delta_norm**2 for m in fitted)

    def mean(errors: list[float]) -> float:  # weighted by ‖ΔW‖², like the energy retained
        return sum(e * m.delta_norm**2 for e, m in zip(errors, fitted)) / total if total > 0 else 0.0

    c = report.calibration
    return (f"{whitened}/{len(report.modules)} modules whitened on {c['tokens']:,} tokens of {c['source']} "
            f"(sha256 {c['sha256'][:12]}); predicted output error {mean([m.output_relative_error for m in fitted]):.4f} "
            f"vs plain SVD {mean([m.plain_output_relative_error for m in fitted]):.4f}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def command_line() -> str:
    return shlex.join(["deltakit", *sys.argv[1:]]) if sys.argv and "deltakit" in sys.argv[0] else ""


def _at(revision: str | None) -> str:
    return f" (Hub commit `{revision}`)" if revision else ""


# vllm/config/lora.py: max_lora_rank is one of these (MaxLoRARanks).
_VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _vllm_max_lora_rank(rank: int) -> int | str:
    return next((r for r in _VLLM_MAX_LORA_RANKS if r >= rank), f"{rank} (above vLLM's largest, 512)")


def model_card(report: ExtractReport) -> str:
    """A README.md for the adapter: how it was made and how well it reproduces the fine-tune."""
    s = report.error_summary()
    ranks = sorted({m.rank for m in report.modules})
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {report.base}",
        f"tags: [{', '.join(('deltakit', *report.variant.card_tags))}]",
        "---",
        "",
        f"# {report.variant.label} adapter extracted with deltakit",
        "",
        f"Extracted from the fully fine-tuned `{report.finetuned}`{_at(report.finetuned_revision)} against its base "
        f"`{report.base}`{_at(report.base_revision)}: ΔW = W_ft − W_base, truncated with SVD.",
        "",
        "| | |",
        "|---|---|",
        f"| modules factorized | {len(report.modules)} |",
        f"| rank | {', '.join(map(str, ranks)) or '–'} |",
        f"| adapter size | {format_bytes(report.adapter_bytes)} |",
        *([f"| budget | {budget_text(report.budget)} |"] if report.budget else []),
        f"| mean relative error of ΔW | {s['mean_relative_error']:.4f} |",
        f"| worst relative error of ΔW | {s['max_relative_error']:.4f} |",
        f"| energy of ΔW retained | {s['energy_retained']:.4f} |",
        *([f"| factors stored as | {report.factor_storage()} |",
           f"| error of ΔW from truncation / from storage | {s['total_truncation_error']:.4f} / "
           f"{s['total_quantization_error']:.4f} |"] if "total_quantization_error" in s else []),
        f"| tensors carried exactly | {len(report.fates('carried'))} |",
        *([f"| norms folded into Linear layers | {len(report.fates('folded'))} |"] if report.fates("folded") else []),
        f"| tensors dropped | {len(report.fates('dropped'))} |",
        "",
    ]
    if report.command:
        lines += ["Command:", "", "```", report.command, "```", ""]
    lines += [
        "Load it with PEFT:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f"base = AutoModelForCausalLM.from_pretrained({report.base!r}"
        + (f", revision={report.base_revision!r})" if report.base_revision else ")"),
        f"model = PeftModel.from_pretrained(base, {report.out!r})",
        "```",
        "",
    ]
    if report.options.get("target") == "vllm":
        lines += [
            "Written for vLLM (`--for vllm`: no modules_to_save, no biases, one scaling for every module). Serve it "
            "with a `--max-lora-rank` of at least the config's `r` (vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320, 512):",
            "",
            "```",
            f"vllm serve {report.base} --enable-lora --lora-modules adapter={report.out} --max-lora-rank "
            f"{_vllm_max_lora_rank(max(ranks, default=1))}",
            "```",
            "",
        ]
    if report.fates("folded"):
        lines += ["Norms whose scale change is folded into the Linear layers reading them (exact at full rank):", ""]
        lines += [f"- `{t.tensor}`: {t.describe()}" for t in report.fates("folded")]
        lines.append("")
    if report.fates("dropped"):
        lines += ["Dropped tensors (not in the adapter; the relative change is what leaving each out costs):", ""]
        lines += [f"- `{t.tensor}`: {t.describe()}" for t in report.fates("dropped")]
        lines.append("")
    if report.calibration:
        lines += _calibration_card(report)
    lines += [f"Note: {n}" for n in report.notes]
    if report.experts:
        lines += ["", "Mixture-of-experts layers (changed experts with their worst relative error of ΔW):", ""]
        lines += [f"- {line}" for line in experts_lines(report.experts)]
        lines.append("")
    lines.append("Per-module ranks and errors are in `extract_report.json`.")
    return "\n".join(lines) + "\n"


@dataclass
class TensorChange:
    """A tensor the operation changes, and how: ``steps`` lists (adapter number from 1, op) in application order."""

    tensor: TensorName
    steps: list[tuple[int, str]]

    def describe(self) -> str:
        return " then ".join(f"{op} #{k}" for k, op in self.steps)


@dataclass
class MergeReport:
    """What a merge or unmerge did (or, with ``dry_run``, would do)."""

    operation: str  # "merge" or "unmerge"
    base: str  # the checkpoint read: the base for merge, the merged checkpoint for unmerge
    adapters: list[str]
    weights: list[float]
    out: str
    dry_run: bool = False
    changed: list[TensorChange] = field(default_factory=list)
    unchanged: int = 0  # tensors copied byte for byte (or only cast with ``dtype``)
    weight_files: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)  # copied as they are
    skipped_files: list[str] = field(default_factory=list)  # beside the weights but not copied, with the reason
    receipt: str = ""  # what happened to the receipt
    bytes_written: int = 0
    seconds: float = 0.0
    command: str = ""
    notes: list[str] = field(default_factory=list)
    requantized: list[Requantization] = field(default_factory=list)  # FP8 weights stored as FP8 again
    adapter_errors: list[float | None] = field(default_factory=list)  # each adapter's own worst error, if known

    def to_json(self) -> dict:
        data = asdict(self)
        data["changed"] = [{"tensor": c.tensor, "steps": [list(s) for s in c.steps]} for c in self.changed]
        return data

    def summary_lines(self) -> list[str]:
        """The human summary the CLI prints."""
        ops: dict[str, int] = {}
        for change in self.changed:
            for _, op in change.steps:
                ops[op] = ops.get(op, 0) + 1
        verb = "would write" if self.dry_run else "wrote"
        lines = [f"{verb} {self.out}"]
        lines += [f"  adapter #{i + 1}         : {a} (weight {w:g})"
                  for i, (a, w) in enumerate(zip(self.adapters, self.weights))]
        lines.append(f"  tensors changed    : {len(self.changed)}"
                     + (f" ({', '.join(f'{op} {n}' for op, n in sorted(ops.items()))})" if ops else ""))
        lines.append(f"  tensors unchanged  : {self.unchanged}")
        lines.append(f"  weight files       : {len(self.weight_files)}; other files copied: {len(self.other_files)}")
        if self.receipt:
            lines.append(f"  receipt            : {self.receipt}")
        if self.dry_run:
            lines += [f"    {c.tensor}: {c.describe()}" for c in self.changed[:20]]
            if len(self.changed) > 20:
                lines.append(f"    ... {len(self.changed) - 20} more")
        else:
            rate = self.bytes_written / self.seconds if self.seconds > 0 else 0.0
            lines.append(f"  written            : {format_bytes(self.bytes_written)} in {self.seconds:.1f} s "
                         f"({format_bytes(rate)}/s)")
        if self.requantized:
            worst = max(self.requantized, key=lambda r: r.relative_to_delta)
            own = [e for e in self.adapter_errors if e is not None]
            lines.append(f"  FP8 requantized    : {len(self.requantized)} weight(s); error ‖Q(W')−W'‖ worst "
                         f"{worst.relative_to_delta:.4f} of ‖ΔW‖ ({worst.tensor}), "
                         f"{max(r.relative_to_weight for r in self.requantized):.4f} of ‖W'‖"
                         + (f"; the adapter's own error (extract report): worst {max(own):.4f} of ‖ΔW‖" if own else ""))
        lines += [f"  skipped: {s}" for s in self.skipped_files]
        lines += [f"  note: {n}" for n in self.notes]
        return lines
