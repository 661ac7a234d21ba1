"""Who will load an adapter (``--for peft|vllm``), and so what the writer may put into it.

PEFT loads everything deltakit writes: per-module ranks and alphas through ``rank_pattern``/``alpha_pattern``,
changed biases as ``base_layer.bias``, and any other changed module whole through ``modules_to_save``. vLLM's
loader takes a subset. Its rules, as read in vLLM's source (vllm-project/vllm, ``vllm/lora/``):

1. ``peft_helper.py::PEFTHelper._validate_features`` (called from ``validate_legal``): ``modules_to_save`` must be
   empty and ``use_dora`` false, or the adapter is refused; ``lora_model.py::LoRAModel.from_lora_tensors`` raises
   NotImplementedError on ``use_dora`` and on ``lora_magnitude_vector`` keys.
2. ``PEFTHelper.validate_legal``: ``bias`` must be ``"none"`` (any other value needs ``bias_enabled``, which later
   versions removed); ``r`` must not exceed the server's ``--max-lora-rank``.
3. ``PEFTHelper.__post_init__``: one scaling for every module, ``lora_alpha / r`` (``/ √r`` with ``use_rslora``),
   from the top-level fields; ``LoRALayerWeights.from_config`` gives that scaling to each module.
4. ``PEFTHelper.from_dict`` keeps only its own fields (``r``, ``lora_alpha``, ``target_modules``, ``bias``,
   ``modules_to_save``, ``use_rslora``, ``use_dora``, ...): ``rank_pattern``, ``alpha_pattern`` and
   ``fan_in_fan_out`` are dropped without a word. Per-module ranks still load (each factor is copied by its own
   shape, ``set_lora``), but every module gets rule 3's scaling.
5. ``utils.py::parse_fine_tuned_lora_name``: the only keys are ``<module>.lora_A.weight``, ``.lora_B.weight``,
   ``.lora_embedding_A`` and ``.lora_embedding_B``; any other key (``base_layer.bias``, a saved norm) raises
   "is unsupported LoRA weight" (``utils.py::is_base_embedding_weights`` skips only
   ``embed_tokens/lm_head.base_layer.weight``).
6. ``lora_model.py::LoRAModel.from_local_checkpoint`` (``check_unexpected_modules``): each module's last name must
   be one vLLM's model class supports (its Linear layers, through ``packed_modules_mapping``, plus its
   ``embedding_modules``); and ``from_lora_tensors``: ``lora_embedding_A`` must span exactly the base's vocabulary
   (vLLM removed LoRA extra vocabulary, so a resized embedding cannot load).

So ``vllm`` writes: no ``modules_to_save``, ``bias: "none"``, no DoRA, ``r`` = the largest module rank, and every
module's factors rescaled so that the one top-level scaling is right for all of them (``rank_pattern`` and a
matching ``alpha_pattern`` are still written for PEFT, which needs them to size each module; vLLM ignores them and
needs nothing from them). Changed norms are folded into the Linear layers that read them (see
:mod:`deltakit.adapters.architectures`); what still cannot be written is dropped and reported with its size.
"""

from __future__ import annotations

from collections import Counter
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

    def config_rank_alpha(self, factors: list[ModuleFactors], alpha: float | None, use_rslora: bool,
                          fallback_rank: int) -> tuple[int, float]:
        """The config's ``r`` and ``lora_alpha``; modules that differ get ``rank_pattern``/``alpha_pattern`` entries.
        PEFT: the commonest rank, and ``alpha`` (default: that rank)."""
        ranks = Counter(f.rank for f in factors)
        rank = ranks.most_common(1)[0][0] if ranks else fallback_rank
        return rank, float(alpha if alpha is not None else rank)


class VllmProfile(ExportProfile):
    """vLLM's loader (rules 1-6 above), for one architecture."""

    name: Target = "vllm"

    def __init__(self, arch: Architecture) -> None:
        self.architecture = arch

    def lora_refusal(self, module: ModuleName, kind: WeightKind) -> str | None:
        leaf = module.rpartition(".")[2]
        if (kind is WeightKind.EMBEDDING or leaf == "lm_head") and leaf not in self.architecture.vllm_lora_embeddings:
            # rule 6: vLLM's class for this architecture lists no such module in embedding_modules
            return f"vLLM takes no LoRA on {leaf} for {self.architecture.model_type} (not in its embedding_modules)"
        return None

    def carry_refusal(self, is_bias: bool) -> str | None:
        if is_bias:
            return "vLLM loads no biases (PEFTHelper.validate_legal wants bias 'none'; no base_layer.bias key)"
        return "vLLM refuses modules_to_save (PEFTHelper._validate_features)"

    def config_rank_alpha(self, factors: list[ModuleFactors], alpha: float | None, use_rslora: bool,
                          fallback_rank: int) -> tuple[int, float]:
        """``r`` = the largest rank, so ``--max-lora-rank r`` admits every module (rule 2); each module's own
        scaling is folded into its B so that rule 3's single scaling reproduces it, and its alpha is restated so
        that PEFT, sizing the module from ``rank_pattern``, computes that same scaling."""
        rank = max((f.rank for f in factors), default=fallback_rank)
        config_alpha = float(alpha if alpha is not None else rank)
        scaling = lora_scaling(config_alpha, rank, use_rslora)
        for f in factors:
            if f.scaling != scaling:
                f.b = (f.b.float() * (f.scaling / scaling)).to(f.b.dtype)
            f.scaling = scaling
            f.alpha = scaling * (f.rank ** 0.5 if use_rslora else f.rank)
            if f.rank == rank:
                f.alpha = config_alpha  # exactly, so the module needs no alpha_pattern entry
        return rank, config_alpha


def export_profile(target: str, *, model_type: str | None, dora: bool) -> ExportProfile:
    """The profile for ``--for`` (``target``), checked against the model and the other options (headers only).

    Raises:
        InvalidOptionError: an unknown target; DoRA for vLLM (rule 1); an architecture whose norm readers deltakit
            does not know, for vLLM.
    """
    if target == "peft":
        return ExportProfile()
    if target != "vllm":
        raise InvalidOptionError(f"--for {target!r}: choose one of {', '.join(TARGETS)}")
    if dora:
        raise InvalidOptionError("--dora with --for vllm: vLLM does not load DoRA adapters "
                                 "(PEFTHelper._validate_features); drop one of the two")
    return VllmProfile(architecture(model_type, "--for vllm (which cannot carry norms)"))
