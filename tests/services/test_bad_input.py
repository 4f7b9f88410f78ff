"""Every bad field gets INVALID_ARGUMENT naming it; a tier that is down gets UNAVAILABLE."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from specdec.client import Client
from specdec.launcher import Child, wait_healthy
from tests.conftest import free_port

OK = {"prompt": "hello there", "max_new_tokens": 4}
BAD = [
    ("empty prompt", {"prompt": "   "}, "prompt"),
    ("no input", {"prompt": None}, "input"),
    ("negative max_new_tokens", {"max_new_tokens": -1}, "max_new_tokens"),
    ("zero max_new_tokens", {"max_new_tokens": 0}, "max_new_tokens"),
    ("huge max_new_tokens", {"max_new_tokens": 10**9}, "max_new_tokens"),
    ("negative temperature", {"temperature": -0.5}, "temperature"),
    ("nan temperature", {"temperature": float("nan")}, "temperature"),
    ("top_p zero", {"top_p": 0.0}, "top_p"),
    ("top_p above one", {"top_p": 1.5}, "top_p"),
    ("negative top_k", {"top_k": -3}, "top_k"),
    ("unknown drafter", {"drafter": "telepathy"}, "drafter"),
    ("unserved draft model", {"drafter": "model:nope"}, "drafter"),
    ("draft length zero", {"k": 0}, "max_draft_tokens"),
    ("draft length huge", {"k": 1000}, "max_draft_tokens"),
    ("prompt longer than context", {"prompt": "hello " * 1000}, "prompt"),
    ("token id out of vocabulary", {"prompt": None, "token_ids": [1, 2, 10**8]}, "token_ids"),
    ("negative token id", {"prompt": None, "token_ids": [5, -7]}, "token_ids"),
    ("empty token ids", {"prompt": None, "token_ids": []}, "token_ids"),
    ("empty chat", {"prompt": None, "messages": [{"role": "user", "content": ""}]}, "chat.messages"),
    ("bad chat role", {"prompt": None, "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ("stop token id out of vocabulary", {"stop_token_ids": [10**8]}, "stop_token_ids"),
    ("empty stop string", {"stop": [""]}, "stop"),
]


@pytest.mark.parametrize("case,override,field", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("method", ["complete", "generate"])
def test_bad_input_is_invalid_argument(tiny_stack, case, override, field, method):
    params = {**OK, **override}
    prompt = params.pop("prompt")
    with Client(tiny_stack.address, timeout_s=30) as client, pytest.raises(grpc.RpcError) as err:
        if method == "complete":
            client.complete(prompt, **params)
        else:
            list(client.generate(prompt, **params))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in err.value.details()


def test_server_survives_bad_input(tiny_stack):
    with Client(tiny_stack.address, timeout_s=60) as client:
        with pytest.raises(grpc.RpcError):
            client.complete("", max_new_tokens=4)
        assert client.complete("hello there", max_new_tokens=4).stats.generated_tokens > 0


def test_target_tier_down_is_unavailable(tiny_models, tmp_path):
    """A coordinator whose only target replica is gone answers UNAVAILABLE naming the tier."""
    port, dead = free_port(), free_port()
    log = tmp_path / "coordinator.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "specdec.cli",
            "serve",
            "coordinator",
            "--port",
            str(port),
            "--model",
            tiny_models[0],
            "--target-addresses",
            f"127.0.0.1:{dead}",
            "--draft-addresses",
            f"127.0.0.1:{free_port()}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(Child("coordinator", proc, log, f"127.0.0.1:{port}"), timeout_s=120)
        with Client(f"127.0.0.1:{port}", timeout_s=60) as client, pytest.raises(grpc.RpcError) as err:
            client.complete("hello there", max_new_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "target" in err.value.details()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
