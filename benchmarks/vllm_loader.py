"""Load ``extract --for vllm`` adapters through vLLM's own loader code, on CPU, and compare with the fine-tune.

vLLM's serving stack needs a GPU, but the code that reads an adapter is plain Python: ``PEFTHelper`` (config
checks, per-module rank and scaling), ``LoRAModel.from_local_checkpoint`` (key parsing, unexpected modules,
vocabulary check) and ``LoRALayerWeights``. This script runs exactly those files from a vLLM wheel, with only their
heavy imports (logger, config, GPU layers) replaced by stubs, the way ``WorkerLoRAManager._load_adapter`` calls
them; then it adds each loaded module's ``scaling · lora_b @ lora_a`` to the base weights and compares logits with
the fine-tune and with PEFT. The peer row is what PEFT-style extractors write by default (norms in
``modules_to_save``): vLLM refuses it.

Get vLLM's source (no install needed)::

    pip download vllm==0.33.0 --no-deps -d /tmp/vllm_whl
    unzip -q /tmp/vllm_whl/vllm-0.33.0-*.whl 'vllm/*' -d /tmp/vllm_src

Run from the repository root: ``python benchmarks/vllm_loader.py --vllm-src /tmp/vllm_src`` (about a minute).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from builders import ModelPair, load_model, logits, make_pair, make_perturbed_pair  # noqa: E402
from peft import PeftModel  # noqa: E402

import deltakit  # noqa: E402

# What WorkerLoRAManager passes as expected_lora_modules: the model class's Linear leaf names (packed modules
# expanded) plus its embedding_modules (LlamaForCausalLM: embed_tokens, lm_head; Qwen2ForCausalLM: none).
_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
EXPECTED_MODULES = {"llama": _LINEARS | {"embed_tokens", "lm_head"}, "qwen2": _LINEARS}
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


class _Logger(logging.Logger):
    def info_once(self, *args, **kwargs) -> None: ...
    def warning_once(self, *args, **kwargs) -> None: ...
    def debug_once(self, *args, **kwargs) -> None: ...


@dataclass
class _LoRAConfig:  # vllm/config/lora.py::LoRAConfig, the one field validate_legal reads
    max_lora_rank: int = 16


def _stub(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _load_vllm_loader(src: Path) -> tuple[type, type]:
    """vLLM's PEFTHelper and LoRAModel, from ``src/vllm/lora``; their GPU-side imports stubbed."""
    for package in ("vllm", "vllm.lora", "vllm.config", "vllm.model_executor", "vllm.model_executor.models",
                    "vllm.utils"):
        _stub(package)
    _stub("vllm.logger", init_logger=_Logger)
    _stub("vllm.config.lora", LoRAConfig=_LoRAConfig)
    _stub("vllm.model_executor.models.utils", WeightsMapper=object)
    _stub("vllm.utils.torch_utils", PIN_MEMORY=False)
    # vllm/lora/utils.py imports every LoRA layer class; lift out the three functions the loader calls.
    utils_source = (src / "vllm/lora/utils.py").read_text()
    wanted = {"get_lora_id", "parse_fine_tuned_lora_name", "is_base_embedding_weights", "_GLOBAL_LORA_ID"}
    segments = [ast.get_source_segment(utils_source, node) for node in ast.parse(utils_source).body
                if getattr(node, "name", None) in wanted
                or isinstance(node, ast.Assign) and any(getattr(t, "id", None) in wanted for t in node.targets)]
    utils = _stub("vllm.lora.utils")
    exec("from typing import Optional\n" + "\n\n".join(segments), utils.__dict__)  # noqa: S102 - vLLM's own code
    modules = {}
    for name in ("peft_helper", "lora_weights", "lora_model"):
        spec = importlib.util.spec_from_file_location(f"vllm.lora.{name}", src / f"vllm/lora/{name}.py")
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = modules[name]
        spec.loader.exec_module(modules[name])
    return modules["peft_helper"].PEFTHelper, modules["lora_model"].LoRAModel


def _apply(pair: ModelPair, lora_model) -> torch.nn.Module:
    """The untied base plus every module vLLM loaded: W + scaling·B@A (embeddings transposed)."""
    model = load_model(pair.base_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, weights in lora_model.loras.items():
            delta = weights.scaling * (weights.lora_b.float() @ weights.lora_a.float())
            param = params[f"{name}.weight"]
            param.add_(delta if param.shape == delta.shape else delta.T)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-src", type=Path, required=True, help="directory holding vllm/ (from the wheel)")
    args = parser.parse_args()
    peft_helper_cls, lora_model_cls = _load_vllm_loader(args.vllm_src)
    root = Path(tempfile.mkdtemp())
    llama = make_pair(root / "llama", "llama")
    qwen2 = make_pair(root / "qwen2", "qwen2")
    qwen2_norms = make_perturbed_pair(root / "qwen2_norms", "qwen2",
                                      r"model\.layers\.\d+\.(.*layernorm|(self_attn|mlp)\.\w+_proj)\.weight")
    cases = [
        ("llama full FT, full rank", llama, "llama", dict(rank=128, svd="exact", target="vllm")),
        ("llama, budget + alpha 5 + rsLoRA", llama, "llama", dict(avg_rank=3, alpha=5.0, use_rslora=True,
                                                                  target="vllm")),
        ("qwen2 norms + Linear changed, full rank", qwen2_norms, "qwen2", dict(rank=128, svd="exact", target="vllm")),
        ("qwen2 full FT, full rank", qwen2, "qwen2", dict(rank=128, svd="exact", target="vllm")),
        ("peer: llama, default PEFT profile", llama, "llama", dict(rank=16)),
    ]
    print("| adapter | vLLM loads | modules | scalings | max abs logits − fine-tune | max abs logits − PEFT "
          "| dropped |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (label, pair, arch, options) in enumerate(cases):
        out = root / f"adapter{i}"
        report = deltakit.extract(pair.ft_dir, pair.base_dir, out, **options)
        config = json.loads((out / "adapter_config.json").read_text())
        try:
            helper = peft_helper_cls.from_local_dir(str(out), None)
            helper.validate_legal(_LoRAConfig(max_lora_rank=max(8, config["r"])))
            loaded = lora_model_cls.from_local_checkpoint(str(out), EXPECTED_MODULES[arch], helper, lora_model_id=1,
                                                          device="cpu", model_vocab_size=pair.config.vocab_size)
        except (ValueError, RuntimeError, NotImplementedError) as e:
            print(f"| {label} | no: {str(e)[:90]}… | | | | | {len(report.fates('dropped'))} |")
            continue
        merged = logits(_apply(pair, loaded), INPUT_IDS)
        peft = logits(PeftModel.from_pretrained(load_model(pair.base_dir), out), INPUT_IDS)
        scalings = ", ".join(f"{s:g}" for s in sorted({round(w.scaling, 6) for w in loaded.loras.values()}))
        print(f"| {label} | yes | {len(loaded.loras)} | {scalings} "
              f"| {(merged - logits(pair.ft_dir, INPUT_IDS)).abs().max():.2g} | {(merged - peft).abs().max():.2g} "
              f"| {len(report.fates('dropped'))} |")


if __name__ == "__main__":
    main()
