"""The coordinator's OpenAI-compatible HTTP front, driven by the official `openai` client.

Two extra coordinator processes join the session's tiny stack (its Redis, prefix and
replicas): one with the HTTP front on (two requests at a time, none queued, so a third is
refused with 429), and one on an empty registry prefix (no target tier: 503). Greedy
output through HTTP is the gRPC path's, token for token.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import openai
import pytest

from specdec.client import Client, make_request
from specdec.launcher import Child, wait_healthy
from specdec.v1 import generation_pb2, generation_pb2_grpc
from tests.conftest import free_port
from tests.services.conftest import PROMPT
from tests.waiting import wait_until

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three cats."}]
GREEDY = {"temperature": 0.0, "max_tokens": 24}
API_KEY = "sk-specdec-http-test"
SPEC = {"ignore_eos": True, "speculation": {"drafter": "ngram", "max_draft_tokens": 3, "adaptive": False}}


@dataclass
class Front:
    grpc: str  # the coordinator's own gRPC address
    base_url: str  # its OpenAI-compatible base URL (…/v1)
    model: str
    api_key: str = "unused"

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key or self.api_key, max_retries=0, timeout=60)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base_url.removesuffix("/v1") + path, timeout=30) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()


def _coordinator(tmp_path, name: str, env: dict[str, str]) -> tuple[Child, Front]:
    port, http = free_port(), free_port()
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "serve", "coordinator", "--port", str(port)],
        env={**env, "SPECDEC_HTTP_PORT": str(http)},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return Child(name, proc, log, f"127.0.0.1:{port}"), Front(
        f"127.0.0.1:{port}", f"http://127.0.0.1:{http}/v1", env["SPECDEC_MODEL"]
    )


@pytest.fixture(scope="module")
def fronts(tiny_stack, tmp_path_factory) -> Iterator[tuple[Front, Front]]:
    """(a coordinator on the tiny stack's replicas, one with no replicas at all)."""
    tmp = tmp_path_factory.mktemp("http")
    keys = tmp / "api-keys"
    keys.write_text(hashlib.sha256(API_KEY.encode()).hexdigest() + "\n")
    env = {
        **tiny_stack.stack.env,
        "SPECDEC_REDIS_PREFIX": tiny_stack.prefix,
        "SPECDEC_TORCH_THREADS": "1",
        "SPECDEC_MAX_RUNNING_REQUESTS": "2",
        "SPECDEC_MAX_QUEUED_REQUESTS": "0",
    }
    started = [
        _coordinator(tmp, "http", {**env, "SPECDEC_API_KEYS_FILE": str(keys)}),
        _coordinator(tmp, "orphan", {**env, "SPECDEC_REDIS_PREFIX": f"{tiny_stack.prefix}none:"}),
    ]
    try:
        for child, _ in started:
            wait_healthy(child, timeout_s=120)
        started[0][1].api_key = API_KEY
        yield started[0][1], started[1][1]
    finally:
        for child, _ in started:
            child.proc.terminate()
        for child, _ in started:
            child.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def front(fronts) -> Front:
    return fronts[0]


def _grpc(address: str, prompt: str | None = None, **kwargs):
    """The gRPC path (the tiny stack's own coordinator: same replicas, no API keys)."""
    with Client(address, timeout_s=60) as client:
        params = {"max_new_tokens": 24, "temperature": 0.0, "ignore_eos": True, "drafter": "ngram", "k": 3}
        return client.complete(prompt, adaptive=False, **{**params, **kwargs})


def _check_usage(usage, prompt_tokens: int, completion_tokens: int, steps_at_least: int = 1) -> None:
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert usage.total_tokens == prompt_tokens + completion_tokens
    spec = usage.speculation  # the extension object
    assert spec["drafter"] == "ngram" and 0 <= spec["accepted_tokens"] <= spec["proposed_tokens"]
    assert spec["proposed_tokens"] > 0 and spec["steps"] >= steps_at_least
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["proposed_tokens"], abs=1e-6)
    assert spec["mean_accepted_length"] == pytest.approx(completion_tokens / spec["steps"], abs=1e-6)


def test_completion_greedy_is_the_grpc_output(tiny_stack, front, prompt_ids, reference):
    grpc_reply = _grpc(tiny_stack.address, PROMPT)
    assert list(grpc_reply.token_ids) == reference[:24]
    reply = front.client().completions.create(model=front.model, prompt=PROMPT, **GREEDY, extra_body=SPEC)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert [c.text for c in reply.choices] == [grpc_reply.text]
    assert reply.choices[0].finish_reason == "length"
    _check_usage(reply.usage, len(prompt_ids), 24)
    assert reply.usage.speculation["proposed_tokens"] == grpc_reply.stats.proposed_tokens

    # the prompt as token ids, streamed, with usage in a last chunk of its own
    chunks = list(
        front.client().completions.create(
            model=front.model,
            prompt=prompt_ids,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
            extra_body=SPEC,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == grpc_reply.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    _check_usage(chunks[-1].usage, len(prompt_ids), 24)


def test_chat_streamed_and_not_is_the_grpc_output(tiny_stack, front):
    grpc_reply = _grpc(tiny_stack.address, messages=CHAT)
    client = front.client()
    reply = client.chat.completions.create(model=front.model, messages=CHAT, **GREEDY, extra_body=SPEC)
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == grpc_reply.text
    _check_usage(reply.usage, grpc_reply.stats.prompt_tokens, 24)
    stream = client.chat.completions.create(
        model=front.model,
        messages=CHAT,
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=24,
        temperature=0.0,
        extra_body=SPEC,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == grpc_reply.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].object == "chat.completion.chunk" and chunks[-1].choices == []
    _check_usage(chunks[-1].usage, grpc_reply.stats.prompt_tokens, 24)


PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.7, "repetition_penalty": 1.5, "min_p": 0.1}


def test_penalties_and_min_p_over_http_are_the_grpc_output(tiny_stack, front):
    """Greedy with penalties: HTTP (speculating) gives the gRPC path's text with no drafter,
    and the penalties change it; sampled with min_p, both fronts draw the same tokens."""
    plain = _grpc(tiny_stack.address, PROMPT, drafter="none", **PENALTIES)
    assert plain.text != _grpc(tiny_stack.address, PROMPT, drafter="none").text
    extra = {**SPEC, "repetition_penalty": PENALTIES["repetition_penalty"], "min_p": PENALTIES["min_p"]}
    fields = {"presence_penalty": PENALTIES["presence_penalty"], "frequency_penalty": PENALTIES["frequency_penalty"]}
    reply = front.client().completions.create(model=front.model, prompt=PROMPT, **GREEDY, **fields, extra_body=extra)
    assert reply.choices[0].text == plain.text
    sampled = _grpc(tiny_stack.address, PROMPT, **{**PENALTIES, "temperature": 0.8, "seed": 11})
    reply = front.client().completions.create(
        model=front.model, prompt=PROMPT, max_tokens=24, temperature=0.8, seed=11, **fields, extra_body=extra
    )
    assert reply.choices[0].text == sampled.text


def test_response_format_constrains_the_output(front):
    """json_schema (chat, streamed and not, greedy and sampled; completions) and json_object:
    every output parses, and validates against its schema."""
    import jsonschema

    from tests.structured_schemas import SCHEMAS

    client = front.client()
    for name in ("person", "items", "answer"):
        schema = SCHEMAS[name]
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        for temperature in (0.0, 1.0):
            reply = client.chat.completions.create(
                model=front.model, messages=CHAT, max_tokens=150, temperature=temperature, seed=2,
                response_format=response_format, extra_body={"speculation": SPEC["speculation"]},
            )  # fmt: skip
            assert reply.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
        chunks = client.chat.completions.create(
            model=front.model, messages=CHAT, max_tokens=150, temperature=0.0, stream=True,
            response_format=response_format,
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        jsonschema.validate(json.loads(text), schema)
    completion = client.completions.create(
        model=front.model, prompt=PROMPT, max_tokens=150, temperature=0.0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMAS["ref"]}}},
    )  # fmt: skip
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMAS["ref"])
    obj = client.chat.completions.create(
        model=front.model, messages=CHAT, max_tokens=300, temperature=0.0, response_format={"type": "json_object"}
    )
    # Any object: the random tiny model may write one key for ever; what it wrote is an object's start.
    content = obj.choices[0].message.content
    assert content.startswith('{"')
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_regex_over_http_in_vllms_conventions(front):
    """structured_outputs.regex and the older guided_regex (extra_body), chat and
    completions, greedy and sampled, speculating: every output matches the whole regex."""
    import re

    client = front.client()
    pattern = r"(cat|dog)s? (sat|ran) on the (mat|log|rug)\."
    speculation = {"speculation": SPEC["speculation"]}
    texts = []
    for temperature in (0.0, 1.0):
        reply = client.chat.completions.create(
            model=front.model, messages=CHAT, max_tokens=40, temperature=temperature, seed=3,
            extra_body={"structured_outputs": {"regex": pattern}, **speculation},
        )  # fmt: skip
        texts.append((reply.choices[0].message.content, reply.choices[0].finish_reason))
        reply = client.completions.create(
            model=front.model, prompt=PROMPT, max_tokens=40, temperature=temperature, seed=3,
            extra_body={"guided_regex": pattern, **speculation},
        )  # fmt: skip
        texts.append((reply.choices[0].text, reply.choices[0].finish_reason))
    reply = client.completions.create(  # ignore_eos: the finished grammar still ends the text
        model=front.model, prompt=PROMPT, max_tokens=40, temperature=0.0, extra_body={"guided_regex": pattern, **SPEC}
    )
    texts.append((reply.choices[0].text, reply.choices[0].finish_reason))
    assert reply.usage.completion_tokens < 40
    for temperature in (0.0, 1.0):  # min_tokens past the grammar's end yields to it: EOS ends the text
        reply = client.completions.create(
            model=front.model, prompt=PROMPT, max_tokens=40, temperature=temperature, seed=4,
            extra_body={"guided_regex": pattern, "min_tokens": 30, **speculation},
        )  # fmt: skip
        texts.append((reply.choices[0].text, reply.choices[0].finish_reason))
    for text, reason in texts:
        assert re.fullmatch(pattern, text) and reason == "stop", (text, reason)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    schema["additionalProperties"] = False
    reply = client.chat.completions.create(
        model=front.model, messages=CHAT, max_tokens=60, temperature=0.0, extra_body={"guided_json": schema}
    )
    if reply.choices[0].finish_reason == "stop":  # the tiny model may write digits for ever
        assert set(json.loads(reply.choices[0].message.content)) == {"n"}
    else:
        assert reply.choices[0].message.content.startswith('{"n":')


def test_logit_bias_and_min_tokens_over_http_are_the_grpc_output(tiny_stack, front, prompt_ids):
    """Greedy, speculating over HTTP: the gRPC path's tokens with no drafter, and both
    settings change the output (a bias against plain decoding's favourite token, and
    min_tokens holding back a stop token it would emit early)."""
    plain = list(_grpc(tiny_stack.address, PROMPT, drafter="none").token_ids)
    favourite = max(set(plain), key=plain.count)
    stop = next(t for t in plain[1:6] if t != favourite)
    bias = {favourite: -5.0, plain[0]: 2.0}
    grpc_reply = _grpc(
        tiny_stack.address, PROMPT, drafter="none", logit_bias=bias, min_tokens=10, stop_token_ids=[stop]
    )
    assert list(grpc_reply.token_ids) != plain and len(grpc_reply.token_ids) >= 10
    assert stop not in list(grpc_reply.token_ids)[:9]
    early = _grpc(tiny_stack.address, PROMPT, drafter="none", logit_bias=bias, stop_token_ids=[stop])
    assert len(early.token_ids) < 10, "without min_tokens the stop token ends the text early"
    reply = front.client().completions.create(
        model=front.model, prompt=PROMPT, **GREEDY, logit_bias={str(t): b for t, b in bias.items()},
        extra_body={**SPEC, "min_tokens": 10, "stop_token_ids": [stop]},
    )  # fmt: skip
    assert reply.choices[0].text == grpc_reply.text
    assert reply.usage.completion_tokens == len(grpc_reply.token_ids)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"logit_bias": {5: 150.0}}, "decoding.logit_bias"),
        ({"logit_bias": {10**8: 1.0}}, "decoding.logit_bias"),
        ({"min_tokens": -1}, "decoding.min_tokens"),
        ({"min_tokens": 25}, "decoding.min_tokens"),  # more than max_new_tokens
    ],
)
def test_bad_logit_bias_and_min_tokens_over_grpc_name_the_field(tiny_stack, fields, field):
    with pytest.raises(grpc.RpcError) as err:
        _grpc(tiny_stack.address, PROMPT, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


async def test_async_client_n_choices_and_seeds(front):
    """n=2 sampled choices run as two requests (seeds s and s+1); choice 0 is what n=1 gives
    (a fixed draft schedule: which tokens a seed draws depends on the drafts it tests)."""
    client = openai.AsyncOpenAI(base_url=front.base_url, api_key=front.api_key, max_retries=0, timeout=60)
    params = dict(model=front.model, messages=CHAT, max_tokens=8, temperature=0.9, seed=7, extra_body=SPEC)
    both = await client.chat.completions.create(n=2, **params)
    one = await client.chat.completions.create(**params)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].message.content == one.choices[0].message.content
    assert both.usage.completion_tokens == 16 and both.usage.prompt_tokens == one.usage.prompt_tokens
    streamed: dict[int, str] = {0: "", 1: ""}
    async for chunk in await client.chat.completions.create(n=2, stream=True, **params):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in both.choices]
    await client.close()


def test_logprobs_with_speculation_equal_plain_decoding(tiny_stack, front):
    """Chat logprobs (greedy) with the n-gram and the model drafter equal drafter `none`'s to
    1e-5, streamed or not, and the gRPC chunks carry the same values."""
    client = front.client()

    def ask(drafter: str, **extra):
        speculation = {"drafter": drafter, "max_draft_tokens": 3, "adaptive": False}
        return client.chat.completions.create(
            model=front.model,
            messages=CHAT,
            temperature=0.0,
            max_tokens=16,
            logprobs=True,
            top_logprobs=3,
            **extra,
            extra_body={"ignore_eos": True, "speculation": speculation},
        )

    plain = ask("none").choices[0]
    entries = plain.logprobs.content
    assert len(entries) == 16 and all(len(e.top_logprobs) == 3 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-9 for e in entries)  # greedy: the most likely
    for drafter in ("ngram", f"model:{tiny_stack.stack.env['SPECDEC_DRAFTER'].split(':', 1)[1]}"):
        reply = ask(drafter)
        assert reply.usage.speculation["proposed_tokens"] > 0
        spec = reply.choices[0]
        assert spec.message.content == plain.message.content
        for a, b in zip(spec.logprobs.content, entries, strict=True):
            assert (a.token, [t.token for t in a.top_logprobs]) == (b.token, [t.token for t in b.top_logprobs])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    streamed = [
        lp
        for c in ask("ngram", stream=True)
        if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.content
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    with Client(tiny_stack.address, timeout_s=60) as grpc_client:
        chunks = [
            e.chunk
            for e in grpc_client.generate(
                messages=CHAT,
                max_new_tokens=16,
                temperature=0.0,
                ignore_eos=True,
                drafter="ngram",
                k=3,
                adaptive=False,
                logprobs=3,
            )
            if e.HasField("chunk")
        ]
    values = [lp.logprob for c in chunks for lp in c.logprobs]
    assert sum(len(c.token_ids) for c in chunks) == 16 and values == pytest.approx(
        [e.logprob for e in entries], abs=1e-5
    )
    completion = client.completions.create(
        model=front.model, prompt=PROMPT, max_tokens=5, temperature=0.0, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset == sorted(lp.text_offset) and all(len(top) <= 2 for top in lp.top_logprobs)


def test_models_health_and_metrics(front):
    models = front.client().models.list()
    assert [m.id for m in models.data] == [front.model]
    assert "ngram" in models.data[0].model_extra["drafters"]
    status, body = front.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["replicas"]["target"] >= 1
    front.client().completions.create(model=front.model, prompt="hello there", max_tokens=2)
    status, text = front.get("/metrics")
    assert status == 200 and "specdec_requests_total" in text and "specdec_generated_tokens_total" in text


BAD = [  # (endpoint, fields, the param named)
    ("chat", {"temperature": -1.0}, "temperature"),
    ("chat", {"temperature": "hot"}, "temperature"),
    ("chat", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("completions", {"max_tokens": 10**9}, "max_tokens"),
    ("chat", {"top_p": 0.0}, "top_p"),
    ("chat", {"presence_penalty": 2.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": -3.0}, "frequency_penalty"),
    ("chat", {"extra_body": {"repetition_penalty": 0.0}}, "repetition_penalty"),
    ("completions", {"extra_body": {"repetition_penalty": -1.0}}, "repetition_penalty"),
    ("chat", {"extra_body": {"min_p": 1.5}}, "min_p"),
    ("completions", {"extra_body": {"min_p": -0.1}}, "min_p"),
    ("chat", {"extra_body": {"min_tokens": 5}}, "min_tokens"),  # more than max_tokens
    ("completions", {"extra_body": {"min_tokens": -1}}, "min_tokens"),
    ("chat", {"logit_bias": {"17": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"999999999": 1}}, "logit_bias"),  # not a token of the model
    ("chat", {"logit_bias": {"cat": 1}}, "logit_bias"),
    ("chat", {"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs.regex"),
    ("completions", {"extra_body": {"guided_regex": "[z-a]"}}, "guided_regex"),
    ("chat", {"extra_body": {"guided_json": {"type": "nonsense"}}}, "guided_json"),
    ("chat", {"extra_body": {"structured_outputs": {"choice": ["a", "b"]}}}, "structured_outputs.choice"),
    (
        "chat",
        {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}},
        "guided_regex",
    ),
    ("chat", {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("completions", {"logprobs": 21}, "logprobs"),
    (
        "chat",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        "response_format",
    ),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("completions", {"extra_body": {"response_format": {"type": "grammar"}}}, "response_format"),
    ("chat", {"extra_body": {"speculation": {"drafter": "telepathy"}}}, "speculation.drafter"),
    ("chat", {"extra_body": {"speculation": {"max_draft_tokens": 99}}}, "speculation.max_draft_tokens"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("chat", {"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ("chat", {"stream": True, "temperature": -1.0}, "temperature"),
    ("completions", {"prompt": "   "}, "prompt"),
    ("completions", {"n": 200}, "n"),
]


@pytest.mark.parametrize("endpoint,fields,param", BAD, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_parameter_is_400_naming_it(front, endpoint, fields, param):
    client = front.client()
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            result = client.chat.completions.create(
                **{"model": front.model, "messages": CHAT, "max_tokens": 4, **fields}
            )
        else:
            result = client.completions.create(**{"model": front.model, "prompt": "hi", "max_tokens": 4, **fields})
        list(result) if fields.get("stream") else None
    assert err.value.status_code == 400 and err.value.param == param, err.value.body
    assert err.value.body["type"] == "invalid_request_error" and param in err.value.body["message"]


def _post(front: Front, path: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(
        front.base_url + path,
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {front.api_key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_sse_wire_format_and_oversized_body(front):
    """What a client without the openai package sees: `data: {json}` events, then
    `data: [DONE]`; a body over SPECDEC_MAX_REQUEST_BYTES is a 413; one that is not JSON a 400."""
    body = {
        "model": front.model,
        "prompt": "hello there",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    status, raw = _post(front, "/completions", json.dumps(body).encode())
    events = [line for line in raw.decode().splitlines() if line and not line.startswith(":")]
    assert status == 200 and all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["choices"] == []
    host, port = front.base_url.removeprefix("http://").split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/completions")  # refused on its Content-Length, before the body is sent
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(5 << 20))
    conn.endheaders()
    reply = conn.getresponse()
    assert reply.status == 413  # Starlette's own plain-text answer
    conn.close()
    status, raw = _post(front, "/completions", b"{not json")
    assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_json"


def test_api_key_is_required_like_on_the_grpc_port(front):
    for key in ("sk-wrong", ""):
        with pytest.raises(openai.AuthenticationError) as err:
            front.client(api_key=key or "-").chat.completions.create(model=front.model, messages=CHAT, max_tokens=2)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        front.client(api_key="sk-wrong").models.list()
    with pytest.raises(openai.AuthenticationError):  # the key is checked before the body
        front.client(api_key="sk-wrong").chat.completions.create(model=front.model, messages=CHAT, temperature="x")
    assert front.get("/health")[0] == 200  # probes need no key
    with grpc.insecure_channel(front.grpc) as channel:  # the same keys guard the coordinator's gRPC port
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = make_request(generation_pb2.CompleteRequest, "hello there", max_new_tokens=2)
        for key, code in (("sk-wrong", grpc.StatusCode.UNAUTHENTICATED), (API_KEY, None)):
            try:
                stub.Complete(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
                assert code is None
            except grpc.RpcError as err:
                assert err.code() == code


def test_unknown_model_is_404(front):
    with pytest.raises(openai.NotFoundError) as err:
        front.client().chat.completions.create(model="gpt-17", messages=CHAT, max_tokens=4)
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_overload_is_429_and_a_closed_stream_frees_its_slot(front):
    """Two streams hold both running slots (none may queue): a third request is refused
    with 429 and Retry-After; closing the streams ends their requests on the server."""
    client = front.client()
    held = [
        client.completions.create(
            model=front.model,
            prompt=PROMPT,
            max_tokens=400,
            temperature=0.0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for _ in range(2)
    ]
    for stream in held:
        next(iter(stream))  # the headers came with a verified chunk: the request is running
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=front.model, prompt="hello there", max_tokens=2)
    assert err.value.status_code == 429 and int(err.value.response.headers["retry-after"]) >= 1
    for stream in held:
        stream.close()
    wait_until(
        lambda: json.loads(front.get("/health")[1])["active_requests"] == 0,
        timeout_s=30,
        what="the closed streams' requests to end",
    )
    assert client.completions.create(model=front.model, prompt="hello there", max_tokens=2).choices[0].text


def test_no_target_tier_is_503(fronts):
    orphan = fronts[1]
    with pytest.raises(openai.InternalServerError) as err:
        orphan.client().chat.completions.create(model=orphan.model, messages=CHAT, max_tokens=4)
    assert err.value.status_code == 503 and "target" in err.value.message
    with pytest.raises(openai.InternalServerError) as err:  # streamed: refused before the stream opens
        list(orphan.client().chat.completions.create(model=orphan.model, messages=CHAT, max_tokens=4, stream=True))
    assert err.value.status_code == 503


@pytest.mark.parametrize("flag,port", [([], "8000"), (["--http-port", "0"], "0"), (["--http-port", "9123"], "9123")])
def test_up_turns_the_http_front_on_and_prints_it(monkeypatch, capsys, flag, port):
    """`specdec up` gives its first coordinator SPECDEC_HTTP_PORT (default 8000) and prints `http:`."""
    from specdec import cli, launcher

    asked = {}

    def fake_start_stack(*args, extra_env=None, **kwargs):
        asked.update(extra_env or {})
        stack = launcher.Stack(log_dir=launcher.Path("/tmp"), redis_url="redis://x:1/0")
        stack.coordinators, stack.coordinator = ["127.0.0.1:5000"], "127.0.0.1:5000"
        stack.http = [f"http://127.0.0.1:{port}/v1"] if port != "0" else []
        return stack

    def interrupt(_: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.delenv("SPECDEC_HTTP_PORT", raising=False)
    monkeypatch.setattr(launcher, "start_stack", fake_start_stack)
    monkeypatch.setattr(cli.time, "sleep", interrupt)
    assert cli.main(["up", "--model", "m", "--drafter", "ngram", *flag]) == 0
    assert asked["SPECDEC_HTTP_PORT"] == port
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("http: ")]
    assert lines == ([f"http: http://127.0.0.1:{port}/v1"] if port != "0" else [])
