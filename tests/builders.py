"""Tiny, real Hugging Face checkpoints and synthetic tensors for deltakit's tests.

Import as ``from builders import ...``: pytest's default "prepend" import mode puts ``tests/`` (the folder of
the rootdir conftest, which has no ``__init__.py``) on ``sys.path``. ``from tests.builders import ...`` also
works under ``python -m pytest`` (cwd on ``sys.path``, ``tests`` as a namespace package) but yields a second
module object; pick the first form.

Every model is small (hidden 64, 2 layers, vocabulary 128): building a base/fine-tuned pair takes well under
a second on 2 CPU cores. The fine-tune is real: a few AdamW steps on the LM loss over batches that hold every
token id and every position, so every element of every parameter moves (norms, biases and all embedding rows
included), as in a full fine-tune. With the default lr 1e-2 and 5 steps the deltas are large and spread:
median ||dW|| / ||W|| is about 1.3 for 2-D weights (norm weights about 0.027), logits move by more than their
own scale, and a rank-8 truncation keeps only 40-80 % of a delta's energy. So low-rank extractions of these
pairs are lossy: compare them with deltakit's own merge, or use ``low_rank_delta`` for exact-rank cases. A
smaller lr would leave bf16 norm weights (spacing 2**-7 near 1.0) unchanged after rounding.

Facts measured with transformers 5.23 / peft 0.21.2 / torch 2.13 (they decide how deltakit treats tied weights):

1. Tensor names. For all four architectures the safetensors keys equal the loaded model's ``state_dict`` keys
   and ``named_parameters`` names (``model.layers.0.self_attn.q_proj.weight`` in the file is parameter
   ``weight`` of module ``model.layers.0.self_attn.q_proj``); no renaming on save or load. Tied parameters
   are written once, under the input-embedding name:
   - gpt2 (``tie_word_embeddings=True``): ``lm_head.weight`` is absent; only ``transformer.wte.weight``.
   - bert (BertForMaskedLM): ``cls.predictions.decoder.weight`` is absent (it *is*
     ``bert.embeddings.word_embeddings.weight``), and ``cls.predictions.decoder.bias`` is absent (it *is*
     ``cls.predictions.bias``, a plain parameter of module ``cls.predictions``, shape (vocab,)).
     ``model._tied_weights_keys`` is a dict in v5: ``{"cls.predictions.decoder.weight":
     "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.bias": "cls.predictions.bias"}``.
   - llama / qwen2 here are untied: ``lm_head.weight`` is written.
   Non-weight files written by ``save_pretrained``: ``config.json`` (with ``"dtype"``) and, for causal LMs,
   ``generation_config.json``. Shard names are ``model-0000k-of-0000n.safetensors``; the index's
   ``metadata`` holds ``total_size`` (bytes) *and* ``total_parameters``. Each file's ``__metadata__`` is
   ``{"format": "pt"}``.
2. Loading. ``from_pretrained`` re-ties a missing tied tensor silently (no missing keys reported). If a
   tied model's file holds *both* tensors with different values, transformers 5 does NOT tie them (it warns
   and loads both) -- a merge that writes ``lm_head.weight`` into a tied checkpoint changes the model's
   structure. A bf16 checkpoint loads as bf16 by default (v5 default is ``dtype="auto"``); the kwarg is
   ``dtype=`` (``torch_dtype=`` still works but warns it is deprecated). ``save_pretrained`` has no
   ``safe_serialization`` argument any more (always safetensors).
3. Module classes: see ``module_kinds`` below; llama/qwen2 use ``nn.Linear`` everywhere (qwen2: q/k/v with
   bias), ``nn.Embedding``, ``LlamaRMSNorm``/``Qwen2RMSNorm`` (weight only); bert uses ``nn.Linear`` with
   bias, ``nn.LayerNorm`` (weight and bias), three embeddings; gpt2 uses transformers' ``Conv1D`` (weight
   stored (in, out)) for c_attn/c_proj/c_fc, ``nn.LayerNorm``, two embeddings, and ``lm_head`` an
   ``nn.Linear`` sharing ``wte``'s weight.
4. PEFT 0.21.2 and tied embeddings (``ensure_weight_tying=True``): PEFT recognises tying only when an entry of
   ``target_modules`` (a list) or ``modules_to_save`` has a last component in ``("embed_tokens", "lm_head")``.
   - LoRA on ``transformer.wte`` (gpt2), on ``bert.embeddings.word_embeddings``, or via an anchored regex
     string: no tie; the adapter's forward applies dE to the input side only, while ``merge_and_unload``
     writes into the shared tensor, so the merged model has dE on both sides (forward != merged).
   - List with ``lm_head`` (gpt2) or ``...embed_tokens`` (llama-style): the lm_head gets a LoRA sharing the
     embedding's factors (lora_A = emb_B.T, lora_B = emb_A.T), so the adapter's forward equals the tied
     model with E + dE. But ``merge_and_unload`` then adds dE twice into the shared tensor (E + 2 dE).
     ``get_peft_model(...).save_pretrained`` writes extra ``lm_head.lora_A/B.weight`` keys and drops
     ``lm_head`` from the saved ``target_modules``; for gpt2 the reload then no longer ties.
   - ``modules_to_save`` with ``lm_head`` (or ``...embed_tokens``): one shared trainable copy, forward and
     merge both equal the tied E', but loading needs BOTH keys ``<embedding>.weight`` and
     ``lm_head.weight`` in the file (KeyError otherwise). ``modules_to_save=["transformer.wte"]``: no tie;
     lm_head keeps E, and the merge unties the model (``tie_word_embeddings`` set to False).
   - bert: PEFT finds the tie (``cls.predictions.decoder``) but never acts on it (no name matches).
   Harness notes: ``load_adapter`` filters ``missing_keys`` by ``adapter_name in key`` (a substring test:
   name a second adapter e.g. "second", not "y", which matches "layers"); a second adapter cannot be loaded
   when ``bias != "none"`` (ValueError) -- use ``set_peft_model_state_dict`` on ``get_peft_model(base, cfg)``
   and filter its ``missing_keys``, which then list every base parameter. Keys naming a base parameter
   (``base_model.model.cls.predictions.bias``) are loaded into the base model as is.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

ARCHS = ("llama", "qwen2", "bert", "gpt2")

_HIDDEN = 64
_INTERMEDIATE = 96  # differs from _HIDDEN so that out != in for the MLP weights
_LAYERS = 2
_HEADS = 4
_KV_HEADS = 2
_VOCAB = 128
_POSITIONS = 64


@dataclass(frozen=True)
class ModelPair:
    """A base checkpoint and its full fine-tune, both saved with ``save_pretrained``.

    Attributes:
        arch: one of ``ARCHS``.
        base_dir: the randomly initialised base model's directory.
        ft_dir: the fine-tuned model's directory (same names, shapes and dtypes as the base).
        config: the saved config (``tie_word_embeddings``, ``dtype`` ... as on disk).
    """

    arch: str
    base_dir: Path
    ft_dir: Path
    config: transformers.PretrainedConfig


def tiny_config(arch: str, **overrides: object) -> transformers.PretrainedConfig:
    """Build a tiny config for ``arch``: hidden 64, 2 layers, 4 heads, vocabulary 128, 64 positions.

    - llama: ``LlamaConfig``, intermediate 96, 2 KV heads (GQA: k/v_proj are (32, 64)), untied lm_head.
    - qwen2: ``Qwen2Config``, same shapes, biases on q/k/v_proj, untied lm_head.
    - bert: ``BertConfig`` for ``BertForMaskedLM``, intermediate 96; the MLM decoder is tied to the word
      embeddings (weight) and to ``cls.predictions.bias`` (bias).
    - gpt2: ``GPT2Config``, ``Conv1D`` layers (c_fc 64 -> 256), lm_head tied to ``transformer.wte``.
    Dropout is 0 so that a fine-tune depends on its seed only.

    Args:
        arch: one of ``ARCHS``.
        **overrides: config attributes to set instead of the defaults (e.g. ``tie_word_embeddings=True``).

    Returns:
        The config.

    Raises:
        ValueError: ``arch`` is not one of ``ARCHS``.
    """
    if arch in ("llama", "qwen2"):
        config_cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
        fields = dict(
            hidden_size=_HIDDEN, intermediate_size=_INTERMEDIATE, num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS, num_key_value_heads=_KV_HEADS, vocab_size=_VOCAB,
            max_position_embeddings=_POSITIONS, tie_word_embeddings=False, attention_dropout=0.0,
        )
    elif arch == "bert":
        config_cls = transformers.BertConfig
        fields = dict(
            hidden_size=_HIDDEN, intermediate_size=_INTERMEDIATE, num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS, vocab_size=_VOCAB, max_position_embeddings=_POSITIONS,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
    elif arch == "gpt2":
        config_cls = transformers.GPT2Config
        # GPT-2's default bos/eos id (50256) lies outside a 128-token vocabulary; transformers warns about it.
        fields = dict(
            n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, vocab_size=_VOCAB, n_positions=_POSITIONS,
            bos_token_id=_VOCAB - 1, eos_token_id=_VOCAB - 1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    fields.update(overrides)
    return config_cls(**fields)


def _auto_class(config: transformers.PretrainedConfig) -> type:
    is_masked_lm = config.model_type == "bert"
    return transformers.AutoModelForMaskedLM if is_masked_lm else transformers.AutoModelForCausalLM


def build_model(
    arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides: object
) -> transformers.PreTrainedModel:
    """Randomly initialise a tiny model (``BertForMaskedLM`` for bert, the causal-LM class otherwise).

    The global RNG state is left as it was.

    Args:
        arch: one of ``ARCHS``.
        seed: seed of the initialisation.
        dtype: parameter dtype.
        **config_overrides: passed to ``tiny_config``.

    Returns:
        The model, in eval mode.
    """
    config = tiny_config(arch, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _auto_class(config).from_config(config)
    return model.to(dtype).eval()


def _token_batch(config: transformers.PretrainedConfig, generator: torch.Generator) -> torch.Tensor:
    """A batch that holds every token id and every position, so every embedding row gets a gradient."""
    vocab = config.vocab_size
    seq = getattr(config, "max_position_embeddings", None) or config.n_positions
    batch = max(2, math.ceil(vocab / seq))
    perms = [torch.randperm(vocab, generator=generator) for _ in range(math.ceil(batch * seq / vocab))]
    return torch.cat(perms)[: batch * seq].view(batch, seq)


def finetune(
    model: transformers.PreTrainedModel, *, steps: int = 5, lr: float = 1e-2, seed: int = 1
) -> transformers.PreTrainedModel:
    """Fine-tune ``model`` in place: ``steps`` AdamW steps on all parameters with the LM loss.

    Each batch holds every token id and every position (and both BERT token types), so every element of
    every parameter changes -- norms, biases and all embedding rows included -- as in a real full fine-tune.
    BERT's loss is MLM on unmasked input (labels = input ids): a real loss with gradients everywhere.
    Tied parameters stay tied (they are one parameter). The global RNG state is left as it was.

    Args:
        model: a model from ``build_model`` (or loaded with transformers).
        steps: optimizer steps.
        lr: AdamW learning rate (weight decay 0.01).
        seed: seed of the token batches.

    Returns:
        The same model, in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    is_masked_lm = model.config.model_type == "bert"
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            input_ids = _token_batch(model.config, generator)
            kwargs = {}
            if is_masked_lm:
                token_types = model.config.type_vocab_size
                kwargs["token_type_ids"] = torch.randint(0, token_types, input_ids.shape, generator=generator)
            loss = model(input_ids=input_ids, labels=input_ids, **kwargs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model.eval()


def save_checkpoint(
    model: transformers.PreTrainedModel,
    out_dir: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Save ``model`` with ``save_pretrained`` (safetensors, config.json, generation_config.json).

    Args:
        model: the model; not modified (a copy is cast when ``dtype`` differs).
        out_dir: the directory to write.
        dtype: store the weights in this dtype (the config's ``dtype`` follows); default: the model's.
        max_shard_size: e.g. ``"40KB"`` to split into several ``model-0000k-of-0000n.safetensors`` shards plus
            ``model.safetensors.index.json``; default: one ``model.safetensors``.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    if dtype is not None and dtype != model.dtype:
        model = copy.deepcopy(model).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def _fresh_pair_dirs(root: Path | str, maker: str) -> tuple[Path, Path]:
    """``root/base`` and ``root/finetuned``, neither of which may exist yet."""
    base_dir, ft_dir = Path(root) / "base", Path(root) / "finetuned"
    for out_dir in (base_dir, ft_dir):
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} exists; give {maker} a fresh root")
    return base_dir, ft_dir


def make_pair(
    root: Path,
    arch: str,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str | None = None,
    steps: int = 5,
    seed: int = 0,
    **config_overrides: object,
) -> ModelPair:
    """Build a base checkpoint (random init) and its fine-tune under ``root/base`` and ``root/finetuned``.

    Both are trained and kept in fp32 and only cast to ``dtype`` when saved, so a bf16 pair holds two
    independently rounded tensors, like real bf16 releases.

    Args:
        root: parent directory; ``root/base`` and ``root/finetuned`` must not exist yet.
        arch: one of ``ARCHS``.
        dtype: storage dtype of both checkpoints.
        max_shard_size: shard both checkpoints (see ``save_checkpoint``).
        steps: fine-tuning steps.
        seed: initialisation seed (the fine-tune uses ``seed + 1``).
        **config_overrides: passed to ``tiny_config`` (e.g. ``tie_word_embeddings=True`` for llama).

    Returns:
        The pair.

    Raises:
        FileExistsError: ``root/base`` or ``root/finetuned`` exists.
    """
    base_dir, ft_dir = _fresh_pair_dirs(root, "make_pair")
    model = build_model(arch, seed=seed, **config_overrides)
    save_checkpoint(model, base_dir, dtype=dtype, max_shard_size=max_shard_size)
    finetune(model, steps=steps, seed=seed + 1)
    save_checkpoint(model, ft_dir, dtype=dtype, max_shard_size=max_shard_size)
    return ModelPair(arch, base_dir, ft_dir, transformers.AutoConfig.from_pretrained(base_dir))


def load_model(model_dir: Path, *, dtype: torch.dtype | str = torch.float32) -> transformers.PreTrainedModel:
    """Load a checkpoint written by these builders (or a deltakit merge of one) with transformers, offline.

    Args:
        model_dir: a directory with config.json and safetensors weights.
        dtype: parameter dtype after loading (default fp32, whatever the storage dtype; "auto" keeps it).

    Returns:
        The model, in eval mode.
    """
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model = _auto_class(config).from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    return model.eval()


def logits(model_dir_or_model: Path | str | nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The output logits for ``input_ids``, as fp32.

    A directory is loaded in fp32 (see ``load_model``). A model object (e.g. a ``PeftModel``) is put in eval
    mode and run in its own dtype.

    Args:
        model_dir_or_model: a checkpoint directory or a model.
        input_ids: (batch, seq) token ids.

    Returns:
        (batch, seq, vocab) fp32 logits.
    """
    if isinstance(model_dir_or_model, (str, Path)):
        model = load_model(Path(model_dir_or_model))
    else:
        model = model_dir_or_model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def delta_spectrum(size: int, rank: int, *, scale: float = 1.0, decay: float | None = None) -> torch.Tensor:
    """The singular values ``low_rank_delta`` uses, largest first (fp64).

    The first ``rank`` values are ``scale * (rank - i) / rank`` (distinct, from ``scale`` down to
    ``scale / rank``). Without ``decay`` the rest are 0 (exact rank ``rank``); with ``decay`` the tail
    continues geometrically, ``s[rank + j] = s[rank - 1] * decay ** (j + 1)``, so the matrix is full rank with
    a known Eckart-Young error at every truncation.

    Args:
        size: number of singular values, ``min(out, in)``.
        rank: number of leading (signal) values, ``1 <= rank <= size``.
        scale: largest singular value.
        decay: ratio of the geometric tail, ``0 < decay < 1``.

    Returns:
        (size,) singular values.

    Raises:
        ValueError: ``rank`` or ``decay`` out of range.
    """
    if not 1 <= rank <= size:
        raise ValueError(f"rank {rank} must be in [1, {size}]")
    if decay is not None and not 0.0 < decay < 1.0:
        raise ValueError(f"decay {decay} must be in (0, 1)")
    values = torch.zeros(size, dtype=torch.float64)
    values[:rank] = scale * torch.arange(rank, 0, -1, dtype=torch.float64) / rank
    if decay is not None:
        tail = torch.arange(1, size - rank + 1, dtype=torch.float64)
        values[rank:] = values[rank - 1] * decay**tail
    return values


def low_rank_delta(
    out: int, inp: int, rank: int, *, seed: int, scale: float = 1.0, decay: float | None = None
) -> torch.Tensor:
    """A random (out, inp) matrix with the singular values of ``delta_spectrum``.

    Built as U diag(s) Vᵀ from seeded random orthonormal U, V (in fp64, returned as fp32); the global RNG is
    not used.

    Args:
        out: rows.
        inp: columns.
        rank: signal rank (exact rank when ``decay`` is None).
        seed: seed of U and V.
        scale: largest singular value.
        decay: geometric tail ratio after the first ``rank`` values (full rank).

    Returns:
        (out, inp) fp32 tensor.

    Raises:
        ValueError: see ``delta_spectrum``.
    """
    size = min(out, inp)
    values = delta_spectrum(size, rank, scale=scale, decay=decay)
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, size, generator=generator, dtype=torch.float64))  # (out, size)
    v, _ = torch.linalg.qr(torch.randn(inp, size, generator=generator, dtype=torch.float64))  # (inp, size)
    return ((u * values) @ v.T).float()


def _write_safetensors(out_dir: Path, tensors: dict[str, torch.Tensor], shards: int, prefix: str) -> None:
    out_dir.mkdir(parents=True)
    # safetensors refuses tensors that share storage; tests often pass views of one tensor.
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in tensors.items()}
    if shards == 1:
        save_file(tensors, out_dir / f"{prefix}.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    bounds = [round(i * len(names) / shards) for i in range(shards + 1)]
    weight_map = {}
    for i in range(shards):
        shard_name = f"{prefix}-{i + 1:05d}-of-{shards:05d}.safetensors"
        shard = {name: tensors[name] for name in names[bounds[i] : bounds[i + 1]]}
        save_file(shard, out_dir / shard_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, shard_name))
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_safetensors_pair(
    root: Path,
    tensors_base: dict[str, torch.Tensor],
    tensors_ft: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    prefix: str = "model",
) -> tuple[Path, Path]:
    """Write two raw checkpoints (no transformers, no config.json) to ``root/base`` and ``root/finetuned``.

    With ``shards == 1``: ``<prefix>.safetensors``. Otherwise the tensors, in dict order, are split into
    ``shards`` contiguous groups of near-equal count, written as ``<prefix>-0000k-of-0000n.safetensors``, with
    ``<prefix>.safetensors.index.json`` = ``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``.
    Every file's ``__metadata__`` is ``{"format": "pt"}``.

    Args:
        root: parent directory; ``root/base`` and ``root/finetuned`` must not exist yet.
        tensors_base: name -> tensor of the base.
        tensors_ft: name -> tensor of the fine-tune (may differ in names, shapes or dtypes, for error tests).
        shards: files per checkpoint.
        prefix: file name prefix (``model``, ``diffusion_pytorch_model``, ...).

    Returns:
        ``(base_dir, ft_dir)``.

    Raises:
        ValueError: ``shards`` is below 1 or above the number of tensors of either side.
        FileExistsError: an output directory exists.
    """
    root = Path(root)
    for tensors in (tensors_base, tensors_ft):
        if not 1 <= shards <= max(1, len(tensors)):
            raise ValueError(f"shards {shards} must be in [1, {len(tensors)}] (one tensor at least per shard)")
    base_dir, ft_dir = root / "base", root / "finetuned"
    _write_safetensors(base_dir, tensors_base, shards, prefix)
    _write_safetensors(ft_dir, tensors_ft, shards, prefix)
    return base_dir, ft_dir


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Map each module that owns parameters directly to its class name (``Linear``, ``Conv1D``, ...).

    Args:
        model: any torch module.

    Returns:
        module name -> class name, in ``named_modules`` order (tied modules appear under each name).
    """
    return {
        name: type(module).__name__
        for name, module in model.named_modules(remove_duplicate=False)
        if any(True for _ in module.parameters(recurse=False))
    }


def signal_plus_noise(shape: tuple[int, int], rank: int, snr: float, sigma: float, seed: int) -> torch.Tensor:
    """U·diag(θ)·Vᵀ + σZ in fp64, U and V random orthonormal: the weakest signal value θ_r = snr × the noise bulk
    edge (√m + √n)·σ, the strongest twice that; what a noise-floor rank should find ``rank`` of."""
    generator = torch.Generator().manual_seed(seed)
    out, inp = shape
    u = torch.linalg.qr(torch.randn(out, rank, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inp, rank, generator=generator, dtype=torch.float64)).Q
    edge = (math.sqrt(out) + math.sqrt(inp)) * sigma
    theta = snr * edge * torch.linspace(2.0, 1.0, rank, dtype=torch.float64)
    return (u * theta) @ v.T + sigma * torch.randn(out, inp, generator=generator, dtype=torch.float64)



def save_char_tokenizer(model_dir: Path) -> Path:
    """Save a character-level tokenizer that fits the tiny models' 128-token vocabulary into ``model_dir``.

    Ids: 0 ``<unk>`` (any character not below), 1 ``<s>`` (prepended to every text, like Llama's BOS), 2 ``</s>``,
    3 newline, 4.. the printable ASCII characters (98 in all). Loads with ``AutoTokenizer.from_pretrained``.

    Returns:
        ``model_dir``.
    """
    import tokenizers
    from tokenizers import Regex, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3}
    vocab.update({chr(code): 4 + i for i, code in enumerate(range(32, 127))})
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(model_dir)
    return Path(model_dir)


def make_perturbed_pair(root: Path, arch: str, changed: str, *, seed: int = 0, scale: float = 0.2,
                        **config_overrides: object) -> ModelPair:
    """A base (random init) and a "fine-tune" that differs from it only in the parameters whose names fullmatch
    ``changed``: 1-D ones (norm scales) multiplied by ``1 + scale·N(0, 1)``, others given ``scale·std·N(0, 1)``.

    For what a real fine-tune cannot isolate: e.g. a Qwen2 whose embeddings, head and biases stay as they were,
    so that everything that changed is something a given adapter format can carry.

    Args:
        root: parent directory; ``root/base`` and ``root/finetuned`` must not exist yet.
        arch: one of ``ARCHS``.
        changed: regex on parameter names.
        seed: initialisation seed (the perturbation uses ``seed + 1``).
        scale: size of the perturbation.
        **config_overrides: passed to ``tiny_config``.

    Returns:
        The pair (fp32, one file each).
    """
    root = Path(root)
    model = build_model(arch, seed=seed, **config_overrides)
    save_checkpoint(model, root / "base")
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not re.fullmatch(changed, name):
                continue
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:
                param.mul_(1 + scale * noise)
            else:
                param.add_(scale * float(param.std()) * noise)
    save_checkpoint(model, root / "finetuned")
    return ModelPair(arch, root / "base", root / "finetuned", transformers.AutoConfig.from_pretrained(root / "base"))


# --- mixture-of-experts ---------------------------------------------------------------------------------------------
#
# Facts measured with transformers 5.24 / peft 0.21.2 (they decide how deltakit writes MoE adapters; README
# "Mixture-of-experts"):
# - In memory, transformers 5 fuses each layer's experts into 3-D parameters: ``mlp.experts.gate_up_proj``
#   (E, 2·I, H), gate rows first, and ``mlp.experts.down_proj`` (E, H, I); the router ``mlp.gate`` is a
#   ``*TopKRouter`` module with a (E, H) ``weight``, not an ``nn.Linear``.
# - ``save_pretrained`` reverts that: the files hold one 2-D weight per expert, as Hub checkpoints do --
#   Mixtral ``model.layers.L.block_sparse_moe.experts.E.w1|w2|w3.weight`` and ``block_sparse_moe.gate.weight``;
#   Qwen3-MoE ``model.layers.L.mlp.experts.E.gate_proj|up_proj|down_proj.weight`` and ``mlp.gate.weight``.

MOE_ARCHS = ("mixtral", "qwen3_moe")
_EXPERTS = 4
_MOE_INTERMEDIATE = 48


def tiny_moe_config(arch: str, **overrides: object) -> transformers.PretrainedConfig:
    """A tiny mixture-of-experts config: hidden 64, 2 layers, 4 experts (top-2), expert intermediate 48.

    - mixtral: ``MixtralConfig`` (experts ``w1``/``w3`` gate/up, ``w2`` down, router ``block_sparse_moe.gate``).
    - qwen3_moe: ``Qwen3MoeConfig``, every layer sparse (experts ``gate_proj``/``up_proj``/``down_proj``,
      router ``mlp.gate``), q/k norms.
    Both untied.

    Raises:
        ValueError: ``arch`` is not one of ``MOE_ARCHS``.
    """
    common = dict(hidden_size=_HIDDEN, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                  num_key_value_heads=_KV_HEADS, vocab_size=_VOCAB, max_position_embeddings=_POSITIONS,
                  num_experts_per_tok=2, tie_word_embeddings=False, attention_dropout=0.0)
    if arch == "mixtral":
        fields = dict(common, intermediate_size=_MOE_INTERMEDIATE, num_local_experts=_EXPERTS)
        config_cls = transformers.MixtralConfig
    elif arch == "qwen3_moe":
        fields = dict(common, intermediate_size=_INTERMEDIATE, moe_intermediate_size=_MOE_INTERMEDIATE,
                      num_experts=_EXPERTS, decoder_sparse_step=1, mlp_only_layers=[], head_dim=_HIDDEN // _HEADS)
        config_cls = transformers.Qwen3MoeConfig
    else:
        raise ValueError(f"unknown MoE arch {arch!r}; expected one of {MOE_ARCHS}")
    fields.update(overrides)
    return config_cls(**fields)


@dataclass(frozen=True)
class MoePair(ModelPair):
    """A :class:`ModelPair` of a mixture-of-experts model; ``unchanged_experts`` are the expert indices whose
    weights the fine-tune left as they were, in every layer."""

    unchanged_experts: tuple[int, ...] = ()


def make_moe_pair(root: Path, arch: str, *, unchanged_experts: tuple[int, ...] = (1,), scale: float = 0.05,
                  seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides: object) -> MoePair:
    """A random tiny MoE base and a "fine-tune" made by perturbing it, under ``root/base`` and ``root/finetuned``.

    Every parameter moves by a random full-rank delta of ``scale`` times its RMS (norms included), except the
    expert weights of ``unchanged_experts``, which stay as they are in every layer. A perturbation rather than
    training: top-k routing would leave experts untouched at random, and tests need to know which.

    Raises:
        FileExistsError: ``root/base`` or ``root/finetuned`` exists.
    """
    base_dir, ft_dir = _fresh_pair_dirs(root, "make_moe_pair")
    config = tiny_moe_config(arch, **config_overrides)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    save_checkpoint(model, base_dir, dtype=dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            delta = torch.randn(param.shape, generator=generator) * scale * param.float().pow(2).mean().sqrt()
            if ".experts." in name:  # fused (E, out, in) in memory
                delta[list(unchanged_experts)] = 0
            param.add_(delta.to(param.dtype))
    save_checkpoint(model, ft_dir, dtype=dtype)
    return MoePair(arch, base_dir, ft_dir, transformers.AutoConfig.from_pretrained(base_dir),
                   tuple(unchanged_experts))


# --- FP8 block-scaled checkpoints -------------------------------------------------------------------------------
#
# The layout of DeepSeek-V3 / Qwen3-FP8 releases, as transformers 5.24's finegrained_fp8 integration reads it:
# ``config.json`` holds ``quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic",
# "fmt": "e4m3", "weight_block_size": [bo, bi]}``; each quantized Linear stores ``<m>.weight`` as float8_e4m3fn
# codes (out, in) and ``<m>.weight_scale_inv`` fp32 of shape (ceil(out/bo), ceil(in/bi)), W = code × scale of its
# block. Embeddings, norms, the lm_head (``modules_to_not_convert``) and MoE routers stay in the model dtype.


def quantize_checkpoint_fp8(src_dir: Path, out_dir: Path, *, block: tuple[int, int] = (8, 8),
                            not_converted: tuple[str, ...] = ("lm_head",)) -> Path:
    """Write an FP8 block-scaled copy of the checkpoint ``src_dir`` (one ``model.safetensors``) to ``out_dir``.

    Every 2-D ``*.weight`` of a Linear layer (not an embedding, not a router ``gate``, not in ``not_converted``)
    is quantized by transformers' own ``Fp8Quantize`` (per block: scale_inv = amax / 448, code = W · 448/amax);
    the rest is stored in bfloat16, as releases do. ``config.json`` gains the ``quantization_config``.

    Returns:
        ``out_dir``.
    """
    from types import SimpleNamespace

    from safetensors.torch import load_file as _load_file
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    out_dir.mkdir(parents=True)
    config = json.loads((src_dir / "config.json").read_text())
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(block),
             "modules_to_not_convert": list(not_converted)}
    quantizer = Fp8Quantize(SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=block)))
    tensors = {}
    for name, tensor in _load_file(src_dir / "model.safetensors").items():
        module = name.rpartition(".")[0]
        leaf = module.rpartition(".")[2]
        is_linear = (name.endswith(".weight") and tensor.dim() == 2 and "embed" not in leaf and leaf != "gate"
                     and not any(module == m or module.endswith("." + m) for m in not_converted))
        if is_linear:
            tensors.update(quantizer._quantize_one(name, tensor))
        else:
            tensors[name] = tensor.to(torch.bfloat16)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config.update(quantization_config=quant, dtype="bfloat16")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for other in src_dir.iterdir():
        if other.is_file() and other.name not in ("config.json", "model.safetensors"):
            (out_dir / other.name).write_bytes(other.read_bytes())
    return out_dir


def dequantize_fp8_by_hand(codes: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W[i, j] = code[i, j] · scale_inv[i // bo, j // bi], element by element in fp32 (a reference, slow)."""
    rows = torch.arange(codes.shape[0])[:, None] // block[0]
    cols = torch.arange(codes.shape[1])[None, :] // block[1]
    return codes.float() * scale_inv.float()[rows, cols]


def peft_model(pair, adapter_dir: Path) -> "nn.Module":
    """PEFT's load of ``adapter_dir`` onto a fresh copy of ``pair``'s base, failing on missing or unexpected adapter
    keys (``from_pretrained`` drops unexpected keys silently, so they are checked with a second load)."""
    import warnings

    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    base = load_model(pair.base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    result = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir)), adapter_name="default")
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    return model.eval()


def refuse_direct(monkeypatch, how: str) -> None:
    """Make ``O_DIRECT`` fail as some file systems do: ``"refused at open"`` (EINVAL from ``open`` or from setting it
    with ``fcntl``, as tmpfs before Linux 6.6) or ``"refused at write"`` (EINVAL from each write of an O_DIRECT
    descriptor, as some FUSE mounts); ``"allowed"`` changes nothing."""
    direct = getattr(os, "O_DIRECT", 0)
    if how == "allowed" or not direct:
        return
    if how == "refused at open":
        real_open, real_fcntl = os.open, fcntl.fcntl

        def open_refusing(path, flags, *args, **kwargs):
            if flags & direct:
                raise OSError(errno.EINVAL, "Invalid argument", str(path))
            return real_open(path, flags, *args, **kwargs)

        def fcntl_refusing(fd, command, *args):
            if command == fcntl.F_SETFL and args and args[0] & direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_fcntl(fd, command, *args)

        monkeypatch.setattr(os, "open", open_refusing)
        monkeypatch.setattr(fcntl, "fcntl", fcntl_refusing)
    elif how == "refused at write":
        real_write = os.write

        def write_refusing(fd, data):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & direct:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write_refusing)
    else:
        raise ValueError(how)
