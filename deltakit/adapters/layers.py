"""What kind of layer each weight belongs to, and how tensor, module and PEFT key names map onto each other.

Pure functions, no I/O. All conversions between the three kinds of name live here:

- ``TensorName``: a key in a checkpoint, e.g. ``model.layers.0.mlp.up_proj.weight``;
- ``ModuleName``: the module that owns it, e.g. ``model.layers.0.mlp.up_proj``;
- ``PeftKey``: a key in a PEFT adapter file, e.g. ``base_model.model.model.layers.0.mlp.up_proj.lora_A.weight``.

Factorized weights are handled in PEFT's orientation, a matrix of shape (out, in) with ΔW = scaling · B @ A,
B (out, r), A (r, in). How a stored tensor maps to that orientation depends on its kind (PEFT_FORMAT.md §2):
``nn.Linear`` stores (out, in) as is; GPT-2's ``Conv1D`` stores (in, out); ``nn.Embedding`` stores
(num_embeddings, dim) and PEFT treats it as in = num_embeddings, out = dim. DoRA norms are per row of that
(out, in) matrix in every case, which is why one orientation serves all three kinds.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from deltakit.names import ModuleName, PeftKey, TensorName, split_tensor_name

PEFT_PREFIX = "base_model.model."


class WeightKind(enum.Enum):
    LINEAR = "linear"
    CONV1D = "conv1d"  # transformers.pytorch_utils.Conv1D: weight stored (in, out), PEFT's fan_in_fan_out
    EMBEDDING = "embedding"
    OTHER = "other"  # norms, biases, conv kernels, bare parameters: never factorized

    @property
    def is_factorizable(self) -> bool:
        return self is not WeightKind.OTHER


# Last name components of nn.Embedding modules across the transformers model zoo. A checkpoint header does not
# say which class owns a weight, so the name decides (transformers is not a runtime dependency).
_EMBEDDING_NAME = re.compile(
    r"(^|_)(embed_tokens|embed_positions|embed_in|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|tok_embeddings|shared|embeddings|embedding)$"
)
# GPT-2 and its descendants implement these projections with Conv1D.
_CONV1D_NAME = re.compile(r"(c_attn|c_proj|c_fc|q_attn)$")
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "decision_transformer", "imagegpt", "clvp", "gpt_bigcode_conv1d"})



def weight_kind(name: TensorName, shape: tuple[int, ...], model_type: str | None) -> WeightKind:
    """Classify a checkpoint tensor by name, shape and the model's ``model_type`` (from config.json).

    Only 2-D ``*.weight`` tensors are factorizable. GPT-2-style names count as Conv1D when the model type says
    so, or when no config is at hand (a ``c_attn`` weight is a Conv1D in every model that uses the name).
    """
    module, param = split_tensor_name(name)
    if param != "weight" or len(shape) != 2:
        return WeightKind.OTHER
    leaf = module.rpartition(".")[2]
    if _EMBEDDING_NAME.search(leaf):
        return WeightKind.EMBEDDING
    if _CONV1D_NAME.fullmatch(leaf) and (model_type is None or model_type in _CONV1D_MODEL_TYPES):
        return WeightKind.CONV1D
    return WeightKind.LINEAR


# Input embeddings that an output head may be tied to (transformers' get_input_embeddings across the zoo).
_WORD_EMBEDDING_LEAVES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")


@dataclass(frozen=True)
class TiedHead:
    """An output head whose weight is the input embedding's (``tie_word_embeddings``), absent from the file.

    ``bias`` is a tensor saved under another module's name that is, in the model, the head's own bias
    (BERT's ``cls.predictions.bias`` is ``cls.predictions.decoder.bias``)."""

    head: ModuleName
    embedding: ModuleName
    bias: TensorName | None = None


def find_tied_head(names: Iterable[TensorName], config: dict) -> TiedHead | None:
    """The tied output head of a checkpoint, from its tensor names and config (headers only).

    Checkpoints written by transformers omit a tied head's weight; PEFT must still be told about the head, or an
    embedding delta reaches the input side only.
    """
    if not config.get("tie_word_embeddings", True):  # transformers' default is to tie
        return None
    names = list(names)
    embedding = next((n[: -len(".weight")] for n in names if n.endswith(".weight")
                      and n[: -len(".weight")].rpartition(".")[2] in _WORD_EMBEDDING_LEAVES), None)
    if embedding is None:
        return None
    heads = (("cls.predictions.decoder", "cls.predictions.bias"), ("lm_head.decoder", "lm_head.bias"), ("lm_head", None))
    if any(f"{head}.weight" in names for head, _ in heads):
        return None  # the head is saved: untied, or tied but written twice; either way it is its own tensor
    for head, bias in heads:
        if head == "lm_head":
            has_head = any(re.search(r"(ForCausalLM|LMHeadModel|ForConditionalGeneration)$", a)
                           for a in config.get("architectures") or [])
        else:
            has_head = any(n.startswith(head.partition(".")[0] + ".") for n in names)
        if has_head:
            return TiedHead(head, embedding, bias if bias in names else None)
    return None


def transpose_embedding_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An embedding's (A (r, vocab), B (dim, r)) as the tied head's Linear factors (A (r, dim), B (vocab, r)):
    ΔE = s·(B@A)ᵀ = s·Aᵀ@Bᵀ, so the head (vocab, dim) takes A_head = Bᵀ, B_head = Aᵀ."""
    return b.T.contiguous(), a.T.contiguous()


def to_out_in(weight: torch.Tensor, kind: WeightKind) -> torch.Tensor:
    """View a stored weight in PEFT's (out, in) orientation."""
    return weight if kind is WeightKind.LINEAR else weight.T


def from_out_in(matrix: torch.Tensor, kind: WeightKind) -> torch.Tensor:
    """Inverse of :func:`to_out_in`: an (out, in) matrix in the stored orientation of a ``kind`` weight."""
    return matrix if kind is WeightKind.LINEAR else matrix.T


def out_in_shape(shape: tuple[int, ...], kind: WeightKind) -> tuple[int, int]:
    out, inp = shape
    return (out, inp) if kind is WeightKind.LINEAR else (inp, out)


def lora_keys(module: ModuleName, kind: WeightKind) -> tuple[PeftKey, PeftKey]:
    """The (A, B) keys of a module's factors. Embeddings use ParameterDict entries, hence no ``.weight``."""
    if kind is WeightKind.EMBEDDING:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def magnitude_key(module: ModuleName) -> PeftKey:
    return f"{PEFT_PREFIX}{module}.lora_magnitude_vector"


def base_bias_key(module: ModuleName) -> PeftKey:
    """Where a LoRA-targeted module's replaced bias goes (``bias: "lora_only"``, PEFT_FORMAT.md §6)."""
    return f"{PEFT_PREFIX}{module}.base_layer.bias"


def saved_module_key(name: TensorName) -> PeftKey:
    """Where a ``modules_to_save`` module's parameter goes: its own name under the PEFT prefix."""
    return f"{PEFT_PREFIX}{name}"


def parse_peft_key(key: PeftKey) -> tuple[ModuleName, str]:
    """Split an adapter key into (module, role); role is one of ``lora_A``, ``lora_B``, ``magnitude``,
    ``base_bias`` or ``saved:<param>`` (a ``modules_to_save`` parameter). Raises ValueError otherwise."""
    if not key.startswith(PEFT_PREFIX):
        raise ValueError(f"adapter key {key!r} does not start with {PEFT_PREFIX!r}")
    rest = key[len(PEFT_PREFIX):]
    for suffix, role in (
        (".lora_A.weight", "lora_A"),
        (".lora_B.weight", "lora_B"),
        (".lora_embedding_A", "lora_A"),
        (".lora_embedding_B", "lora_B"),
        (".lora_magnitude_vector", "magnitude"),
        (".base_layer.bias", "base_bias"),
    ):
        if rest.endswith(suffix):
            return rest[: -len(suffix)], role
    module, param = split_tensor_name(rest)
    return module, f"saved:{param}"


def module_pattern(module: ModuleName) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that selects exactly this module.

    PEFT tries ``re.match(r"(.*\\.)?(KEY)$", name)`` with each key in order; ``^`` anchors the key to the start of
    the module name, so an escaped full name with ``^`` matches that module and nothing else.
    """
    return "^" + re.escape(module)


def target_modules(modules: list[ModuleName], all_modules: Iterable[ModuleName]) -> list[ModuleName] | str:
    """A ``target_modules`` value that selects exactly ``modules`` among ``all_modules``.

    A list of full names is preferred: PEFT recognises tied embeddings only in a list. PEFT matches a list entry
    by equality or by ``name.endswith("." + entry)``, so where some other module's name ends with a target's
    full name, an anchored regex (which PEFT fullmatches) is used instead.
    """
    targets = set(modules)
    clash = any(m not in targets and any(m.endswith("." + t) for t in targets) for m in all_modules)
    if clash:
        return "^(" + "|".join(re.escape(m) for m in modules) + ")$"
    return list(modules)


