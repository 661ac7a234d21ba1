"""Which Linear layers read each normalization layer's output, per architecture; and what vLLM's model class for
that architecture takes LoRA on.

A change of a norm's scale folds exactly into the Linear layers that read the norm's output
(:mod:`deltakit.math.norm_fold`), but only where every reader is a Linear applied directly to that output. That
is a fact about the architecture's forward pass, not something a checkpoint's tensor names reveal, so it is a
table keyed by the config's ``model_type``. An architecture that is not in the table is not guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from deltakit.errors import InvalidOptionError
from deltakit.names import ModuleName


@dataclass(frozen=True)
class NormReaders:
    """A norm module (a regex fullmatched against module names; named groups fill ``readers``) and the Linear
    modules that read its output and nothing else."""

    norm: str
    readers: tuple[str, ...]

    def readers_of(self, module: ModuleName) -> tuple[ModuleName, ...] | None:
        match = re.fullmatch(self.norm, module)
        return tuple(r.format(**match.groupdict()) for r in self.readers) if match else None


@dataclass(frozen=True)
class Architecture:
    model_type: str
    norms: tuple[NormReaders, ...]
    # The leaf names vLLM's model class lists in ``embedding_modules``: the embedding-like modules its LoRA
    # manager wraps (vllm/lora/utils.py::get_supported_lora_modules adds exactly these beside the Linear layers).
    vllm_lora_embeddings: frozenset[str]

    def readers_of(self, norm: ModuleName) -> tuple[ModuleName, ...] | None:
        """The modules that read ``norm``'s output, or None if ``norm`` is not a norm of this architecture."""
        return next((r for n in self.norms if (r := n.readers_of(norm)) is not None), None)


# Pre-norm decoders (transformers' LlamaDecoderLayer and its copies): input_layernorm feeds q/k/v only,
# post_attention_layernorm feeds gate/up only, the final norm feeds the output head only. The residual stream
# itself never passes through a norm's scale, so these readers are all of them.
_PRE_NORM_DECODER = (
    NormReaders(r"(?P<layer>model\.layers\.\d+)\.input_layernorm",
                ("{layer}.self_attn.q_proj", "{layer}.self_attn.k_proj", "{layer}.self_attn.v_proj")),
    NormReaders(r"(?P<layer>model\.layers\.\d+)\.post_attention_layernorm",
                ("{layer}.mlp.gate_proj", "{layer}.mlp.up_proj")),
    NormReaders(r"model\.norm", ("lm_head",)),
)

# vLLM 0.33 (vllm/model_executor/models/): LlamaForCausalLM declares embedding_modules {embed_tokens, lm_head};
# MistralForCausalLM (mistral.py) overrides it with {} ("We don't support LoRA on the embedding layers") and
# Qwen2ForCausalLM keeps SupportsLoRA's {}: an adapter with LoRA on either is refused there
# (vllm/lora/lora_model.py::LoRAModel.from_local_checkpoint, check_unexpected_modules).
ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("llama", _PRE_NORM_DECODER, frozenset({"embed_tokens", "lm_head"})),
        Architecture("mistral", _PRE_NORM_DECODER, frozenset()),
        Architecture("qwen2", _PRE_NORM_DECODER, frozenset()),
    )
}


def architecture(model_type: str | None, why: str) -> Architecture:
    """The table's entry for ``model_type``.

    Raises:
        InvalidOptionError: the architecture is not in the table; ``why`` says what needed it.
    """
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise InvalidOptionError(f"{why} needs to know which layers read each norm, and model_type "
                                 f"{model_type!r} is not in deltakit's table ({known}); deltakit does not guess")
    return arch


def norm_readers(arch: Architecture, modules: Iterable[ModuleName]) -> dict[ModuleName, tuple[ModuleName, ...]]:
    """Every norm among ``modules`` with the modules that read its output."""
    return {m: readers for m in modules if (readers := arch.readers_of(m)) is not None}
