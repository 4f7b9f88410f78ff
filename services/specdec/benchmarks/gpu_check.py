"""`make gpu-check`: the engine on a GPU with models of real shapes, in one short run.

A device machine has PyTorch and transformers and nothing else: no model downloads, no
PyPI. So the models are built on the spot with seeded random weights, a Llama-3.2-1B-shaped
target and a SmolLM2-135M-shaped draft over the same vocabulary, and handed to the
in-process `Engine` directly (no files, no tokenizer: requests carry token ids). A random
draft agrees with a random target about never, so the draft model is also measured set
equal to the target (`model:self`): acceptance near 1, up to the numerics of a one-row
draft pass against a k+1-row verify pass.

Phases, time-boxed from one budget (what a budget cut is listed under `cut` in the JSON):

1. `greedy` (never cut): our plain and speculative output (n-gram, suffix, the draft
   model, the target as its own draft) against transformers' `generate` on the same device
   and dtype. A mismatch is reported with the logit gap at the first differing token under
   transformers' own logits: in bf16 two kernels may round a near-tie apart; a gap above
   the tolerance is a real failure (exit status 1). `sampled` (never cut) runs a few
   sampled requests per drafter as a smoke test.
2. `verify_pass`: one target forward over r rows, r = 1..512 (r/8 sequences of 8 rows as
   a k=7 verify, and r sequences of 1 row), ms per pass, synchronised; `draft_decode` the
   same for the draft model, one row per sequence.
3. `syncs`: device-to-host transfer points (`.tolist()`, `.item()`, `.cpu()`, `int()`,
   `float()`, `bool()`, ...) called per verify batch and per draft batch, by batch size.
4. `concurrency`: aggregate tokens/s at 1..64 requests in flight, plain and each drafter,
   as many levels as the rest of the budget holds.

JSON (`gpu_check.json`) and a PNG (`gpu_check.png`, if matplotlib imports) go to `--out`,
else `$OUT`, else `build/gpu-check/`; a table is printed.

    PYTHONPATH=services python3 -m specdec.benchmarks.gpu_check                  # cuda, bfloat16
    python -m specdec.benchmarks.gpu_check --device cpu --tiny --out /tmp/check  # the same checks, tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from specdec.core import compute
from specdec.core.engine import Engine
from specdec.core.models import parse_dtype
from specdec.core.request import RequestSpec
from specdec.core.runner import ForwardItem, Runner

if TYPE_CHECKING:
    from transformers import PreTrainedModel

T = TypeVar("T")
# Phases' shares of the time budget; a phase that ends early leaves its time to the later ones.
# A phase is skipped whole only when the run is this far past its budget (of the budget):
# below that it still runs its smallest unit, every section gets figures.
SKIP_GRACE = 0.25
# The elastic phase (concurrency: as many levels as fit) runs last and takes what is left.
SHARES = {"greedy": 0.14, "sampled": 0.03, "verify_pass": 0.16, "syncs": 0.09, "concurrency": 0.58}
VERIFY_ROWS_PER_SEQUENCE = 8  # the verify series: sequences drafting k=7
# Transfer points counted in the syncs phase: each copies a device tensor to the host.
TRANSFER_METHODS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@dataclass(frozen=True)
class Shape:
    """A Llama-family decoder's dimensions."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


TARGET_1B = Shape(2048, 16, 32, 8, 8192, 49152)  # Llama-3.2-1B's body, on SmolLM2's vocabulary
DRAFT_135M = Shape(576, 30, 9, 3, 1536, 49152)  # SmolLM2-135M
TINY_TARGET = Shape(64, 2, 4, 2, 128, 256)
TINY_DRAFT = Shape(32, 2, 2, 1, 64, 256)


@dataclass
class CheckConfig:
    device: str
    dtype: str
    out: Path
    tiny: bool = False
    # For the phases; building the models (~30 s on a GPU) comes before. A phase may overrun
    # its deadline by its smallest unit of work, the whole run by up to SKIP_GRACE of this.
    budget_s: float = 360.0
    seed: int = 0
    prompts: int = 4
    prompt_len: int = 128
    new_tokens: int = 64
    k: int = 4  # draft length of the greedy checks; the concurrency runs adapt up to it
    rows: list[int] = field(default_factory=lambda: [2**i for i in range(10)])  # 1..512
    context: int = 256  # cached tokens per sequence in the verify-pass sweep
    repeats: int = 7  # timed passes per row count (the median is kept)
    concurrency: list[int] = field(default_factory=lambda: [2**i for i in range(7)])  # 1..64
    waves: int = 2  # requests per concurrency level, in multiples of the level
    sync_levels: list[int] = field(default_factory=lambda: [1, 8, 32])
    drafters: list[str] = field(default_factory=lambda: ["ngram", "suffix", "model:draft", "model:self"])

    @property
    def shapes(self) -> tuple[Shape, Shape]:
        return (TINY_TARGET, TINY_DRAFT) if self.tiny else (TARGET_1B, DRAFT_135M)

    @classmethod
    def tiny_run(cls, device: str, dtype: str, out: Path, budget_s: float = 60.0) -> CheckConfig:
        """The same phases at toy sizes: well under a minute on two busy CPU cores."""
        return cls(
            device, dtype, out, tiny=True, budget_s=budget_s, prompts=3, prompt_len=24, new_tokens=12,
            rows=[1, 4, 16, 64], context=32, repeats=3, concurrency=[1, 4], waves=1, sync_levels=[1, 4],
        )  # fmt: skip


class Budget:
    """Phase deadlines from one overall budget: each phase gets its share of what is left."""

    def __init__(self, total_s: float, shares: dict[str, float]) -> None:
        self.end, self.total_s = time.monotonic() + total_s, total_s
        self.shares = dict(shares)
        self.cut: list[str] = []  # what was skipped for time, in words

    def phase(self, name: str) -> float:
        share = self.shares.pop(name)
        now = time.monotonic()
        return now + max(0.0, self.end - now) * share / (share + sum(self.shares.values()))


class IdTokenizer:
    """Random models have no vocabulary: requests carry token ids, and text is the ids
    spelled out (only the detokenizer reads it)."""

    eos_token_id: int | None = None

    def decode(self, token_ids: list[int], /, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{int(t)}>" for t in token_ids)

    def encode(self, text: str, /, *, add_special_tokens: bool = True) -> list[int]:
        raise ValueError("the gpu check's models have no vocabulary: send token ids")

    def apply_chat_template(
        self, conversation: list[dict[str, str]], /, *, add_generation_prompt: bool = True, tokenize: bool = True
    ) -> Any:
        raise ValueError("the gpu check's models have no chat template: send token ids")


def build_model(shape: Shape, seed: int, device: str, dtype: str, max_context: int) -> PreTrainedModel:
    """Seeded random weights of `shape`, built on the device (no 5 GB float32 copy on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_context,
        # An untied head: tied to the embeddings, a random model mostly repeats its last
        # token, which would make every check trivially easy.
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,  # no EOS: every run goes to max_new_tokens
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model: PreTrainedModel = LlamaForCausalLM(config)
    torch.nn.Module.to(model, dtype=parse_dtype(dtype))  # in place (transformers' own `to` hides its types)
    torch.nn.Module.eval(model)
    return model


def make_prompts(cfg: CheckConfig, vocab: int) -> list[list[int]]:
    """Seeded random prompts; the first repeats a short pattern so the n-gram drafter has
    something to copy."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    prompts = [torch.randint(0, vocab, (cfg.prompt_len,), generator=gen).tolist() for _ in range(cfg.prompts)]
    pattern = prompts[0][:8]
    prompts[0] = (pattern * (cfg.prompt_len // len(pattern) + 1))[: cfg.prompt_len]
    return prompts


@dataclass
class Setup:
    cfg: CheckConfig
    target: PreTrainedModel
    draft: PreTrainedModel
    main: Engine  # serves none, every model-free drafter (ngram, suffix) and model:draft
    self_draft: Engine  # model:self: the target drafts for itself
    prompts: list[list[int]]
    reference: list[list[int]] = field(default_factory=list)  # transformers' greedy output per prompt

    def engine(self, drafter: str) -> Engine:
        return self.self_draft if drafter == "model:self" else self.main


def setup(cfg: CheckConfig) -> tuple[Setup, dict[str, Any]]:
    started = time.perf_counter()
    target_shape, draft_shape = cfg.shapes
    max_context = max(cfg.prompt_len + cfg.new_tokens, cfg.context + VERIFY_ROWS_PER_SEQUENCE) + 64
    target = compute.run_sync(build_model, target_shape, cfg.seed, cfg.device, cfg.dtype, max_context)
    draft = compute.run_sync(build_model, draft_shape, cfg.seed + 1, cfg.device, cfg.dtype, max_context)
    tokenizer = IdTokenizer()
    main = Engine(target, tokenizer, drafter="ngram", draft_model=draft, draft_model_name="draft")
    self_draft = Engine(target, tokenizer, drafter="ngram", draft_model=target, draft_model_name="self")
    top = max(cfg.concurrency + cfg.sync_levels)
    for engine in (main, self_draft):  # the engine's default cap (32) would flatten the top levels
        engine.verifier.batcher.max_batch_size = engine.drafter.batcher.max_batch_size = max(32, top)
    info: dict[str, Any] = {
        "target": asdict(target_shape) | {"parameters": _parameters(target)},
        "draft": asdict(draft_shape) | {"parameters": _parameters(draft)},
        "max_batch_size": max(32, top),
        "build_s": round(time.perf_counter() - started, 2),
    }
    return Setup(cfg, target, draft, main, self_draft, make_prompts(cfg, target_shape.vocab)), info


def _parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def greedy_spec(prompt: list[int], n: int, drafter: str, k: int, adaptive: bool | None = False) -> RequestSpec:
    return RequestSpec(
        token_ids=list(prompt), max_new_tokens=n, ignore_eos=True, drafter=drafter, max_draft_tokens=k,
        adaptive=adaptive,
    )  # fmt: skip


@torch.inference_mode()
def hf_generate(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, len(prompt) :].tolist()]


def tie_tolerance(dtype: torch.dtype) -> float:
    """A logit gap this small, relative to the largest logit, is a near-tie: 4 units in the
    last place of the model's dtype, which two correct kernels may round apart."""
    return 4 * torch.finfo(dtype).eps


@torch.inference_mode()
def divergence(model: PreTrainedModel, prompt: list[int], ref: list[int], got: list[int]) -> dict[str, Any] | None:
    """Where `got` first leaves transformers' `ref`, and by how much transformers' own
    logits there prefer its token (None when identical)."""
    at = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if at is None:
        return None if len(ref) == len(got) else {"position": min(len(ref), len(got)), "length_differs": True}
    ids = torch.tensor([prompt + ref[:at]], device=model.device)
    logits = model(input_ids=ids).logits[0, -1].float()
    gap, scale = float(logits[ref[at]] - logits[got[at]]), float(logits.abs().max())
    dtype = next(model.parameters()).dtype
    return {
        "position": at, "hf_token": ref[at], "our_token": got[at], "logit_gap": round(gap, 5),
        "logit_scale": round(scale, 3), "near_tie": gap <= tie_tolerance(dtype) * scale,
    }  # fmt: skip


def run_async(s: Setup, coro: Coroutine[Any, Any, T]) -> T:
    """One event loop per phase; the engines' batcher workers stop at its end."""

    async def main() -> T:
        try:
            return await coro
        finally:
            for engine in (s.main, s.self_draft):
                await engine.aclose()

    return asyncio.run(main())


def check_greedy(s: Setup) -> dict[str, Any]:
    cfg = s.cfg
    for prompt in s.prompts:  # the reference also warms the device up
        s.reference.append(compute.run_sync(hf_generate, s.target, prompt, cfg.new_tokens))
    runs: dict[str, list[dict[str, Any]]] = {}

    async def go() -> None:
        for drafter in ["none", *cfg.drafters]:  # never cut for time: this is the check that must run
            engine, runs[drafter] = s.engine(drafter), []
            for prompt, ref in zip(s.prompts, s.reference):
                result = await engine.complete_async(greedy_spec(prompt, cfg.new_tokens, drafter, cfg.k))
                diff = compute.run_sync(divergence, s.target, prompt, ref, result.token_ids)
                st = result.stats
                runs[drafter].append({"identical": diff is None, "divergence": diff, "accepted": st.accepted_tokens})
                runs[drafter][-1] |= {"proposed": st.proposed_tokens, "steps": st.steps}

    run_async(s, go())
    return _greedy_summary(s, runs)


def _greedy_summary(s: Setup, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def real(r: dict[str, Any]) -> bool:
        return not r["identical"] and not (r["divergence"] or {}).get("near_tie", False)

    missing = [d for d in ["none", *s.cfg.drafters] if d not in runs]
    out: dict[str, Any] = {"prompts": len(s.prompts), "new_tokens": s.cfg.new_tokens, "k": s.cfg.k, "runs": runs}
    out["near_tie_below"] = f"{tie_tolerance(parse_dtype(s.cfg.dtype)):.3g} x the largest logit"
    out["identical"] = {d: sum(r["identical"] for r in rs) for d, rs in runs.items()}
    out["near_ties"] = {d: sum(not r["identical"] and not real(r) for r in rs) for d, rs in runs.items()}
    out["acceptance"] = {
        d: _ratio(sum(r["accepted"] for r in rs), sum(r["proposed"] for r in rs)) for d, rs in runs.items()
    }
    out["all_identical"] = not missing and all(r["identical"] for rs in runs.values() for r in rs)
    out["ok"] = not missing and not any(real(r) for rs in runs.values() for r in rs)
    out["not_run"] = missing
    return out


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def check_sampled(s: Setup) -> dict[str, Any]:
    """A few sampled requests per drafter: they finish with the right length (sampled
    exactness is the CPU tests' job; this catches what breaks only on the device)."""
    out: dict[str, Any] = {}

    async def go() -> None:
        for drafter in ["none", *s.cfg.drafters]:
            spec = greedy_spec(s.prompts[0], 8, drafter, s.cfg.k)
            spec.temperature, spec.top_p, spec.seed = 0.8, 0.95, 7
            try:
                result = await s.engine(drafter).complete_async(spec)
                out[drafter] = {"ok": len(result.token_ids) == 8, "tokens": len(result.token_ids)}
            except Exception as exc:  # reported: the run goes on to measure the rest
                out[drafter] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}

    run_async(s, go())
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def pass_costs(
    runner: Runner, cfg: CheckConfig, per_sequence: int, rows: list[int], deadline: float
) -> list[dict[str, Any]]:
    """ms of one forward pass over r rows: r / per_sequence sequences (one, of r rows, below
    that), each with `cfg.context` tokens cached; the caches are rolled back after each pass."""
    device = next(runner.model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    kvs = [runner.new_kv() for _ in range(max(1, max(rows) // per_sequence))]
    for i in range(0, len(kvs), 32):  # prefill in slices: activations stay small
        chunk = kvs[i : i + 32]
        runner.forward(
            [
                ForwardItem(kv, torch.randint(0, runner.vocab_size, (cfg.context,), generator=gen).tolist(), 0)
                for kv in chunk
            ]
        )
    out: list[dict[str, Any]] = []
    for r in rows:
        if out and time.monotonic() > deadline:  # the smallest pass is always measured
            break
        sequences, size = max(1, r // per_sequence), min(r, per_sequence)
        items = [ForwardItem(kv, [1 + j for j in range(size)], size) for kv in kvs[:sequences]]
        times = []
        for _ in range(cfg.repeats + 1):  # the first is a warm-up
            _sync(device)
            started = time.perf_counter()
            runner.forward(items)
            _sync(device)
            times.append(time.perf_counter() - started)
            for kv in kvs[:sequences]:
                kv.truncate(cfg.context)
        ms = statistics.median(times[1:]) * 1e3
        out.append({"rows": sequences * size, "sequences": sequences, "rows_per_sequence": size, "ms": round(ms, 3)})
    return out


def check_passes(s: Setup, deadline: float, budget: Budget) -> dict[str, Any]:
    runner = s.main.verifier.worker.runner
    draft_runner = s.main.drafter.worker.methods["model:draft"].runner  # type: ignore[attr-defined]
    now = time.monotonic()
    series = [
        ("verify", runner, VERIFY_ROWS_PER_SEQUENCE, s.cfg.rows, now + (deadline - now) * 0.45),
        ("decode", runner, 1, s.cfg.rows, now + (deadline - now) * 0.8),
        ("draft_decode", draft_runner, 1, [r for r in s.cfg.rows if r <= 64], deadline),
    ]
    out: dict[str, Any] = {"context": s.cfg.context}
    for name, r, per, rows, end in series:
        out[name] = compute.run_sync(pass_costs, r, s.cfg, per, rows, end)
        done = {x["rows"] for x in out[name]}
        if len(done) < len(rows):
            budget.cut.append(f"{name} pass: rows {[n for n in rows if n not in done]}")
    return out


async def _level(s: Setup, drafter: str, level: int, total: int = 0, adaptive: bool | None = None) -> dict[str, Any]:
    """`total` requests (default: `waves` x `level`, at least one per prompt), `level` in
    flight at a time; the draft length adapts up to k (the engine's default) unless
    `adaptive` is False."""
    engine, gate = s.engine(drafter), asyncio.Semaphore(level)
    total = total or max(s.cfg.waves * level, len(s.prompts))
    tally: Counter[str] = Counter()

    async def one(i: int) -> None:
        async with gate:
            spec = greedy_spec(s.prompts[i % len(s.prompts)], s.cfg.new_tokens, drafter, s.cfg.k, adaptive)
            result = await engine.complete_async(spec)
            st = result.stats
            tally.update(tokens=st.generated_tokens, steps=st.steps, proposed=st.proposed_tokens)
            tally.update(accepted=st.accepted_tokens, batch_sum=st.batch_size_sum)
            tally["identical"] += result.token_ids == s.reference[i % len(s.prompts)]

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    seconds = time.perf_counter() - started
    return {
        "drafter": drafter, "concurrency": level, "requests": total, "seconds": round(seconds, 3),
        "tokens": tally["tokens"], "steps": tally["steps"], "tokens_per_s": round(tally["tokens"] / seconds, 2),
        "acceptance": _ratio(tally["accepted"], tally["proposed"]),
        "tokens_per_step": _ratio(tally["tokens"], tally["steps"]),
        "mean_verify_batch": _ratio(tally["batch_sum"], tally["steps"]), "identical": tally["identical"],
    }  # fmt: skip


def check_concurrency(s: Setup, deadline: float, budget: Budget) -> list[dict[str, Any]]:
    """Levels in rising order, every configuration at a level back to back (machine drift
    hits them alike); a configuration stops when its next level would overrun the deadline,
    estimated as twice its last level's time."""
    out: list[dict[str, Any]] = []
    last: dict[str, float] = {}

    async def go() -> None:
        for drafter in ["none", *s.cfg.drafters] if not s.cfg.tiny else []:  # warm-up: batched shapes on the device
            await _level(s, drafter, 2, total=2)
        for level in s.cfg.concurrency:
            for drafter in ["none", *s.cfg.drafters]:
                if drafter in last and time.monotonic() + 2 * last[drafter] > deadline:
                    budget.cut.append(f"concurrency {level} {drafter}")
                    continue
                row = await _level(s, drafter, level)
                last[drafter] = row["seconds"]
                out.append(row)

    run_async(s, go())
    return out


class TransferCounter:
    """Counts calls of the tensor methods that copy to the host (TRANSFER_METHODS) made while
    a verify or draft batch runs on the compute thread. On a GPU only calls on device
    tensors count; on a CPU every call does (the points that would transfer on a GPU).
    `.to("cpu")` and copies inside torch or transformers are not seen."""

    def __init__(self, device_only: bool) -> None:
        self.device_only = device_only
        self.calls: Counter[str] = Counter()  # per batcher ("verify", "propose")
        self.batches: Counter[str] = Counter()
        self.items: Counter[str] = Counter()
        self.by_method: Counter[str] = Counter()
        self._active: str | None = None
        self._thread: int | None = None
        self.enabled = False

    def wrap(self, name: str) -> Callable[[Callable[[list[Any]], Any]], Callable[[list[Any]], Any]]:
        def decorate(run_batch: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
            def counted(items: list[Any]) -> Any:
                if not self.enabled:
                    return run_batch(items)
                self._active, self._thread = name, threading.get_ident()
                self.batches[name] += 1
                self.items[name] += len(items)
                try:
                    return run_batch(items)
                finally:
                    self._active = None

            return counted

        return decorate

    def _counting(self, method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            active = self._active
            on_batch = active is not None and threading.get_ident() == self._thread
            if on_batch and (not self.device_only or tensor.device.type != "cpu"):
                self.calls[str(active)] += 1
                self.by_method[method] += 1
            return original(tensor, *args, **kwargs)

        return call

    @contextmanager
    def installed(self) -> Iterator[None]:
        originals = {name: getattr(torch.Tensor, name) for name in TRANSFER_METHODS}
        for name, fn in originals.items():
            setattr(torch.Tensor, name, self._counting(name, fn))
        self.enabled = True
        try:
            yield
        finally:
            self.enabled = False
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)

    def snapshot(self) -> dict[str, int]:
        keys = ("verify", "propose")
        return {
            f"{k}_{what}": c[k]
            for k in keys
            for what, c in (("batches", self.batches), ("items", self.items), ("transfers", self.calls))
        }


def check_syncs(s: Setup, deadline: float, budget: Budget) -> dict[str, Any]:
    counter = TransferCounter(device_only=torch.device(s.cfg.device).type != "cpu")
    for engine in (s.main, s.self_draft):
        engine.verifier.batcher.wrap_batches(counter.wrap("verify"))
        engine.drafter.batcher.wrap_batches(counter.wrap("propose"))
    rows: list[dict[str, Any]] = []

    async def go() -> None:
        for drafter in ["none", *(d for d in s.cfg.drafters if d in ("ngram", "model:draft"))]:
            for n, level in enumerate(s.cfg.sync_levels):
                if n and time.monotonic() > deadline:  # the lowest level is always measured
                    budget.cut.append(f"syncs {drafter} {level}")
                    continue
                before = counter.snapshot()
                row = await _level(s, drafter, level, adaptive=False)  # every step drafts k: comparable batches
                after = counter.snapshot()
                delta: dict[str, float] = {key: after[key] - before[key] for key in after}
                delta |= {"verify_transfers_per_batch": _ratio(delta["verify_transfers"], delta["verify_batches"])}
                delta |= {"verify_transfers_per_item": _ratio(delta["verify_transfers"], delta["verify_items"])}
                delta |= {"propose_transfers_per_batch": _ratio(delta["propose_transfers"], delta["propose_batches"])}
                rows.append(
                    {"drafter": drafter, "concurrency": level, "steps": row["steps"], "tokens": row["tokens"]} | delta
                )

    with counter.installed():
        run_async(s, go())
    scope = "device tensors" if counter.device_only else "any tensor (a CPU run: the points that would transfer)"
    return {"counted": scope, "methods": list(TRANSFER_METHODS), "by_method": dict(counter.by_method), "rows": rows}


def device_info(cfg: CheckConfig) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "device": cfg.device,
        "dtype": cfg.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.device(cfg.device).type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(torch.device(cfg.device)), "cuda": torch.version.cuda}
    else:
        info |= {"threads": compute.run_sync(torch.get_num_threads)}
    return info


def run_phase(result: dict[str, Any], name: str, fn: Callable[[], Any], budget: Budget | None = None) -> None:
    """One phase into result[name]; a failure is recorded there and the run goes on. With a
    budget, a phase that finds it spent is skipped whole (slow earlier phases must not
    push the run past the device machine's limit)."""
    if budget is not None and time.monotonic() > budget.end + SKIP_GRACE * budget.total_s:
        result[name] = {"skipped": "the time budget was spent before this phase"}
        budget.cut.append(f"{name}: the whole phase")
        return
    started = time.perf_counter()
    try:
        result[name] = fn()
    except Exception as exc:  # one phase's bug must not cost the device run the others' figures
        result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    result["phase_s"][name] = round(time.perf_counter() - started, 2)
    print(f"[gpu-check] {name}: {result['phase_s'][name]} s", file=sys.stderr, flush=True)


def run_check(cfg: CheckConfig) -> dict[str, Any]:
    started = time.perf_counter()
    result: dict[str, Any] = {"config": asdict(cfg) | {"out": str(cfg.out)}, "device": device_info(cfg), "phase_s": {}}
    s, result["models"] = setup(cfg)
    budget = Budget(cfg.budget_s, SHARES)
    budget.phase("greedy")  # its share is planned for, not enforced: the identity check always runs whole
    run_phase(result, "greedy", lambda: check_greedy(s))
    budget.phase("sampled")  # a few short requests: never cut either
    run_phase(result, "sampled", lambda: check_sampled(s))
    run_phase(result, "verify_pass", lambda: check_passes(s, budget.phase("verify_pass"), budget), budget)
    run_phase(result, "syncs", lambda: check_syncs(s, budget.phase("syncs"), budget), budget)
    run_phase(result, "concurrency", lambda: check_concurrency(s, budget.phase("concurrency"), budget), budget)
    result["cut"] = budget.cut
    result["errors"] = [name for name in SHARES if isinstance(result.get(name), dict) and "error" in result[name]]
    greedy = result["greedy"]
    sampled = result["sampled"]
    result["sampled_ok"] = "error" not in sampled and all(r["ok"] for r in sampled.values())
    # Correctness only; `cut` says what time left out.
    result["ok"] = not result["errors"] and bool(greedy.get("ok")) and result["sampled_ok"]
    result["elapsed_s"] = round(time.perf_counter() - started, 2)
    return result


def table(result: dict[str, Any]) -> str:
    dev, models = result["device"], result["models"]
    lines = [
        f"gpu-check on {dev.get('gpu', dev['device'])} {dev['dtype']}  torch {dev['torch']}  "
        f"transformers {dev['transformers']}  target {models['target']['parameters'] / 1e6:.2f}M  "
        f"draft {models['draft']['parameters'] / 1e6:.2f}M  built in {models['build_s']} s",
    ]
    lines += _greedy_lines(result["greedy"]) + _pass_lines(result["verify_pass"]) + _concurrency_lines(result)
    lines += _sync_lines(result["syncs"])
    lines.append(f"sampled smoke: {result['sampled']}")
    lines.append(f"cut for time: {result['cut'] or 'nothing'}  errors: {result['errors'] or 'none'}")
    lines.append(f"phases (s): {result['phase_s']}  total {result['elapsed_s']} s  ok {result['ok']}")
    return "\n".join(lines)


def _problem(section: Any) -> str | None:
    """Why a phase has no figures (it failed, or time ran out before it), if so."""
    if isinstance(section, dict) and "error" in section:
        return f"ERROR {section['error']}"
    if isinstance(section, dict) and "skipped" in section:
        return f"skipped: {section['skipped']}"
    return None


def _greedy_lines(g: dict[str, Any]) -> list[str]:
    if problem := _problem(g):
        return [f"greedy: {problem}"]
    n = g["prompts"]
    cells = [
        f"{d} {g['identical'][d]}/{n} (near-ties {g['near_ties'][d]}, acc {g['acceptance'][d]:.2f})"
        for d in g["identical"]
    ]
    return [f"greedy vs transformers ({g['new_tokens']} tokens, k {g['k']}): " + "; ".join(cells) + f"  ok {g['ok']}"]


def _pass_lines(p: dict[str, Any]) -> list[str]:
    if problem := _problem(p):
        return [f"forward pass: {problem}"]
    lines = [f"forward pass ms (context {p['context']}): rows -> verify (8/seq) | decode (1/seq) | draft decode"]
    by_rows: dict[int, list[str]] = {}
    for i, name in enumerate(("verify", "decode", "draft_decode")):
        for row in p[name]:
            by_rows.setdefault(row["rows"], ["-", "-", "-"])[i] = f"{row['ms']:.2f}"
    lines += [f"  {r:>4}: " + " | ".join(f"{c:>8}" for c in cells) for r, cells in sorted(by_rows.items())]
    return lines


def _concurrency_lines(result: dict[str, Any]) -> list[str]:
    rows = result["concurrency"]
    if problem := _problem(rows):
        return [f"concurrency: {problem}"]
    drafters = list(dict.fromkeys(r["drafter"] for r in rows))
    lines = ["tokens/s by concurrency: " + " | ".join(f"{d} (x plain, acc)" for d in drafters)]
    for level in dict.fromkeys(r["concurrency"] for r in rows):
        at = {r["drafter"]: r for r in rows if r["concurrency"] == level}
        plain = at.get("none", {}).get("tokens_per_s", 0.0)
        cells = [
            f"{at[d]['tokens_per_s']:.1f} ({_ratio(at[d]['tokens_per_s'], plain):.2f}, {at[d]['acceptance']:.2f})"
            if d in at
            else "-"
            for d in drafters
        ]
        lines.append(f"  {level:>3}: " + " | ".join(cells))
    return lines


def _sync_lines(syncs: dict[str, Any]) -> list[str]:
    if problem := _problem(syncs):
        return [f"syncs: {problem}"]
    lines = [f"host transfers ({syncs['counted']}): drafter c -> verify batches, items, per batch | propose per batch"]
    lines += [
        f"  {r['drafter']:<12}{r['concurrency']:>3}: {r['verify_batches']:>5} {r['verify_items']:>6} "
        f"{r['verify_transfers_per_batch']:>8.2f} | {r['propose_transfers_per_batch']:.2f}"
        for r in syncs["rows"]
    ]
    return lines


def plot(result: dict[str, Any], path: Path) -> bool:
    """Three panels: pass cost by rows, tokens/s by concurrency, transfers per verify batch.
    False when matplotlib is not installed (a device machine may lack it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    passes = result["verify_pass"] if not _problem(result["verify_pass"]) else {}
    for name in ("verify", "decode", "draft_decode"):
        rows = passes.get(name, [])
        left.plot([r["rows"] for r in rows], [r["ms"] for r in rows], marker="o", label=name)
    left.set(xscale="log", xlabel="rows in the pass", ylabel="ms per forward pass", title="pass cost")
    rows = result["concurrency"] if isinstance(result["concurrency"], list) else []
    for drafter in dict.fromkeys(r["drafter"] for r in rows):
        mine = [r for r in rows if r["drafter"] == drafter]
        middle.plot([r["concurrency"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=drafter)
    middle.set(xscale="log", xlabel="requests in flight", ylabel="aggregate tokens/s", title="throughput")
    syncs = result["syncs"].get("rows", [])
    for drafter in dict.fromkeys(r["drafter"] for r in syncs):
        mine = [r for r in syncs if r["drafter"] == drafter and r["verify_batches"]]
        x = [r["verify_items"] / r["verify_batches"] for r in mine]
        right.plot(x, [r["verify_transfers_per_batch"] for r in mine], marker="o", label=drafter)
    right.set(xlabel="mean verify batch size", ylabel="host transfers per verify batch", title="syncs")
    for ax in (left, middle, right):
        if ax.get_legend_handles_labels()[0]:  # a phase that failed drew nothing
            ax.legend(fontsize="small")
    fig.suptitle(f"{result['device'].get('gpu', result['device']['device'])} {result['device']['dtype']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None = None) -> CheckConfig:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m specdec.benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--tiny", action="store_true", help="toy shapes and sizes: the CPU test of this script")
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT, else build/gpu-check/")
    ap.add_argument("--budget-s", type=float, default=None, help="time for the phases (default 360; 60 with --tiny)")
    ap.add_argument("--concurrency", default=None, help="comma-separated levels (default 1,2,4,...,64)")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("float32" if torch.device(args.device).type == "cpu" else "bfloat16")
    parse_dtype(dtype)  # a bad name fails here, before any model is built
    out = args.out or Path(os.environ.get("OUT") or "build/gpu-check")
    cfg = CheckConfig.tiny_run(args.device, dtype, out) if args.tiny else CheckConfig(args.device, dtype, out)
    if args.budget_s is not None:
        cfg.budget_s = args.budget_s
    if args.concurrency:
        cfg.concurrency = [int(c) for c in args.concurrency.split(",")]
    return cfg


def write(result: dict[str, Any], out: Path) -> str:
    """The JSON and, if matplotlib imports, the PNG into `out`; returns what was written, in words."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    if plot(result, out / "gpu_check.png"):
        return f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.png'}"
    return f"wrote {out / 'gpu_check.json'} (no PNG: matplotlib is not installed)"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.out.mkdir(parents=True, exist_ok=True)  # before the run: a bad path fails now, not after it
    result = run_check(cfg)
    written = write(result, cfg.out)
    print(table(result))
    print(written)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
