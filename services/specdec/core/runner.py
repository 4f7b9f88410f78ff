"""Model runners: batched forward passes over many sessions' new tokens.

`ModelRunner` runs a Llama-family HF model (llama, mistral, qwen2, qwen3) layer by layer on
*flattened* tokens: the new tokens of every sequence in the batch are concatenated, so the
projections and MLPs run as one matrix product over all of them. Attention reads each
sequence's cache in place, in its slot of the runner's `KVPool`, batched across sessions
where their slots sit together (`core/attention.py`); nobody's context is copied. Other
architectures fall back to `HFRunner`, which calls the model's own forward per sequence
with a rolled-back DynamicCache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeGuard

import torch

from specdec.core.attention import BatchAttention
from specdec.core.kv_cache import KVPool, SessionKV
from specdec.core.linear import FusedLinear

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

FLAT_ARCHITECTURES = {"llama", "mistral", "qwen2", "qwen3"}


@dataclass
class ForwardItem:
    kv: SessionKV  # the sequence's cache; new tokens are appended after kv.length
    tokens: list[int]  # [num_new] token ids to run
    num_logits: int  # return logits for the last num_logits of them
    # A token tree: each token's parent among `tokens` (-1: the cached token before them).
    # None: a chain (token i follows token i-1). A token sits at the position of its depth
    # and attends to the cache and its own ancestors only (SpecInfer's tree attention).
    parents: list[int] | None = None

    def positions(self) -> list[int]:
        """Each token's position in its sequence: after the cache, at its depth in the tree."""
        start = self.kv.length
        if self.parents is None:
            return list(range(start, start + len(self.tokens)))
        out: list[int] = []
        for parent in self.parents:
            out.append(start if parent < 0 else out[parent] + 1)
        return out


TensorFn = Callable[[torch.Tensor], torch.Tensor]


class CausalLM(Protocol):
    """What the runners use of a transformers causal LM (a `PreTrainedModel`; its config's
    fields are dynamic, so transformers types them as Any)."""

    @property
    def config(self) -> PreTrainedConfig: ...

    forward: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def eval(self) -> Self: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.nn.Parameter]]: ...


class _Attention(Protocol):
    q_proj: torch.nn.Module
    k_proj: torch.nn.Module
    v_proj: torch.nn.Module
    o_proj: torch.nn.Module
    scaling: float
    q_norm: TensorFn  # qwen3 only: read after hasattr(attn, "q_norm")
    k_norm: TensorFn


class _MLP(Protocol):
    gate_proj: torch.nn.Module  # these four: gated MLPs only, read after _gated_mlp(mlp)
    up_proj: torch.nn.Module
    down_proj: torch.nn.Module
    act_fn: TensorFn

    def __call__(self, x: torch.Tensor, /) -> torch.Tensor: ...


class _DecoderLayer(Protocol):
    self_attn: _Attention
    mlp: _MLP
    input_layernorm: TensorFn
    post_attention_layernorm: TensorFn


class _Backbone(Protocol):
    layers: Iterable[_DecoderLayer]
    embed_tokens: TensorFn
    rotary_emb: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    norm: TensorFn


class FlatModel(CausalLM, Protocol):
    """A Llama-family causal LM (FLAT_ARCHITECTURES), as `ModelRunner` reads it."""

    model: _Backbone
    lm_head: torch.nn.Module


class Runner(Protocol):
    vocab_size: int
    max_context: int

    @property
    def model(self) -> CausalLM: ...

    def new_kv(self) -> SessionKV: ...

    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]: ...


def build_runner(model: CausalLM) -> Runner:
    """The fastest runner that supports this model."""
    if _flat_architecture(model):
        return ModelRunner(model)
    return HFRunner(model)


def _flat_architecture(model: CausalLM) -> TypeGuard[FlatModel]:
    return getattr(model.config, "model_type", "") in FLAT_ARCHITECTURES


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Flattened-batch runner for Llama-family decoder-only models."""

    supports_trees = True  # ForwardItem.parents: tree attention over the slotted cache

    def __init__(self, model: FlatModel, pack: bool = True) -> None:
        cfg = model.config
        self.model = model.eval()
        self.inner = model.model
        self.layers = list(self.inner.layers)
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = cfg.num_key_value_heads
        self.vocab_size: int = cfg.vocab_size
        self.max_context: int = cfg.max_position_embeddings
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.qkv = [
            FusedLinear([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], pack)
            for layer in self.layers
        ]
        self.o_proj = [FusedLinear([layer.self_attn.o_proj], pack) for layer in self.layers]
        self.gate_up = [
            FusedLinear([layer.mlp.gate_proj, layer.mlp.up_proj], pack) if _gated_mlp(layer.mlp) else None
            for layer in self.layers
        ]
        self.down = [
            FusedLinear([layer.mlp.down_proj], pack) if _gated_mlp(layer.mlp) else None for layer in self.layers
        ]
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
        if any(item.parents is not None for item in items):
            positions = torch.tensor([p for item in items for p in item.positions()], device=self.device)
        else:
            positions = torch.cat([torch.arange(s, s + n, device=self.device) for s, n in zip(starts, sizes)])
        hidden = self.inner.embed_tokens(ids)  # [num_tokens, hidden]
        cos, sin = self.inner.rotary_emb(hidden[None], positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]  # [num_tokens, 1, head_dim]
        attention = BatchAttention(
            [item.kv for item in items],
            starts,
            sizes,
            self.num_heads,
            self.num_kv_heads,
            self.device,
            [item.parents for item in items],
        )
        for layer_idx, layer in enumerate(self.layers):
            hidden = self._layer(layer_idx, layer, hidden, cos, sin, attention)
        for item in items:
            item.kv.commit(item.tokens)
        return self._logits(hidden, sizes, [item.num_logits for item in items])

    def _layer(
        self,
        layer_idx: int,
        layer: _DecoderLayer,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: BatchAttention,
    ) -> torch.Tensor:
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

    def _mlp(self, layer_idx: int, layer: _DecoderLayer, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.gate_up[layer_idx], self.down[layer_idx]
        if gate_up is None or down is None:  # both or neither (see _gated_mlp)
            return layer.mlp(x)
        gate, up = gate_up.split(gate_up(x))
        return down(layer.mlp.act_fn(gate) * up)

    def _logits(self, hidden: torch.Tensor, sizes: list[int], wanted: list[int]) -> list[torch.Tensor]:
        rows: list[torch.Tensor] = []
        offset = 0
        for size, count in zip(sizes, wanted):
            rows.append(torch.arange(offset + size - count, offset + size, device=hidden.device))
            offset += size
        if not sum(wanted):  # prefill chunks only
            return [hidden.new_empty(0, self.vocab_size, dtype=torch.float32) for _ in wanted]
        picked = self.inner.norm(hidden[torch.cat(rows)])
        logits = self.lm_head(picked).float()
        return list(torch.split(logits, wanted))


def _gated_mlp(mlp: object) -> bool:
    return all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


class HFRunner:
    """Any HF causal LM: the model's own forward per sequence, cache cropped on rollback.

    Slower (no cross-session batching) but exact; used for architectures the flattened
    runner does not know. Chains only: a caller flattens a token tree first.
    """

    supports_trees = False

    def __init__(self, model: CausalLM) -> None:
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        self.model = model.eval()
        cfg = model.config
        self.vocab_size: int = cfg.vocab_size
        self.max_context: int = getattr(cfg, "max_position_embeddings", 1 << 30)
        self.device = next(model.parameters()).device
        # transformers 5.24 renamed the cache argument (the old name goes in 5.40).
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def new_kv(self) -> SessionKV:
        kv = SessionKV(None)
        kv.hf_cache = self._cache_cls(config=self.model.config)
        return kv

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for item in items:
            assert item.parents is None, "HFRunner runs chains only"
            cache = item.kv.hf_cache
            assert cache is not None, "a cache from another runner"
            excess = cache.get_seq_length() - item.kv.length
            if excess > 0:
                # A negative count removes that many tokens (transformers 5 rejects an
                # absolute length here; older versions accept both).
                cache.crop(-excess)
            ids = torch.tensor([item.tokens], device=self.device)
            result = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache})
            item.kv.commit(item.tokens)
            out.append(result.logits[0, len(item.tokens) - item.num_logits :].float())  # none for a prefill chunk
        return out
