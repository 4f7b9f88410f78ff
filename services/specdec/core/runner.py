"""Model runners: batched forward passes over many sessions' new tokens.

`ModelRunner` runs a Llama-family HF model (llama, mistral, qwen2, qwen3) layer by layer on
*flattened* tokens: the new tokens of every sequence in the batch are concatenated, so the
projections and MLPs run as one matrix product over all of them. Attention reads each
sequence's cache in place, in its slot of the runner's `KVPool`, batched across sessions
where their slots sit together (`core/attention.py`); nobody's context is copied. Other architectures fall back to `HFRunner`, which calls the model's
own forward per sequence with a rolled-back DynamicCache.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch

from specdec.core.attention import BatchAttention
from specdec.core.kv_cache import KVPool, SessionKV
from specdec.core.linear import FusedLinear

FLAT_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class ForwardItem:
    kv: SessionKV  # the sequence's cache; new tokens are appended after kv.length
    tokens: list[int]  # [num_new] token ids to run
    num_logits: int  # return logits for the last num_logits of them


class Runner(Protocol):
    vocab_size: int
    max_context: int

    def new_kv(self) -> SessionKV: ...

    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]: ...


def build_runner(model: torch.nn.Module) -> Runner:
    """The fastest runner that supports this model."""
    if getattr(model.config, "model_type", "") in FLAT_ARCHITECTURES:
        return ModelRunner(model)
    return HFRunner(model)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Flattened-batch runner for Llama-family decoder-only models."""

    def __init__(self, model: torch.nn.Module, pack: bool = True) -> None:
        cfg = model.config
        self.model = model.eval()
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.vocab_size = cfg.vocab_size
        self.max_context = cfg.max_position_embeddings
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.qkv = [FusedLinear([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj], pack) for l in self.layers]
        self.o_proj = [FusedLinear([l.self_attn.o_proj], pack) for l in self.layers]
        self.gate_up = [FusedLinear([l.mlp.gate_proj, l.mlp.up_proj], pack) if _gated_mlp(l.mlp) else None
                        for l in self.layers]
        self.down = [FusedLinear([l.mlp.down_proj], pack) if _gated_mlp(l.mlp) else None for l in self.layers]
        self.lm_head = FusedLinear([model.lm_head], pack)
        self.pool = KVPool(len(self.layers), self.num_kv_heads, self.head_dim, self.dtype, self.device)

    def new_kv(self) -> SessionKV:
        return SessionKV(self.pool)

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        """Run every item's new tokens; append their KV; return float32 logits per item
        ([num_logits, vocab])."""
        assert all(item.tokens for item in items), "each item needs at least one token"
        starts = [item.kv.length for item in items]
        sizes = [len(item.tokens) for item in items]
        for item, start, size in zip(items, starts, sizes):
            if start + size > self.max_context:
                raise ValueError(f"sequence of {start + size} tokens exceeds the context of {self.max_context}")
            item.kv.reserve(start + size)
        ids = torch.tensor([t for item in items for t in item.tokens], device=self.device)
        positions = torch.cat([torch.arange(s, s + n, device=self.device) for s, n in zip(starts, sizes)])
        hidden = self.inner.embed_tokens(ids)  # [num_tokens, hidden]
        cos, sin = self.inner.rotary_emb(hidden[None], positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [num_tokens, 1, head_dim]
        attention = BatchAttention([item.kv for item in items], starts, sizes, self.num_heads, self.num_kv_heads,
                                   self.device)
        for layer_idx, layer in enumerate(self.layers):
            hidden = self._layer(layer_idx, layer, hidden, cos, sin, attention)
        for item in items:
            item.kv.commit(item.tokens)
        return self._logits(hidden, sizes, [item.num_logits for item in items])

    def _layer(self, layer_idx: int, layer: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, attention: BatchAttention) -> torch.Tensor:
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        n = x.shape[0]
        qkv = self.qkv[layer_idx]
        q, k, v = qkv.split(qkv(x))
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # qwen3 normalises q and k per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = attention(layer_idx, q, k, v, attn.scaling)
        hidden = hidden + self.o_proj[layer_idx](out.reshape(n, -1))
        return hidden + self._mlp(layer_idx, layer, layer.post_attention_layernorm(hidden))

    def _mlp(self, layer_idx: int, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up[layer_idx]
        if gate_up is None:
            return layer.mlp(x)
        gate, up = gate_up.split(gate_up(x))
        return self.down[layer_idx](layer.mlp.act_fn(gate) * up)

    def _logits(self, hidden: torch.Tensor, sizes: list[int], wanted: list[int]) -> list[torch.Tensor]:
        rows, offset = [], 0
        for size, count in zip(sizes, wanted):
            rows.append(torch.arange(offset + size - count, offset + size, device=hidden.device))
            offset += size
        picked = self.inner.norm(hidden[torch.cat(rows)])
        logits = self.lm_head(picked).float()
        return list(torch.split(logits, wanted))


def _gated_mlp(mlp: torch.nn.Module) -> bool:
    return all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


class HFRunner:
    """Any HF causal LM: the model's own forward per sequence, cache cropped on rollback.

    Slower (no cross-session batching) but exact; used for architectures the flattened
    runner does not know.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        self.model = model.eval()
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.max_context = getattr(cfg, "max_position_embeddings", 1 << 30)
        self.device = next(model.parameters()).device
        # transformers 5.24 renamed the cache argument (the old name goes in 5.40).
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def new_kv(self) -> SessionKV:
        kv = SessionKV(None)
        kv.hf_cache = self._cache_cls(config=self.model.config)  # type: ignore[attr-defined]
        return kv

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        out = []
        for item in items:
            cache = item.kv.hf_cache  # type: ignore[attr-defined]
            excess = cache.get_seq_length() - item.kv.length
            if excess > 0:
                # A negative count removes that many tokens (transformers 5 rejects an
                # absolute length here; older versions accept both).
                cache.crop(-excess)
            ids = torch.tensor([item.tokens], device=self.device)
            result = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache})
            item.kv.commit(item.tokens)
            out.append(result.logits[0, -item.num_logits:].float())
        return out
