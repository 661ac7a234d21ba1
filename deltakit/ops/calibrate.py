"""Calibration statistics for output-aware fitting: each Linear's input second moment E[xxᵀ] and the second
moment E[ggᵀ] of the gradients at its output, from a forward and a backward pass run one decoder block at a time.

Like layer-wise quantizers (GPTQ), the pass never holds the model: the calibration sequences' hidden states go
through block 0, whose weights are then dropped, then block 1, and so on. Each block is built from the model's
config on the meta device (transformers' own decoder-layer class, so the math is the model's) and gets its
tensors from the checkpoint's lazy ``get``. Resident memory is one block (in fp32) plus the hidden states of the
calibration tokens and their gradients, whatever the model's size; the moments, and each block's input hidden
states until the backward pass has used them, go to disk block by block.

The backward pass: at every position a label is drawn from the model's own next-token distribution (seeded) and
the gradient of its log-likelihood is carried back through the blocks in reverse, one block at a time (rebuilt
from the spilled inputs). So E[ggᵀ] is the output factor of the Fisher information (K-FAC), which weighs each
output direction of a module by how much the model's predictions move with it; no data labels are needed.

What is collected, per module (named as in the checkpoint), each in two halves (even and odd sequences) so that
a fit made on one half can be checked on the other:
- a Linear or Conv1D inside a block, and an untied ``lm_head``: Σ xxᵀ over its inputs and Σ ggᵀ over its outputs
  (for ``lm_head``, whose outputs are the vocabulary, only the diagonal of Σ ggᵀ);
- the input token embedding: each token's count, a diagonal second moment (its input is a one-hot token), and,
  unless it is tied to the head, Σ ggᵀ at its output. A tied embedding is also the head, whose output side is
  another one, so it is left weighted by its inputs only (measured: weighting it by the embedding side's
  gradients alone made the GPT-2 pair's KL 1.4× plain SVD's).
Modules sharing one input (q/k/v_proj, gate/up_proj) share one input moment on disk.

The calibration tokens come from a text file, a JSONL file (a ``"text"`` field per line), both tokenized with
the tokenizer in the fine-tuned checkpoint's directory, or ``self``: sequences sampled (temperature 1, from the BOS
token) three quarters from the fine-tuned model and one quarter from the base model, all then run through the
fine-tuned one, so that no data set is needed and the base's domain, which the adapter must not spoil either, is
covered too (see the README's calibration section for the measurement). Sampling runs the same block-wise pass
once per generated position with a key/value cache, so it reads the weights ``seq_len`` times: cheap while the
checkpoint fits in the page cache, slow from disk.

transformers is needed here only (the ``calib`` extra); it is imported when a calibration runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors import safe_open
from tqdm import tqdm

from deltakit.defaults import CALIB_SEQ_LEN, CALIB_TOKENS
from deltakit.errors import CalibrationError, ExtraMissingError, InvalidOptionError
from deltakit.io.checkpoint import Checkpoint
from deltakit.io.writer import save_tensors
from deltakit.names import ModuleName

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "CALIB_SEQ_LEN", "CALIB_TOKENS", "SELF", "BlockwiseModel", "Calibration", "CalibrationMoments", "calibrate",
    "check_calibration", "collect_moments", "sample_sequences", "tokenize_source",
]

SELF = "self"
Activations = Literal["finetuned", "base"]
# Tokens per micro-batch inside a block: bounds the block's own temporaries (MLP width × this, in fp32).
_MICRO_BATCH_TOKENS = 4096
# Logits per micro-batch of the head pass (tokens × vocabulary): 0.5 GB in fp32 (1 GB as the fp64 probabilities
# the labels are drawn from), whatever the vocabulary.
_MICRO_BATCH_LOGITS = 1 << 27
_HALVES = ("a", "b")  # even and odd sequences
# For ``self``: the share of the sampled sequences drawn from the base model instead of the fine-tuned one.
BASE_SAMPLE_SHARE = 0.25


@dataclass(frozen=True)
class _Layout:
    """Where a decoder family keeps its parts (module names in the transformers model) and how a block is called."""

    embed: str
    blocks: str
    norm: str
    positions: str | None = None  # a learned position embedding (GPT-2), else rotary inside the blocks
    rotary: str | None = None
    head: str = "lm_head"


_LLAMA = _Layout(embed="model.embed_tokens", blocks="model.layers", norm="model.norm", rotary="model.rotary_emb")
# Architectures whose block-wise pass is tested against transformers' full forward (tests/test_calibrate.py).
LAYOUTS = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": _Layout(embed="transformer.wte", blocks="transformer.h", norm="transformer.ln_f",
                    positions="transformer.wpe"),
}


def _transformers():  # noqa: ANN202 - the module
    try:
        import transformers
    except ImportError as e:
        raise ExtraMissingError("--calib needs transformers: pip install 'deltakit[calib]'") from e
    return transformers


# ---------------------------------------------------------------------------------------------------------------
# Calibration tokens


@dataclass(frozen=True)
class Calibration:
    """The calibration tokens and where they came from (for the report and the model card).

    Attributes:
        source: the file as given, or ``self``.
        sha256: of the file's bytes; for ``self``, of the sampled token ids (int64, little-endian).
        token_ids: (sequences, seq_len) int64.
        seed: the sampling seed (``self`` only).
        base_sequences: how many of the sequences (the last ones) were sampled from the base model (``self``).
    """

    source: str
    sha256: str
    token_ids: torch.Tensor
    seed: int | None = None
    base_sequences: int = 0

    @property
    def tokens(self) -> int:
        return self.token_ids.numel()

    def describe(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "tokens": self.tokens,
                "sequences": self.token_ids.shape[0], "seq_len": self.token_ids.shape[1], "seed": self.seed,
                "base_sequences": self.base_sequences, "output_weighting": "fisher"}


def _check_sizes(tokens: int, seq_len: int) -> None:
    if seq_len < 2:
        raise InvalidOptionError(f"--calib-seq-len must be at least 2, got {seq_len}")
    if tokens < seq_len:
        raise InvalidOptionError(f"--calib-tokens {tokens} is less than one sequence of --calib-seq-len {seq_len}")


def _documents(path: Path) -> Iterator[str]:
    """The texts of a calibration file: the whole of a text file, or each line's ``"text"`` of a JSONL file."""
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise CalibrationError(f"line {number} is not JSON ({e.msg})", path=path) from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CalibrationError(f'line {number} has no "text" string field', path=path)
            yield record["text"]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_tokenizer(model_dir: Path):  # noqa: ANN201 - a transformers tokenizer
    """The tokenizer saved beside the fine-tuned weights.

    Raises:
        CalibrationError: the directory holds no tokenizer transformers can load.
    """
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CalibrationError("no tokenizer here to read the calibration text with; add the tokenizer files, "
                               "or use --calib self", path=model_dir) from e


def tokenize_source(path: str | Path, model_dir: Path, *, tokens: int = CALIB_TOKENS,
                    seq_len: int = CALIB_SEQ_LEN) -> Calibration:
    """Tokenize a text or JSONL file into at most ``tokens // seq_len`` sequences of ``seq_len`` tokens.

    Documents are tokenized as the tokenizer does by default (with its BOS token, if it adds one), joined, and
    cut into consecutive sequences; a remainder shorter than ``seq_len`` is dropped, unless the text holds less
    than one sequence, which then becomes the only (shorter) one.

    Raises:
        CalibrationError: the file is missing or unreadable, a JSONL line is bad, the text is empty, or FT has no
            tokenizer.
        InvalidOptionError: ``tokens`` or ``seq_len`` out of range.
    """
    _check_sizes(tokens, seq_len)
    path = Path(path)
    if not path.is_file():
        raise CalibrationError("no such calibration file; give a text file, a .jsonl file or 'self'", path=path)
    tokenizer = load_tokenizer(model_dir)
    wanted = (tokens // seq_len) * seq_len
    stream: list[int] = []
    try:
        for text in _documents(path):
            if text.strip():
                stream += tokenizer(text)["input_ids"]
            if len(stream) >= wanted:
                break
    except OSError as e:
        raise CalibrationError(f"cannot read ({e.strerror})", path=path) from e
    if not stream:
        raise CalibrationError("the calibration text is empty", path=path)
    count = min(len(stream) // seq_len, tokens // seq_len)
    ids = torch.tensor(stream[: count * seq_len] if count else stream, dtype=torch.int64)
    return Calibration(str(path), _file_sha256(path), ids.view(max(count, 1), -1))


# ---------------------------------------------------------------------------------------------------------------
# The block-wise model


class BlockwiseModel:
    """A decoder run one block at a time, each block built on demand from the config and a checkpoint's tensors.

    Args:
        config_ckpt: the checkpoint whose ``config.json`` describes the architecture (the fine-tuned one).
        device: where the blocks run (in fp32).

    Raises:
        CalibrationError: no ``config.json``, or an architecture other than those in ``LAYOUTS``.
        ExtraMissingError: transformers is not installed.
    """

    def __init__(self, config_ckpt: Checkpoint, device: torch.device) -> None:
        transformers = _transformers()
        model_type = (config_ckpt.config or {}).get("model_type")
        if config_ckpt.config is None:
            raise CalibrationError("no config.json beside the weights; --calib needs the model's config",
                                   path=config_ckpt.path)
        if model_type not in LAYOUTS:
            architectures = ", ".join(config_ckpt.config.get("architectures") or []) or "?"
            raise CalibrationError(f"--calib does not support the architecture {architectures} (model_type "
                                   f"{model_type!r}); supported: {', '.join(LAYOUTS)}", path=config_ckpt.path)
        self.layout = LAYOUTS[model_type]
        self.device = device
        self.config = transformers.AutoConfig.from_pretrained(config_ckpt.files[0].parent, local_files_only=True)
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            self.skeleton = transformers.AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.num_blocks = len(self.skeleton.get_submodule(self.layout.blocks))
        self.max_positions = getattr(self.config, "max_position_embeddings", None) or self.config.n_positions
        self.rotary = None
        if self.layout.rotary is not None:  # its buffers are computed at construction, not stored
            self.rotary = type(self.skeleton.get_submodule(self.layout.rotary))(config=self.config).to(device)

    def tensor_name_or_none(self, ckpt: Checkpoint, model_name: str) -> str | None:
        """The checkpoint's name for a parameter of the transformers model, which may lack the base model's
        prefix (a bare GPT-2 has ``h.0...`` names); None when the checkpoint has neither."""
        prefix = self.skeleton.base_model_prefix + "."
        bare = model_name[len(prefix):] if model_name.startswith(prefix) else None
        return next((name for name in (model_name, bare) if name is not None and name in ckpt), None)

    def tensor_name(self, ckpt: Checkpoint, model_name: str) -> str:
        """As :meth:`tensor_name_or_none`; raises TensorMissingError naming the tensor when it is missing."""
        return self.tensor_name_or_none(ckpt, model_name) or ckpt.info(model_name).name

    def load(self, ckpt: Checkpoint, name: str) -> nn.Module:
        """Build the submodule ``name`` (a block, a norm, an embedding) with its tensors from ``ckpt``, in fp32."""
        module = copy.deepcopy(self.skeleton.get_submodule(name))
        state = {key: ckpt.get(self.tensor_name(ckpt, f"{name}.{key}")).to(self.device, torch.float32)
                 for key in module.state_dict()}
        module.load_state_dict(state, assign=True)
        return module.requires_grad_(False).eval()

    def block_name(self, index: int) -> str:
        return f"{self.layout.blocks}.{index}"

    def head_weight(self, ckpt: Checkpoint) -> torch.Tensor:
        """The output head's weight (vocab, hidden): ``lm_head.weight``, or the input embedding when tied."""
        name = f"{self.layout.head}.weight"
        if name not in ckpt and getattr(self.config, "tie_word_embeddings", False):
            name = f"{self.layout.embed}.weight"
        return ckpt.get(self.tensor_name(ckpt, name)).to(self.device, torch.float32)

    def embed(self, ckpt: Checkpoint, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Hidden states entering block 0 for ``ids`` (batch, seq), whose first position is ``start``."""
        embedding = self.load(ckpt, self.layout.embed)
        with torch.no_grad():
            hidden = embedding(ids.to(self.device))
            if self.layout.positions is not None:
                positions = self.load(ckpt, self.layout.positions)
                hidden = hidden + positions(torch.arange(start, start + ids.shape[1], device=self.device))
        return hidden

    def run_block(self, block: nn.Module, hidden: torch.Tensor, start: int = 0, cache: object = None,
                  grad: bool = False) -> torch.Tensor:
        """One block's output for ``hidden`` (batch, seq, dim) at positions ``start``.., causal within the batch's
        positions (and attending to the whole ``cache``, if given); with ``grad``, differentiable in ``hidden``."""
        length = hidden.shape[1]
        positions = torch.arange(start, start + length, device=self.device)[None]
        mask = None
        if length > 1:  # an additive causal mask: eager and sdpa attention both take it
            mask = torch.full((length, length), torch.finfo(torch.float32).min, device=self.device).triu(1)
            mask = mask[None, None]
        kwargs = {"attention_mask": mask, "position_ids": positions, "cache": cache, "use_cache": cache is not None}
        if self.rotary is not None:
            kwargs["position_embeddings"] = self.rotary(hidden, positions)
        with torch.set_grad_enabled(grad):
            out = block(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def new_cache(self) -> object:
        return _transformers().DynamicCache(config=self.config)


# ---------------------------------------------------------------------------------------------------------------
# Second moments


@dataclass
class CalibrationMoments:
    """Per module, the second moments of its inputs and of the gradients at its outputs over the calibration
    tokens, in two halves.

    Moments of Linears live in safetensors files per block under ``spill_dir`` (read back on demand); token
    counts (embeddings) in memory.

    Attributes:
        spill_dir: where the per-block files are.
        sites: module → (file, key) of its input moment sums; modules sharing an input share a key.
        output_sites: module → (file, key) of its output-gradient moment sums.
        counts: (file, key) → the number of vectors in each half (inputs and outputs alike).
        token_counts: embedding module → (2, vocab) counts per half.
    """

    spill_dir: Path
    sites: dict[ModuleName, tuple[str, str]] = field(default_factory=dict)
    output_sites: dict[ModuleName, tuple[str, str]] = field(default_factory=dict)
    counts: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    token_counts: dict[ModuleName, torch.Tensor] = field(default_factory=dict)

    def __contains__(self, module: object) -> bool:
        return module in self.sites or module in self.token_counts

    def halves(self, module: ModuleName) -> tuple[torch.Tensor, torch.Tensor] | None:
        """E[xxᵀ] over the even and over the odd sequences, (in, in) fp32 (diagonal (in,) for an embedding);
        None for a module without statistics."""
        if module in self.token_counts:
            counts = self.token_counts[module].double()
            totals = counts.sum(dim=1, keepdim=True).clamp(min=1)
            a, b = (counts / totals).float()
            return a, b
        return self._halves(self.sites.get(module))

    def moment(self, module: ModuleName) -> torch.Tensor | None:
        """E[xxᵀ] over all calibration tokens; None for a module without statistics."""
        if module in self.token_counts:
            counts = self.token_counts[module].double().sum(dim=0)
            return (counts / counts.sum().clamp(min=1)).float()
        return self._moment(self.sites.get(module))

    def output_halves(self, module: ModuleName) -> tuple[torch.Tensor, torch.Tensor] | None:
        """E[ggᵀ] at the module's output over each half, (out, out) fp32 (diagonal (out,) for the head); None
        where it was not collected (a tied embedding, a module the pass did not reach)."""
        return self._halves(self.output_sites.get(module))

    def output_moment(self, module: ModuleName) -> torch.Tensor | None:
        """E[ggᵀ] at the module's output over all calibration tokens, or None (see :meth:`output_halves`)."""
        return self._moment(self.output_sites.get(module))

    def _halves(self, site: tuple[str, str] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        if site is None:
            return None
        sum_a, sum_b = self._sums(*site)
        n_a, n_b = self.counts[site]
        return sum_a / max(n_a, 1), sum_b / max(n_b, 1)

    def _moment(self, site: tuple[str, str] | None) -> torch.Tensor | None:
        if site is None:
            return None
        sum_a, sum_b = self._sums(*site)
        n_a, n_b = self.counts[site]
        return (sum_a + sum_b) / max(n_a + n_b, 1)

    def _sums(self, file: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One site's two sums, read alone from its block's file."""
        with safe_open(self.spill_dir / file, framework="pt") as sums:
            return sums.get_tensor(f"{key}.a"), sums.get_tensor(f"{key}.b")


class _MomentSums:
    """Σ xxᵀ (or only its diagonal, Σ x²) and the number of rows, per site and half; which site each module
    reads."""

    def __init__(self) -> None:
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.counts: dict[str, list[int]] = {}
        self.site_of: dict[ModuleName, str] = {}

    def add(self, site: str, halves: tuple[torch.Tensor, torch.Tensor], diagonal: bool = False) -> None:
        """Add the rows of each half, (..., dim) each."""
        for half, rows in enumerate(halves):
            rows = rows.float().reshape(-1, rows.shape[-1])
            product = rows.square().sum(dim=0) if diagonal else rows.T @ rows
            if site not in self.sums:
                self.sums[site], self.counts[site] = [torch.zeros_like(product), torch.zeros_like(product)], [0, 0]
            self.sums[site][half] += product
            self.counts[site][half] += rows.shape[0]


def _factorizable(block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((name, module) for name, module in block.named_modules() if type(module).__name__ in ("Linear", "Conv1D"))


class _MomentHooks:
    """Forward pre-hooks on a block's Linear/Conv1D modules adding their inputs to a :class:`_MomentSums`."""

    def __init__(self, block: nn.Module, block_name: str, names: Callable[[str], ModuleName]) -> None:
        self.moments = _MomentSums()
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs of this micro-batch, to spot shared ones
        self._odd: torch.Tensor | None = None  # (batch,) bool: the micro-batch's sequences of half b
        self._handles = [module.register_forward_pre_hook(self._hook(names(f"{block_name}.{name}")))
                         for name, module in _factorizable(block)]

    def _hook(self, module: ModuleName) -> Callable:
        def hook(_module: nn.Module, inputs: tuple) -> None:
            x = inputs[0]  # (batch, seq, in)
            site = next((s for seen, s in self._seen if seen is x), None)
            if site is not None:  # q/k/v_proj, gate/up_proj: the same tensor as a sibling's
                self.moments.site_of.setdefault(module, site)
                return
            site = self.moments.site_of.setdefault(module, module)
            self._seen.append((x, site))
            self.moments.add(site, (x[~self._odd], x[self._odd]))
        return hook

    def next_batch(self, odd: torch.Tensor) -> None:
        self._seen.clear()
        self._odd = odd

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._seen.clear()


class _GradientHooks:
    """Forward hooks on a block's Linear/Conv1D modules that add the gradient reaching each one's output, in the
    backward pass, to a :class:`_MomentSums`."""

    def __init__(self, block: nn.Module, block_name: str, names: Callable[[str], ModuleName]) -> None:
        self.moments = _MomentSums()
        self._odd: torch.Tensor | None = None
        self._handles = [module.register_forward_hook(self._hook(names(f"{block_name}.{name}")))
                         for name, module in _factorizable(block)]

    def _hook(self, module: ModuleName) -> Callable:
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            odd = self._odd
            self.moments.site_of[module] = module
            output.register_hook(lambda g: self.moments.add(module, (g[~odd], g[odd])))
        return hook

    def next_batch(self, odd: torch.Tensor) -> None:
        self._odd = odd

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _micro_batches(sequences: int, seq_len: int, tokens: int = _MICRO_BATCH_TOKENS) -> Iterator[slice]:
    step = max(1, tokens // seq_len)
    for start in range(0, sequences, step):
        yield slice(start, min(start + step, sequences))


def fisher_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per position drawn from the model's own next-token distribution: (batch, seq, vocab) →
    (batch, seq). The gradients of their log-likelihood have the Fisher information as second moment."""
    probabilities = torch.softmax(logits.detach().double().reshape(-1, logits.shape[-1]), dim=-1).cpu()
    return torch.multinomial(probabilities, 1, generator=generator).view(logits.shape[:-1]).to(logits.device)


def collect_moments(model: BlockwiseModel, weights: Checkpoint, token_ids: torch.Tensor, spill_dir: Path,
                    *, seed: int = 0, progress: bool = False) -> CalibrationMoments:
    """Run the calibration tokens through ``weights`` block by block, forward then backward, and record every
    module's input and output-gradient moments.

    Args:
        model: the block-wise model (its config).
        weights: the checkpoint whose blocks run (the fine-tuned or the base one).
        token_ids: (sequences, seq_len).
        spill_dir: an existing directory for the per-block moment files (and, for the time between the passes,
            each block's input hidden states).
        seed: of the labels drawn for the gradients (:func:`fisher_labels`).
        progress: a progress bar on stderr.

    Returns:
        The :class:`CalibrationMoments`, keyed by the checkpoint's module names.
    """
    spill_dir = Path(spill_dir)
    moments = CalibrationMoments(spill_dir)
    sequences, seq_len = token_ids.shape
    odd = torch.arange(sequences, device=model.device) % 2 == 1
    embed_module = model.tensor_name(weights, f"{model.layout.embed}.weight").removesuffix(".weight")
    counts = torch.zeros(2, model.config.vocab_size, dtype=torch.float64)
    for half in (0, 1):
        rows = token_ids[(odd.cpu() if half else ~odd.cpu())].flatten()
        counts[half] += torch.bincount(rows, minlength=model.config.vocab_size)[: model.config.vocab_size].double()
    moments.token_counts[embed_module] = counts

    def checkpoint_module(model_name: str) -> ModuleName:
        return model.tensor_name(weights, f"{model_name}.weight").removesuffix(".weight")

    hidden = model.embed(weights, token_ids)
    bar = tqdm(total=2 * model.num_blocks, desc="calibrate", unit="block", disable=not progress, dynamic_ncols=True)
    for index in range(model.num_blocks):
        save_tensors(spill_dir / f"hidden-{index:05d}.safetensors", {"hidden": hidden.cpu()})
        block = model.load(weights, model.block_name(index))
        hooks = _MomentHooks(block, model.block_name(index), checkpoint_module)
        for batch in _micro_batches(sequences, seq_len):
            hooks.next_batch(odd[batch])
            hidden[batch] = model.run_block(block, hidden[batch])
        hooks.remove()
        del block
        _spill(moments, moments.sites, f"block-{index:05d}.safetensors", hooks.moments)
        bar.update()
    gradient = _head_pass(model, weights, hidden, odd, moments, seed)
    del hidden
    for index in reversed(range(model.num_blocks)):
        hidden_file = spill_dir / f"hidden-{index:05d}.safetensors"
        with safe_open(hidden_file, framework="pt") as spilled:
            inputs = spilled.get_tensor("hidden").to(model.device)
        hidden_file.unlink()
        block = model.load(weights, model.block_name(index))
        hooks = _GradientHooks(block, model.block_name(index), checkpoint_module)
        for batch in _micro_batches(sequences, seq_len):
            hooks.next_batch(odd[batch])
            x = inputs[batch].detach().requires_grad_(True)
            model.run_block(block, x, grad=True).backward(gradient[batch])
            gradient[batch] = x.grad
        hooks.remove()
        del block, inputs
        _spill(moments, moments.output_sites, f"gradients-{index:05d}.safetensors", hooks.moments)
        bar.update()
    bar.close()
    if model.tensor_name_or_none(weights, f"{model.layout.head}.weight") is not None:  # an untied embedding
        sums = _MomentSums()
        sums.add(embed_module, (gradient[~odd], gradient[odd]))
        sums.site_of[embed_module] = embed_module
        _spill(moments, moments.output_sites, "embedding-gradients.safetensors", sums)
    return moments


def _head_pass(model: BlockwiseModel, weights: Checkpoint, hidden: torch.Tensor, odd: torch.Tensor,
               moments: CalibrationMoments, seed: int) -> torch.Tensor:
    """The gradient, at the last block's output, of the log-likelihood of labels drawn from the model (the
    start of the backward pass); an untied head's input moment and the diagonal of its output-gradient moment
    go into ``moments`` on the way."""
    norm = model.load(weights, model.layout.norm)
    head_weight = model.head_weight(weights)
    head = model.tensor_name_or_none(weights, f"{model.layout.head}.weight")
    head = head.removesuffix(".weight") if head is not None else None
    inputs, outputs = _MomentSums(), _MomentSums()
    generator = torch.Generator().manual_seed(seed)
    gradient = torch.empty_like(hidden)
    for batch in _micro_batches(*hidden.shape[:2], tokens=min(_MICRO_BATCH_TOKENS,
                                                                _MICRO_BATCH_LOGITS // head_weight.shape[0])):
        x = hidden[batch].detach().requires_grad_(True)
        with torch.enable_grad():
            normed = norm(x)
            logits = normed @ head_weight.T
            labels = fisher_labels(logits, generator)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            loss.backward()
        gradient[batch] = x.grad
        if head is not None:
            with torch.no_grad():  # d(−log p(label))/d logits = p − onehot(label)
                g = torch.softmax(logits, dim=-1).scatter_add_(
                    -1, labels[..., None], torch.full(labels[..., None].shape, -1.0, device=logits.device))
                inputs.add(head, (normed[~odd[batch]], normed[odd[batch]]))
                outputs.add(head, (g[~odd[batch]], g[odd[batch]]), diagonal=True)
    if head is not None:
        inputs.site_of[head] = outputs.site_of[head] = head
        _spill(moments, moments.sites, "head.safetensors", inputs)
        _spill(moments, moments.output_sites, "head-gradients.safetensors", outputs)
    return gradient


def _spill(moments: CalibrationMoments, sites: dict[ModuleName, tuple[str, str]], file: str,
           sums: _MomentSums) -> None:
    tensors = {}
    for site, (a, b) in sums.sums.items():
        tensors[f"{site}.a"], tensors[f"{site}.b"] = a.cpu().contiguous(), b.cpu().contiguous()
        moments.counts[(file, site)] = tuple(sums.counts[site])
    save_tensors(moments.spill_dir / file, tensors)
    for module, site in sums.site_of.items():
        sites[module] = (file, site)


# ---------------------------------------------------------------------------------------------------------------
# Sampling from the fine-tuned model


def sample_sequences(model: BlockwiseModel, weights: Checkpoint, *, sequences: int, seq_len: int, seed: int = 0,
                     progress: bool = False) -> torch.Tensor:
    """Sample ``sequences`` sequences of ``seq_len`` tokens from the model, temperature 1, each starting with the
    BOS token (the config's, else token 0), one block-wise pass per position with a key/value cache.

    Returns:
        (sequences, seq_len) int64 on the CPU.
    """
    bos = getattr(model.config, "bos_token_id", None)
    start_token = bos if isinstance(bos, int) and 0 <= bos < model.config.vocab_size else 0
    ids = torch.full((sequences, seq_len), start_token, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    cache = model.new_cache()
    norm = model.load(weights, model.layout.norm)
    head = model.head_weight(weights)
    for position in tqdm(range(seq_len - 1), desc="sample", unit="token", disable=not progress,
                         dynamic_ncols=True):
        hidden = model.embed(weights, ids[:, position : position + 1], start=position)
        for index in range(model.num_blocks):
            block = model.load(weights, model.block_name(index))
            hidden = model.run_block(block, hidden, start=position, cache=cache)
            del block
        with torch.no_grad():
            logits = norm(hidden[:, -1]) @ head.T  # (sequences, vocab)
        probabilities = torch.softmax(logits.double(), dim=-1).cpu()
        ids[:, position + 1] = torch.multinomial(probabilities, 1, generator=generator)[:, 0]
    return ids


def check_calibration(source: str | Path, finetuned: Checkpoint, *, tokens: int = CALIB_TOKENS,
                      seq_len: int = CALIB_SEQ_LEN) -> None:
    """Everything :func:`calibrate` would refuse that can be checked without running the model: the sizes, the
    source file, transformers, the architecture, and (for a file) the tokenizer.

    Raises:
        CalibrationError, ExtraMissingError, InvalidOptionError.
    """
    if str(source) != SELF and not Path(source).is_file():
        raise CalibrationError("no such calibration file; give a text file, a .jsonl file or 'self'", path=source)
    model = BlockwiseModel(finetuned, torch.device("cpu"))
    _check_sizes(tokens, min(seq_len, model.max_positions))
    if str(source) != SELF:
        load_tokenizer(finetuned.files[0].parent)


def calibrate(source: str | Path, finetuned: Checkpoint, base: Checkpoint, spill_dir: Path, *,
              tokens: int = CALIB_TOKENS, seq_len: int = CALIB_SEQ_LEN, activations: Activations = "finetuned",
              device: torch.device = torch.device("cpu"), seed: int = 0,
              progress: bool = False) -> tuple[Calibration, CalibrationMoments]:
    """The calibration tokens from ``source`` and every module's input and output-gradient moments under them.

    Args:
        source: a text file, a JSONL file, or ``"self"``.
        finetuned, base: the checkpoints (FT gives the config and the tokenizer; for ``self``, both give samples).
        spill_dir: an existing directory for the moments.
        tokens, seq_len: how many calibration tokens, in sequences of this length (at most the model's
            ``max_position_embeddings``; the report records the length used).
        activations: whose inputs each module sees: the fine-tuned model's or the base's.
        device: where the blocks run.
        seed: of the ``self`` samples (those from the base model: ``seed + 1``) and of the gradients' labels.
        progress: progress bars on stderr.

    Raises:
        CalibrationError, ExtraMissingError, InvalidOptionError: see :func:`tokenize_source` and
            :class:`BlockwiseModel`.
    """
    if activations not in ("finetuned", "base"):
        raise InvalidOptionError(f"calibration activations must be 'finetuned' or 'base', got {activations!r}")
    model = BlockwiseModel(finetuned, device)
    seq_len = min(seq_len, model.max_positions)  # longer sequences would leave the positions it was trained on
    _check_sizes(tokens, seq_len)
    if str(source) == SELF:
        sequences = tokens // seq_len
        from_base = int(sequences * BASE_SAMPLE_SHARE)
        ids = sample_sequences(model, finetuned, sequences=sequences - from_base, seq_len=seq_len, seed=seed,
                               progress=progress)
        if from_base:
            ids = torch.cat([ids, sample_sequences(model, base, sequences=from_base, seq_len=seq_len, seed=seed + 1,
                                                   progress=progress)])
        calibration = Calibration(SELF, hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest(), ids, seed,
                                  from_base)
    else:
        calibration = tokenize_source(source, finetuned.files[0].parent, tokens=tokens, seq_len=seq_len)
    if int(calibration.token_ids.max()) >= model.config.vocab_size:
        raise CalibrationError(f"the tokenizer gives ids up to {int(calibration.token_ids.max())}, beyond the "
                               f"model's vocabulary of {model.config.vocab_size}", path=finetuned.path)
    weights = finetuned if activations == "finetuned" else base
    return calibration, collect_moments(model, weights, calibration.token_ids, spill_dir, seed=seed,
                                        progress=progress)
