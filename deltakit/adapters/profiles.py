"""Who will load an adapter (``--for peft|vllm``), and so what the writer may put into it.

PEFT loads everything deltakit writes: per-module ranks and alphas through ``rank_pattern``/``alpha_pattern``,
changed biases as ``base_layer.bias``, and any other changed module whole through ``modules_to_save``. vLLM's
loader takes a subset. Its rules, as read in vLLM 0.33.0's source (``vllm/lora/``; earlier versions differ where
noted):

1. ``peft_helper.py::PEFTHelper._validate_features`` (called by ``validate_legal``): ``modules_to_save`` may only
   name a classifier head (``classifier``/``score``); ``use_dora`` and ``lora_bias`` are refused. A
   ``lora_magnitude_vector`` key is not a key vLLM parses (rule 4).
2. ``PEFTHelper.validate_legal``: ``bias`` must be ``"none"`` ("Adapter bias is not supported"); the largest of
   ``r`` and the ``rank_pattern`` ranks must not exceed the server's ``--max-lora-rank`` (``config/lora.py``:
   one of 1, 8, 16, 32, 64, 128, 256, 320, 512).
3. ``PEFTHelper.__post_init__`` / ``get_rank_and_scaling`` and ``lora_weights.py::LoRALayerWeights.from_config``:
   each module's scaling is ``lora_alpha / r`` (``/ √r`` with ``use_rslora``), with ``rank_pattern`` and
   ``alpha_pattern`` resolved by PEFT's own first-match rule. Earlier versions, whose ``PEFTHelper`` has no
   ``rank_pattern`` field, keep only its declared fields in ``from_dict``, drop both patterns without a word, and
   give every module the top-level ``lora_alpha / r``.
4. ``utils.py::parse_fine_tuned_lora_name``: the keys it parses are ``<module>.lora_A.weight``, ``.lora_B.weight``,
   ``.lora_embedding_A`` and ``.lora_embedding_B`` (plus a classifier head's weight/bias); any other key
   (``base_layer.bias``, a saved norm) raises "is unsupported LoRA weight" (``is_base_embedding_weights`` skips only
   ``embed_tokens/lm_head.base_layer.weight``).
5. ``lora_model.py::LoRAModel.from_local_checkpoint`` (``check_unexpected_modules``): each module's last name must
   be one vLLM's model class supports (``utils.py::get_supported_lora_modules``: its Linear layers, plus the names
   in its ``embedding_modules``); ``LoRAModel.from_lora_tensors``: ``lora_embedding_A`` must span exactly the base's
   vocabulary (vLLM no longer has LoRA extra vocabulary, so a resized embedding cannot load).

So ``vllm`` writes: no ``modules_to_save``, ``bias: "none"``, no DoRA, ``r`` = the largest module rank, and every
module's factors rescaled so that the one top-level scaling is right for all of them. ``rank_pattern`` and a
matching ``alpha_pattern`` are still written (PEFT needs them to size each module); they restate that same scaling,
so a vLLM that reads them (0.33) and one that ignores them (older) compute the same thing. Changed norms are folded
into the Linear layers that read them (see :mod:`deltakit.adapters.architectures`); what still cannot be written is
dropped and reported with the size of its change.
"""

from __future__ import annotations

from typing import Literal

from deltakit.adapters.architectures import Architecture, architecture
from deltakit.adapters.layers import WeightKind
from deltakit.adapters.peft_format import ModuleFactors, lora_scaling
from deltakit.errors import InvalidOptionError
from deltakit.names import ModuleName

Target = Literal["peft", "vllm"]
TARGETS: tuple[Target, ...] = ("peft", "vllm")


class ExportProfile:
    """PEFT's profile: everything goes in. :class:`VllmProfile` narrows it."""

    name: Target = "peft"
    # The architecture whose changed norms are folded into the modules reading them; None: norms are not folded.
    architecture: Architecture | None = None

    def lora_refusal(self, module: ModuleName, kind: WeightKind) -> str | None:
        """Why this module may not have LoRA factors in the adapter, or None if it may."""
        return None

    def carry_refusal(self, is_bias: bool) -> str | None:
        """Why a changed tensor that is not factorized may not be carried (a factorized module's bias, or a whole
        module through ``modules_to_save``), or None if it may."""
        return None

    def config_rank_alpha(self, factors: list[ModuleFactors], alpha: float | None,
                          use_rslora: bool) -> dict[str, float | None]:
        """``r`` and ``lora_alpha`` for :func:`~deltakit.adapters.peft_format.adapter_spec`; modules that differ get
        ``rank_pattern``/``alpha_pattern`` entries. PEFT: ``adapter_spec``'s own choice (the commonest rank,
        ``alpha`` defaulting to it)."""
        return {"alpha": alpha}


class VllmProfile(ExportProfile):
    """vLLM's loader (rules 1-5 above), for one architecture."""

    name: Target = "vllm"

    def __init__(self, arch: Architecture) -> None:
        self.architecture = arch

    def lora_refusal(self, module: ModuleName, kind: WeightKind) -> str | None:
        leaf = module.rpartition(".")[2]
        if (kind is WeightKind.EMBEDDING or leaf == "lm_head") and leaf not in self.architecture.vllm_lora_embeddings:
            # rule 5: vLLM's class for this architecture lists no such module in embedding_modules
            return f"vLLM takes no LoRA on {leaf} for {self.architecture.model_type} (not in its embedding_modules)"
        return None

    def carry_refusal(self, is_bias: bool) -> str | None:
        if is_bias:  # rules 2 and 4
            return "vLLM loads no biases (PEFTHelper.validate_legal wants bias 'none'; no base_layer.bias key)"
        return "vLLM refuses modules_to_save (PEFTHelper._validate_features)"  # rule 1

    def config_rank_alpha(self, factors: list[ModuleFactors], alpha: float | None,
                          use_rslora: bool) -> dict[str, float | None]:
        """``r`` = the largest rank, so ``--max-lora-rank r`` admits every module (rule 2); each module's own
        scaling is folded into its B so that the top-level scaling reproduces it (rule 3, older vLLM), and its
        alpha is restated so that PEFT and vLLM 0.33, sizing the module from ``rank_pattern``, compute that same
        scaling. (The factors are rescaled in place.)"""
        if not factors:
            return {"alpha": alpha}
        rank = max(f.rank for f in factors)
        config_alpha = float(alpha if alpha is not None else rank)
        scaling = lora_scaling(config_alpha, rank, use_rslora)
        for f in factors:
            if f.scaling != scaling:
                f.b = (f.b.float() * (f.scaling / scaling)).to(f.b.dtype)
            f.scaling = scaling
            f.alpha = scaling * (f.rank ** 0.5 if use_rslora else f.rank)
            if f.rank == rank:
                f.alpha = config_alpha  # exactly, so the module needs no alpha_pattern entry
        return {"rank": rank, "alpha": config_alpha}


PEFT_PROFILE = ExportProfile()


def export_profile(target: str, *, model_type: str | None, variant_config: dict) -> ExportProfile:
    """The profile for ``--for`` (``target``), checked against the model and the variant's config keys (headers
    and options only).

    Raises:
        InvalidOptionError: an unknown target; for vLLM, a variant whose config keys it refuses (DoRA's
            ``use_dora``, rule 1) or an architecture whose norm readers deltakit does not know.
    """
    if target == "peft":
        return PEFT_PROFILE
    if target != "vllm":
        raise InvalidOptionError(f"--for {target!r}: choose one of {', '.join(TARGETS)}")
    refused = [key for key in ("use_dora", "lora_bias") if variant_config.get(key)]
    if refused:  # rule 1
        raise InvalidOptionError(f"--for vllm: vLLM does not load adapters with {', '.join(refused)} "
                                 "(PEFTHelper._validate_features); extract without --dora")
    return VllmProfile(architecture(model_type, "--for vllm (which cannot carry norms)"))
