"""Plain greedy decoding with transformers' own forward and cache: the ground truth that
speculative output must equal. (Not `generate(min_new_tokens=...)`: that masks EOS.)"""

from __future__ import annotations

import inspect

import torch


@torch.inference_mode()
def hf_greedy(model: torch.nn.Module, prompt_ids: list[int], n: int) -> list[int]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    feed = torch.tensor([prompt_ids])
    out: list[int] = []
    for _ in range(n):
        logits = model(input_ids=feed, use_cache=True, **{cache_arg: cache}).logits
        out.append(int(logits[0, -1].argmax()))
        feed = torch.tensor([[out[-1]]])
    return out
