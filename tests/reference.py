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


def contingency(a: list[int], b: list[int], min_count: int = 10) -> list[list[int]]:
    """Two samples of tokens as a 2 x n table for a chi-square test of one distribution:
    a column per token seen at least `min_count` times in both together, the rarer ones
    pooled into one last column (a chi-square wants no tiny expected counts)."""
    from collections import Counter

    first, second = Counter(a), Counter(b)
    keys = [t for t in first.keys() | second.keys() if first[t] + second[t] >= min_count]
    rows = [[first[t] for t in keys], [second[t] for t in keys]]
    rest = [len(a) - sum(rows[0]), len(b) - sum(rows[1])]
    if sum(rest) > 0:
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    return rows
