"""A third-party load generator against the OpenAI-compatible HTTP front: NVIDIA's aiperf
(from PyPI, in its own virtual environment: `make loadgen` makes it) drives a local stack
with plain decoding and with speculation, same prompts, same settings, one after the other.

Prompts: a JSONL file of `{"prompt": ...}`, `{"messages": [...]}` (the bench's format) or
Spec-Bench's `{"turns": [...]}`; each becomes one aiperf single-turn chat request (greedy,
`ignore_eos`, `max_tokens` fixed) so both sides generate the same number of tokens.

    python -m specdec.benchmarks.loadgen --aiperf .venv-loadgen/bin/aiperf --concurrency 1,8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BUNDLED = Path(__file__).parent.parent / "data" / "prompts.jsonl"
METRICS = {  # aiperf's metric tags -> our column names
    "request_throughput": "requests/s",
    "time_to_first_token": "TTFT ms",
    "inter_token_latency": "ITL ms",
    "output_token_throughput": "tokens/s",
}


def single_turn_file(prompts: Path, out: Path, limit: int) -> int:
    """Write aiperf's single-turn JSONL ({"text": ...}) from a prompt file; returns the count."""
    texts = []
    for line in prompts.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "turns" in row:
            text = row["turns"][0]
        elif "messages" in row:
            text = next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")
        else:
            text = row["prompt"]
        texts.append(text)
    texts = texts[:limit] if limit else texts
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return len(texts)


def run_aiperf(
    aiperf: str,
    url: str,
    model: str,
    tokenizer: str,
    dataset: Path,
    concurrency: int,
    requests: int,
    new_tokens: int,
    drafter: str,
    artifacts: Path,
) -> dict[str, Any]:
    """One aiperf profile; returns its metrics (average of each) read from its JSON export."""
    extra = {"temperature": 0.0, "ignore_eos": True, "speculation": {"drafter": drafter}}
    argv = [
        aiperf,
        "profile",
        "--model",
        model,
        "--url",
        url,
        "--endpoint-type",
        "chat",
        "--streaming",
        "--tokenizer",
        tokenizer,
        "--input-file",
        str(dataset),
        "--custom-dataset-type",
        "single_turn",
        "--concurrency",
        str(concurrency),
        "--request-count",
        str(requests),
        "--output-tokens-mean",
        str(new_tokens),
        "--extra-inputs",
        json.dumps(extra),
        "--artifact-dir",
        str(artifacts),
        "--ui-type",
        "none",
        "--use-server-token-count",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"aiperf failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    export = next(artifacts.rglob("profile_export_aiperf.json"))
    report = json.loads(export.read_text())
    return {name: _average(report, tag) for tag, name in METRICS.items()}


def _average(report: dict[str, Any], tag: str) -> float | None:
    """aiperf's export keeps each metric as {"avg": ..., "p50": ..., "unit": ...}, at the top
    level or under "records" depending on the version."""
    for holder in (report, report.get("records", {})):
        metric = holder.get(tag)
        if isinstance(metric, dict) and "avg" in metric:
            return float(metric["avg"])
    return None


def loadgen(
    aiperf: str,
    prompts: Path,
    levels: list[int],
    requests_per_stream: int,
    new_tokens: int,
    drafter: str,
    model: str = "smollm2-135m",
    limit: int = 0,
) -> dict[str, Any]:
    """Start a local stack with its HTTP front; aiperf plain then speculative at each level."""
    from specdec.core.models import resolve_model_path
    from specdec.launcher import free_port, start_stack

    work = Path(tempfile.mkdtemp(prefix="specdec-loadgen-"))
    dataset = work / "prompts.jsonl"
    count = single_turn_file(prompts, dataset, limit)
    stack = start_stack(model, drafter, 1, 1, free_port(), extra_env={"SPECDEC_HTTP_PORT": str(free_port())})
    try:
        url = stack.http[0].removesuffix("/v1")
        results: dict[str, Any] = {"prompts": count, "levels": {}}
        for c in levels:
            row = {}
            for side in ("none", drafter):
                artifacts = work / f"c{c}-{side.replace(':', '_')}"
                row[side] = run_aiperf(
                    aiperf,
                    url,
                    model,
                    str(resolve_model_path(model)),
                    dataset,
                    c,
                    max(c * requests_per_stream, count),
                    new_tokens,
                    side,
                    artifacts,
                )
            results["levels"][str(c)] = row
        return results
    finally:
        stack.stop()


def print_table(results: dict[str, Any], drafter: str) -> None:
    header = f"{'c':>3} {'decoding':>10} " + " ".join(f"{name:>11}" for name in METRICS.values())
    print(header)
    for c, row in results["levels"].items():
        for side in ("none", drafter):
            values = " ".join(
                f"{row[side][n]:>11.2f}" if row[side][n] is not None else f"{'-':>11}" for n in METRICS.values()
            )
            print(f"{c:>3} {'plain' if side == 'none' else side:>10} {values}")
        plain, spec = row["none"]["tokens/s"], row[drafter]["tokens/s"]
        if plain and spec:
            print(f"{c:>3} {'ratio':>10} {spec / plain:>11.3f}  (speculative ÷ plain tokens/s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aiperf", default="aiperf", help="the aiperf executable (make loadgen installs one)")
    parser.add_argument("--prompts", type=Path, default=BUNDLED)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--drafter", default="ngram")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", dest="json_out", help="write the results to this file")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    results = loadgen(
        args.aiperf,
        args.prompts,
        levels,
        args.requests_per_stream,
        args.max_new_tokens,
        args.drafter,
        args.model,
        args.limit,
    )
    print_table(results, args.drafter)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
