"""Seeded tiny llamas saved as HF model directories with the real SmolLM2 tokenizer, so
the tiers load them like any model and text prompts work."""

from __future__ import annotations

from pathlib import Path

import torch


def save_llama(
    path: Path,
    tokenizer,
    seed: int,
    layers: int,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 512,
    init_from: Path | None = None,
) -> Path:
    """With init_from, the first `layers` layers, embeddings and head are copied from that
    model: an early-exit draft that agrees with it often, not always."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    if init_from is not None:
        source = LlamaForCausalLM.from_pretrained(init_from).state_dict()
        model.load_state_dict({k: v for k, v in source.items() if k in model.state_dict()})
    else:
        with torch.no_grad():  # larger logits: fewer near-ties between the top tokens
            model.lm_head.weight.mul_(8)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
