"""`make gpu-check` at toy size on the CPU: the script a GPU machine runs once must work
before it gets there. Greedy output must equal transformers' exactly here (float32, one
kernel family), every section must be in the JSON, and the script must need nothing but
torch, transformers and this repository (no gRPC, no Redis)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specdec.benchmarks import gpu_check
from specdec.benchmarks.gpu_check import TRANSFER_METHODS, TransferCounter

SECTIONS = ("config", "device", "models", "greedy", "sampled", "verify_pass", "concurrency", "syncs", "cut", "ok")


def test_tiny_check_on_cpu(tmp_path: Path) -> None:
    """Smaller still than `--tiny` (which takes ~40 s on two busy cores): every phase at
    one setting, the JSON as the CLI writes it. The budget only has to be large enough that
    no phase is skipped: these sizes leave nothing for it to cut."""
    cfg = gpu_check.parse_args(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--budget-s", "600"])
    cfg.prompts, cfg.new_tokens, cfg.rows, cfg.repeats, cfg.concurrency, cfg.sync_levels = 2, 8, [1, 16], 1, [2], [2]
    cfg.drafters = ["ngram", "model:self"]  # a model-free and a model drafter (model:draft runs the same code)
    gpu_check.write(gpu_check.run_check(cfg), tmp_path)
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"], result.get("errors")
    assert gpu_check.table(result)  # the printed summary reads every section
    assert all(key in result for key in SECTIONS), [key for key in SECTIONS if key not in result]
    assert result["errors"] == [] and result["cut"] == []
    greedy = result["greedy"]
    assert greedy["all_identical"] and greedy["not_run"] == []
    assert set(greedy["identical"]) == {"none", "ngram", "model:self"}
    assert all(n == greedy["prompts"] for n in greedy["identical"].values())
    assert greedy["acceptance"]["model:self"] == 1.0  # the target drafting for itself, in float32
    assert all(r["ok"] for r in result["sampled"].values())
    for series in ("verify", "decode", "draft_decode"):
        assert result["verify_pass"][series] and all(r["ms"] > 0 for r in result["verify_pass"][series])
    levels = result["concurrency"]
    assert {r["drafter"] for r in levels} == {"none", "ngram", "model:self"}
    assert all(r["identical"] == r["requests"] and r["tokens_per_s"] > 0 for r in levels)
    syncs = result["syncs"]["rows"]
    assert syncs and all(r["verify_batches"] > 0 and r["verify_transfers"] > 0 for r in syncs)


def test_divergence_names_the_first_differing_token_and_its_gap() -> None:
    """A wrong token where transformers' logits clearly prefer another is no near-tie."""
    model = gpu_check.build_model(gpu_check.TINY_TARGET, 0, "cpu", "float32", 128)
    prompt = [5, 17, 99, 3, 250, 42]
    ref = gpu_check.hf_generate(model, prompt, 6)
    assert gpu_check.divergence(model, prompt, ref, list(ref)) is None
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + ref[:3]])).logits[0, -1]
    worst = int(logits.argmin())
    diff = gpu_check.divergence(model, prompt, ref, ref[:3] + [worst] + ref[4:])
    assert diff is not None and diff["position"] == 3 and diff["our_token"] == worst
    assert diff["logit_gap"] == pytest.approx(float(logits[ref[3]] - logits[worst]), rel=1e-4)
    assert diff["logit_gap"] > 0 and not diff["near_tie"]
    assert gpu_check.divergence(model, prompt, ref, ref[:4])["length_differs"]


def test_transfer_counter_counts_only_inside_batches() -> None:
    counter = TransferCounter(device_only=False)
    originals = {name: getattr(torch.Tensor, name) for name in TRANSFER_METHODS}
    batch = counter.wrap("verify")(lambda items: [torch.tensor(x).tolist() + [int(torch.tensor(1))] for x in items])
    with counter.installed():
        torch.tensor([1, 2]).tolist()  # outside a batch: not counted
        assert batch([[1], [2], [3]]) == [[1, 1], [2, 1], [3, 1]]
    assert counter.batches["verify"] == 1 and counter.items["verify"] == 3
    assert counter.calls["verify"] == 6 and counter.by_method == {"tolist": 3, "__int__": 3}
    assert all(getattr(torch.Tensor, name) is fn for name, fn in originals.items())  # restored
    assert batch([[4]]) == [[4, 1]] and counter.calls["verify"] == 6  # uninstalled: not counted


def test_imports_no_grpc_or_redis() -> None:
    """The device machine has only torch and transformers."""
    probe = (
        "import json, sys, specdec.benchmarks.gpu_check;"
        " print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "services")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    loaded = set(json.loads(out))
    assert not loaded & {"grpc", "redis", "valkey", "kubernetes", "kopf", "specdec_records", "opentelemetry"}
