"""Adapter quality per byte and per rank: how close does base + adapter behave to the full fine-tune?

Every peer stores each module's truncated SVD of ΔW at one rank, in the checkpoint's dtype ("plain SVD" here).
This benchmark scores that against deltakit's other routes on the model's *behaviour*: for each route and size,
the adapter is extracted with ``deltakit.extract``, merged into the base with ``deltakit.merge`` (in float32, so
only the adapter's error is measured), and compared with the fine-tune on held-out text by
- KL(ft ‖ adapted) of the next-token distributions, averaged over every position, and
- top-1 agreement: the share of positions where both models predict the same next token,
on held-out text of the fine-tune's domain and of the base's domain (neither seen in training, nor given to any
route as calibration text).

Two sizes of comparison:
- equal bytes: every route gets the bytes of the plain SVD adapter of rank R (its tensors: factors plus carried
  tensors), and spends them its own way (a higher rank at 8 bits, a budget allocation, ...);
- equal rank: every route at rank R (an allocation at the parameter count of uniform rank R).

The pairs (made on the fly, cached under ``benchmarks/_work/``): a byte-level BPE tokenizer trained on the text
below; causal LMs pretrained on Python source code from one half of the local Python install's standard library
(the *base*), then every parameter fine-tuned on the docstrings of the other half (the *fine-tune*):
- ``llama-bf16``: a Llama-shaped model (transformers ``LlamaForCausalLM``, grouped-query attention, untied head),
  stored in bfloat16;
- ``gpt2-fp32``: a GPT-2-shaped model (``GPT2LMHeadModel``: Conv1D layers, tied head), stored in float32.

Routes are functions (pair, size, out_dir) → adapter directory, listed in ``ROUTES``; a new route is one more
entry, evaluated the same way. ``Pair.calib_text`` is fine-tune-domain text disjoint from the held-out text,
for routes that calibrate on data: ``calib-text`` calibrates on it, ``calib-self`` on sequences sampled from the
models (``--calib self``); their factors take plain SVD's bytes at the same rank.

    python benchmarks/bench_quality.py [--pairs llama-bf16 gpt2-fp32] [--bytes-ranks 4 16] [--ranks 4 16 32]
                                       [--routes NAME ...] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import shutil
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deltakit  # noqa: E402
from deltakit.io.checkpoint import open_checkpoint  # noqa: E402

WORKDIR = Path(__file__).resolve().parent / "_work"
SEQ_LEN = 64
VOCAB = 512
EVAL_SEQUENCES = 48  # per domain
# Bump when the data, models or training change, so that cached pairs are rebuilt.
_PAIR_VERSION = 1


# --- text and tokenizer ------------------------------------------------------------------------------------------


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    docs = [ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(d for d in docs if d)


def _source(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


@dataclass(frozen=True)
class Corpus:
    """Texts by role. The base's domain is source code of the even-numbered stdlib files, the fine-tune's the
    docstrings of the odd-numbered ones; within each, whole files are held out for evaluation (and, for the
    fine-tune's domain, for calibration), so no held-out line was trained on or calibrated with."""

    base_train: str
    base_heldout: str
    ft_train: str
    ft_calib: str
    ft_heldout: str


def make_corpus(base_chars: int = 2_000_000) -> Corpus:
    files = _stdlib_files()
    code, docs = files[0::2], files[1::2]
    base_train = "".join(_source(p) for i, p in enumerate(code) if i % 10)[:base_chars]
    base_heldout = "".join(_source(p) for i, p in enumerate(code) if i % 10 == 0)
    ft = {0: [], 1: [], 2: []}  # train, calib, heldout
    for i, p in enumerate(docs):
        ft[2 if i % 8 == 0 else 1 if i % 8 == 4 else 0].append(_docstrings(p))
    return Corpus(base_train, base_heldout, "\n\n".join(ft[0]), "\n\n".join(ft[1]), "\n\n".join(ft[2]))


def make_tokenizer(corpus: Corpus, out_dir: Path):
    """A byte-level BPE of VOCAB tokens trained on both training texts, saved as a transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([corpus.base_train, corpus.ft_train], vocab_size=VOCAB, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _tokens(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def _windows(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` evenly spaced, non-overlapping windows of SEQ_LEN tokens."""
    starts = torch.linspace(0, len(tokens) - SEQ_LEN - 1, count).long()
    return torch.stack([tokens[s: s + SEQ_LEN] for s in starts.tolist()])


# --- model pairs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRecipe:
    name: str
    make_config: Callable[[], object]
    dtype: torch.dtype  # what both checkpoints are stored in
    seed: int
    pretrain_steps: int = 300
    finetune_steps: int = 150


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_inner=256, n_positions=SEQ_LEN,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


RECIPES = {
    "llama-bf16": PairRecipe("llama-bf16", _llama_config, torch.bfloat16, seed=0),
    "gpt2-fp32": PairRecipe("gpt2-fp32", _gpt2_config, torch.float32, seed=1),
}


@dataclass(frozen=True)
class Pair:
    """A fine-tuned checkpoint, its base, and the text to evaluate (and calibrate) on."""

    name: str
    finetuned: Path
    base: Path
    dtype: torch.dtype
    heldout: dict[str, torch.Tensor]  # domain → (sequences, SEQ_LEN) token ids
    calib_text: Path  # fine-tune-domain text, disjoint from the held-out text


def _train(model: torch.nn.Module, tokens: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 20))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(len(tokens) - SEQ_LEN - 1, (8,), generator=gen)
        batch = torch.stack([tokens[s: s + SEQ_LEN] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()


def _save(model, tokenizer, ckpt_dir: Path, dtype: torch.dtype) -> None:
    model.to(dtype).save_pretrained(ckpt_dir)
    tokenizer.save_pretrained(ckpt_dir)
    model.float()


def make_pair(recipe: PairRecipe, workdir: Path, corpus: Corpus, tokenizer) -> None:
    """Pretrain on code (saved, rounded to the recipe's dtype, as the base), then fully fine-tune the stored base
    on docstrings (saved as the fine-tune)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(recipe.make_config(), dtype=torch.float32)
    _train(model, _tokens(tokenizer, corpus.base_train), recipe.pretrain_steps, lr=3e-3, seed=recipe.seed)
    _save(model, tokenizer, workdir / "base", recipe.dtype)
    model = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
    _train(model, _tokens(tokenizer, corpus.ft_train), recipe.finetune_steps, lr=1e-3, seed=recipe.seed + 100)
    _save(model, tokenizer, workdir / "finetuned", recipe.dtype)


def _cache_key(recipe: PairRecipe) -> str:
    text = json.dumps([_PAIR_VERSION, recipe.name, recipe.make_config().to_dict(), str(recipe.dtype), recipe.seed,
                       recipe.pretrain_steps, recipe.finetune_steps, sys.version_info[:2]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_pairs(names: list[str], workdir: Path) -> list[Pair]:
    """The named pairs, trained now unless a cached copy with the same recipe exists."""
    from transformers import PreTrainedTokenizerFast

    data_dir = workdir / f"data-v{_PAIR_VERSION}"
    corpus = None
    if not (data_dir / "tokenizer.json").is_file():
        corpus = make_corpus()
        tmp = workdir / "data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        make_tokenizer(corpus, tmp)
        for field in ("base_train", "base_heldout", "ft_train", "ft_calib", "ft_heldout"):
            (tmp / f"{field}.txt").write_text(getattr(corpus, field), encoding="utf-8")
        shutil.rmtree(data_dir, ignore_errors=True)
        tmp.rename(data_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(data_dir)
    heldout = {domain: _windows(_tokens(tokenizer, (data_dir / f"{field}.txt").read_text(encoding="utf-8")),
                                EVAL_SEQUENCES)
               for domain, field in (("ft domain", "ft_heldout"), ("base domain", "base_heldout"))}
    pairs = []
    for name in names:
        recipe = RECIPES[name]
        pair_dir = workdir / f"{name}-{_cache_key(recipe)}"
        if not (pair_dir / "finetuned" / "config.json").is_file():
            if corpus is None:
                corpus = Corpus(*((data_dir / f"{f}.txt").read_text(encoding="utf-8") for f in
                                  ("base_train", "base_heldout", "ft_train", "ft_calib", "ft_heldout")))
            started = time.perf_counter()
            tmp = workdir / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            make_pair(recipe, tmp, corpus, tokenizer)
            tmp.rename(pair_dir)
            print(f"{name}: trained base and fine-tune in {time.perf_counter() - started:.0f} s → {pair_dir}",
                  flush=True)
        pairs.append(Pair(name, pair_dir / "finetuned", pair_dir / "base", recipe.dtype, heldout,
                          data_dir / "ft_calib.txt"))
    return pairs


# --- routes ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """What a route may spend: ``rank`` (equal rank), or the tensor bytes of the plain SVD rank-``rank`` adapter
    (equal bytes: ``bytes`` is set)."""

    rank: int
    bytes: int | None = None

    def describe(self) -> str:
        return f"bytes of r={self.rank}" if self.bytes is not None else f"rank {self.rank}"


Route = Callable[[Pair, Size, Path], None]  # writes an adapter into the directory


def _dtype_bytes(factor_dtype: str | None, pair: Pair) -> int:
    return pair.dtype.itemsize if factor_dtype is None else {"int8": 1, "float8_e4m3fn": 1}.get(
        factor_dtype, getattr(torch, factor_dtype).itemsize)


def uniform(factor_dtype: str | None = None) -> Route:
    """One rank for every module; at equal bytes, the rank that the plain rank's bytes buy at this width."""
    def route(pair: Pair, size: Size, out_dir: Path) -> None:
        rank = size.rank
        if size.bytes is not None:
            rank = size.rank * pair.dtype.itemsize // _dtype_bytes(factor_dtype, pair)
        options = {"factor_dtype": factor_dtype} if factor_dtype else {}
        deltakit.extract(pair.finetuned, pair.base, out_dir, rank=rank, overwrite=True, **options)
    return route


def budget(weighting: str, factor_dtype: str | None = None) -> Route:
    """A global allocation: ``--budget <bytes>B`` at equal bytes, ``--avg-rank R`` at equal rank."""
    def route(pair: Pair, size: Size, out_dir: Path) -> None:
        options = {"budget": f"{size.bytes}B"} if size.bytes is not None else {"avg_rank": size.rank}
        if factor_dtype:
            options["factor_dtype"] = factor_dtype
        deltakit.extract(pair.finetuned, pair.base, out_dir, budget_weighting=weighting, overwrite=True,
                         max_rank=256, **options)
    return route


def calibrated(source: Callable[[Pair], str | Path], weighting: str | None = None) -> Route:
    """Output-aware fitting (``--calib``) calibrated on ``source(pair)``: at uniform rank (its factors take the
    bytes of plain SVD's at the same rank, so equal bytes is equal rank), or with ``weighting`` a budget allocation
    on the whitened spectra, as :func:`budget`."""
    def route(pair: Pair, size: Size, out_dir: Path) -> None:
        if weighting is None:
            options = {"rank": size.rank}
        else:
            options = {"budget": f"{size.bytes}B"} if size.bytes is not None else {"avg_rank": size.rank}
            options.update(budget_weighting=weighting, max_rank=256)
        deltakit.extract(pair.finetuned, pair.base, out_dir, calib=source(pair), overwrite=True, **options)
    return route


BASELINE = "plain SVD"
ROUTES: dict[str, Route] = {
    BASELINE: uniform(),
    "int8": uniform("int8"),
    "fp8": uniform("float8_e4m3fn"),
    "budget absolute": budget("absolute"),
    "budget relative": budget("relative"),
    "int8 + budget absolute": budget("absolute", "int8"),
    "int8 + budget relative": budget("relative", "int8"),
    "calib-self": calibrated(lambda pair: "self"),
    "calib-text": calibrated(lambda pair: pair.calib_text),
    "calib-self + budget absolute": calibrated(lambda pair: "self", "absolute"),
    "calib-self + budget relative": calibrated(lambda pair: "self", "relative"),
}


# --- evaluation --------------------------------------------------------------------------------------------------


def tensor_bytes(adapter_dir: Path) -> int:
    """Bytes of the tensors in the adapter file (its size without the JSON header)."""
    weights = open_checkpoint(adapter_dir / "adapter_model.safetensors")
    return sum(weights.info(name).nbytes for name in weights)


@torch.no_grad()
def _log_probs(ckpt_dir: Path, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32).eval()
    return {domain: torch.cat([F.log_softmax(model(input_ids=chunk).logits.double(), dim=-1)
                               for chunk in t.split(16)]) for domain, t in tokens.items()}


def _compare(reference: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per domain: (KL(ft ‖ adapted) per token, top-1 agreement)."""
    scores = {}
    for domain, ref in reference.items():
        kl = (ref.exp() * (ref - adapted[domain])).sum(-1).mean()
        agree = (ref.argmax(-1) == adapted[domain].argmax(-1)).double().mean()
        scores[domain] = (float(kl), float(agree))
    return scores


def _ranks(adapter_dir: Path) -> list[int]:
    report = json.loads((adapter_dir / "extract_report.json").read_text())
    return sorted(m["rank"] for m in report["modules"])


@dataclass
class Row:
    pair: str
    size: Size
    route: str
    ranks: list[int]
    bytes: int
    scores: dict[str, tuple[float, float]]


def evaluate(pair: Pair, routes: dict[str, Route], bytes_ranks: list[int], ranks: list[int],
             scratch: Path) -> list[Row]:
    reference = _log_probs(pair.finetuned, pair.heldout)
    rows = [Row(pair.name, Size(0), "base (no adapter)", [], 0, _compare(reference, _log_probs(pair.base, pair.heldout)))]
    sizes = []
    for rank in bytes_ranks:
        plain_dir = scratch / "plain"
        ROUTES[BASELINE](pair, Size(rank), plain_dir)
        sizes.append(Size(rank, tensor_bytes(plain_dir)))
    sizes += [Size(rank) for rank in ranks]
    for size in sizes:
        for name, route in routes.items():
            adapter_dir, merged_dir = scratch / "adapter", scratch / "merged"
            route(pair, size, adapter_dir)
            deltakit.merge(pair.base, [adapter_dir], merged_dir, dtype="float32", overwrite=True)
            scores = _compare(reference, _log_probs(merged_dir, pair.heldout))
            rows.append(Row(pair.name, size, name, _ranks(adapter_dir), tensor_bytes(adapter_dir), scores))
            print(f"  {pair.name:<10} {size.describe():<14} {name:<24} done", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[Row], domains: list[str]) -> None:
    baseline = {(r.pair, r.size): r for r in rows if r.route == BASELINE}
    head = f"{'pair':<10} {'size':<14} {'route':<24} {'ranks min/med/max':>17} {'bytes':>9}"
    for domain in domains:
        head += f" | {'KL ' + domain:>16} {'×plain':>7} {'top-1':>6}"
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and (r.pair, r.size) != last:
            print()
        last = (r.pair, r.size)
        ranks = f"{r.ranks[0]}/{statistics.median_low(r.ranks)}/{r.ranks[-1]}" if r.ranks else "-"
        line = f"{r.pair:<10} {r.size.describe() if r.ranks else '-':<14} {r.route:<24} {ranks:>17} {r.bytes:>9,}"
        ref = baseline.get((r.pair, r.size))
        for domain in domains:
            kl, agree = r.scores[domain]
            ratio = f"{kl / ref.scores[domain][0]:.3f}" if ref is not None and r.ranks else "-"
            line += f" | {kl:>16.4g} {ratio:>7} {agree:>6.3f}"
        print(line)


def _worst_ratio(rows: list[Row], route: str, domains: list[str], keep: Callable[[Size], bool]) -> float | None:
    """The largest KL(route) / KL(plain SVD) over the pairs, sizes (those ``keep`` accepts) and domains."""
    plain = {(r.pair, r.size): r for r in rows if r.route == BASELINE}
    ratios = [r.scores[d][0] / plain[(r.pair, r.size)].scores[d][0] for r in rows
              if r.route == route and keep(r.size) and (r.pair, r.size) in plain for d in domains]
    return max(ratios) if ratios else None


def print_targets(rows: list[Row], domains: list[str]) -> None:
    """The issue's checks: at the bytes of a rank-16 adapter, KL at most ¼ of plain SVD's on every pair; and
    which routes are never worse than plain SVD (uniform rank) at any size, on any pair (a default must be)."""
    routes = [r for r in dict.fromkeys(row.route for row in rows) if r not in (BASELINE, "base (no adapter)")]
    print("\ntarget: at the bytes of a rank-16 adapter, KL ≤ 0.25 × plain SVD's on every pair and domain")
    for route in routes:
        worst = _worst_ratio(rows, route, domains, lambda size: size.bytes is not None and size.rank == 16)
        if worst is not None:
            print(f"  {route:<24} worst ratio {worst:.3f}: {'met' if worst <= 0.25 else 'not met'}")
    print("\ntarget: at equal rank, calibrated fitting at least 25% lower KL than plain SVD at r=16 and r=32 on every "
          "pair and domain (and never worse, below)")
    for route in (r for r in routes if r.startswith("calib")):
        worst = _worst_ratio(rows, route, domains, lambda size: size.bytes is None and size.rank in (16, 32))
        if worst is not None:
            print(f"  {route:<24} worst ratio {worst:.3f}: {'met' if worst <= 0.75 else 'not met'}")
    print("\nnever worse than plain SVD at the same size (every pair, domain and size tried)")
    for route in routes:
        for label, keep in (("equal bytes", lambda size: size.bytes is not None),
                            ("equal rank", lambda size: size.bytes is None)):
            worst = _worst_ratio(rows, route, domains, keep)
            if worst is not None:
                print(f"  {route:<24} {label:<11} worst ratio {worst:.3f}: {'yes' if worst <= 1.0 else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--bytes-ranks", type=int, nargs="*", default=[4, 16],
                        help="equal-bytes comparisons at the size of a plain SVD adapter of these ranks")
    parser.add_argument("--ranks", type=int, nargs="*", default=[4, 16, 32], help="equal-rank comparisons")
    parser.add_argument("--routes", nargs="+", default=list(ROUTES), help=f"from: {', '.join(ROUTES)}")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="where pairs are cached and adapters built")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    routes = {name: ROUTES[name] for name in dict.fromkeys([BASELINE, *args.routes])}

    started = time.perf_counter()
    args.workdir.mkdir(parents=True, exist_ok=True)
    pairs = load_pairs(args.pairs, args.workdir)
    rows = []
    for pair in pairs:
        scratch = args.workdir / "scratch" / pair.name
        rows += evaluate(pair, routes, args.bytes_ranks, args.ranks, scratch)
    domains = list(pairs[0].heldout)
    print(f"\nKL(ft ‖ base + adapter) per token and top-1 agreement with the fine-tune, on {EVAL_SEQUENCES} held-out "
          f"sequences of {SEQ_LEN} tokens per domain; ×plain: KL over plain SVD's at the same size\n")
    print_table(rows, domains)
    print_targets(rows, domains)
    results = args.workdir / "bench_quality.json"
    results.write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    print(f"\nrows written to {results}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
