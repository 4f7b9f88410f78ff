"""transformers' own `generate`, the bench's peer, in a process of its own.

Run in the bench's process, transformers would share it with the engine's compute and
event-loop threads, and libgomp throttles every OpenMP team once two threads have run
parallel ops (see core.compute): the peer would be measured slower than it is. So the bench
starts `python -m specdec.benchmarks.bench_peer` with the same torch thread count, and hands it one
tokenized prompt at a time between its own runs of that prompt, so that machine noise hits
both alike. The child loads the model with transformers alone (no engine, no batcher).

Per prompt it runs greedy plain `generate`, prompt lookup at each of LOOKUPS tokens, and
assisted generation when a draft model is named. The protocol is one JSON object a line:
the job on the first stdin line, `{"ready": true}` back; then `{"ids": [...]}` per prompt,
answered by the timings and output ids of each configuration.
"""

from __future__ import annotations

import json
import os
import sys
import time
from types import TracebackType
from typing import IO, Any

from specdec.benchmarks.child import JsonLinesChild

LOOKUPS = (3, 5, 10)  # prompt_lookup_num_tokens settings; the bench reports the best per run
WARMUP_TOKENS = 8


class Peer:
    """The parent's handle on the peer process."""

    def __init__(self, model: str, max_new_tokens: int, threads: int, assistant: str | None = None) -> None:
        self._child = JsonLinesChild("specdec.benchmarks.bench_peer", threads)
        self.threads = threads
        job = {"model": model, "max_new_tokens": max_new_tokens, "threads": threads, "assistant": assistant}
        self._call(job)

    def warm_up(self, ids: list[int]) -> None:
        """One short pass of every configuration, so first-call costs stay out of the figures."""
        self._call({"ids": ids, "max_new_tokens": WARMUP_TOKENS})

    def measure(self, ids: list[int]) -> dict[str, Any]:
        """{"plain": run, "lookup": {"3": run, ...}, "assisted": run | None}; a run is
        {"ids": generated ids, "seconds": wall time of the generate call}."""
        return self._call({"ids": ids})

    def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        return self._child.call(message)

    def close(self) -> None:
        """End the peer (it exits at the end of its input); safe to call twice."""
        self._child.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _generate(model: Any, ids: list[int], max_new_tokens: int, **kwargs: Any) -> dict[str, Any]:
    import torch

    inputs = torch.tensor([ids])
    start = time.perf_counter()
    out = model.generate(
        inputs,
        attention_mask=torch.ones_like(inputs),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    return {"ids": out[0, len(ids) :].tolist(), "seconds": seconds}


def _measure(model: Any, assistant: Any, ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    return {
        "plain": _generate(model, ids, max_new_tokens),
        "lookup": {str(n): _generate(model, ids, max_new_tokens, prompt_lookup_num_tokens=n) for n in LOOKUPS},
        "assisted": _generate(model, ids, max_new_tokens, assistant_model=assistant) if assistant else None,
    }


def serve(requests: IO[str], replies: IO[str]) -> None:
    import torch

    from specdec.core.models import load_model, load_tokenizer

    job = json.loads(requests.readline())
    torch.set_num_threads(job["threads"])
    model = load_model(job["model"])
    # Our engine stops at the tokenizer's EOS; so must the peer, whatever generation_config says.
    eos = load_tokenizer(job["model"]).eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    assistant = load_model(job["assistant"]) if job.get("assistant") else None
    _reply(replies, {"ready": True, "threads": torch.get_num_threads()})
    with torch.inference_mode():
        for line in requests:
            request = json.loads(line)
            max_new_tokens = request.get("max_new_tokens", job["max_new_tokens"])
            _reply(replies, _measure(model, assistant, request["ids"], max_new_tokens))


def _reply(replies: IO[str], message: dict[str, Any]) -> None:
    replies.write(json.dumps(message) + "\n")
    replies.flush()


def main() -> int:
    # The protocol gets its own copy of stdout; fd 1 and sys.stdout then point at stderr,
    # so whatever a library prints (from Python or C) cannot land in the protocol.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
