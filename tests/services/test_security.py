"""Access control with real gRPC servers and real certificates (trustme): mTLS between the
coordinator and a tier, certificates rotated without a restart, the internal token, API
keys with a per-key call limit. The draft tier's real servicer (n-gram, no model) serves."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from specdec.core.drafters.worker import DraftWorker
from specdec.core.local import LocalDrafter
from specdec.draft.service import DraftServicer
from specdec.rpc.auth import AccessInterceptor, AccessPolicy, hash_api_key
from specdec.rpc.local_pki import make_local_pki
from specdec.rpc.streams import Dial
from specdec.rpc.tls import TlsFiles, channel_credentials, server_credentials
from specdec.v1 import draft_pb2, draft_pb2_grpc, sampling_pb2

pytest.importorskip("trustme")


@contextlib.asynccontextmanager
async def draft_server(policy: AccessPolicy, tls: TlsFiles | None = None, client_auth: bool = True):
    server = grpc.aio.server(interceptors=[AccessInterceptor(policy)])
    draft_pb2_grpc.add_DraftServiceServicer_to_server(DraftServicer(LocalDrafter(DraftWorker())), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = (
        server.add_secure_port("127.0.0.1:0", server_credentials(tls, client_auth))
        if tls
        else server.add_insecure_port("127.0.0.1:0")
    )
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def propose(channel: grpc.aio.Channel, metadata: tuple = ()) -> draft_pb2.ProposeResult:
    item = draft_pb2.ProposeItem(
        tag=1,
        session_id=uuid.uuid4().hex,
        tokens=[1, 2, 3, 1, 2],
        num_tokens=2,
        drafter="ngram",
        sampling=sampling_pb2.SamplingParams(top_p=1.0),
    )

    async def requests():
        yield draft_pb2.ProposeRequest(items=[item])

    call = draft_pb2_grpc.DraftServiceStub(channel).Propose(requests(), metadata=metadata, timeout=10)
    async for response in call:
        return response.results[0]
    raise AssertionError("no answer")


def code_of(exc: BaseException) -> grpc.StatusCode:
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    return exc.code()


async def test_tiers_serve_only_a_coordinator_over_mtls(tmp_path: Path):
    pki, other = make_local_pki(tmp_path / "pki"), make_local_pki(tmp_path / "other")
    async with draft_server(AccessPolicy(internal=True, tls=True), pki.tier) as address:
        async with Dial(pki.coordinator).channel(address) as channel:  # the coordinator: served
            assert list((await propose(channel)).tokens) == [3, 1]
        for stranger in (pki.client, other.coordinator):  # a user's certificate; another CA's coordinator
            async with Dial(stranger).channel(address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await propose(channel)
            assert code_of(err.value) in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.INTERNAL,  # a refused handshake, now and then (see below)
            )
        with pytest.raises(grpc.aio.AioRpcError) as err:  # no certificate at all: the handshake fails
            async with grpc.aio.secure_channel(
                address,
                channel_credentials(TlsFiles("", "", pki.ca)),
                options=[("grpc.ssl_target_name_override", "specdec-tier")],
            ) as channel:
                await propose(channel)
        assert code_of(err.value) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)


async def test_the_user_certificate_of_the_right_ca_is_refused_by_name(tmp_path: Path):
    pki = make_local_pki(tmp_path / "pki")
    async with draft_server(AccessPolicy(internal=True, tls=True), pki.tier) as address:
        async with Dial(pki.client).channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await propose(channel)
    assert code_of(err.value) == grpc.StatusCode.PERMISSION_DENIED


async def test_rotated_certificate_files_are_served_without_a_restart(tmp_path: Path):
    old, new = make_local_pki(tmp_path / "old"), make_local_pki(tmp_path / "new")
    live = TlsFiles(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), str(tmp_path / "ca.pem"))

    def install(pki) -> None:  # as a mounted Secret changes: new files in place
        for src, dst in ((pki.tier.cert, live.cert), (pki.tier.key, live.key), (pki.ca, live.ca)):
            Path(dst).write_bytes(Path(src).read_bytes())

    install(old)
    async with draft_server(AccessPolicy(internal=True, tls=True), live) as address:
        async with Dial(old.coordinator).channel(address) as channel:
            assert (await propose(channel)).tokens
        install(new)
        async with Dial(new.coordinator).channel(address) as channel:  # a new handshake: the new files
            assert (await propose(channel)).tokens
        async with Dial(old.coordinator).channel(address) as channel:  # the old CA is gone
            with pytest.raises(grpc.aio.AioRpcError):
                await propose(channel)


async def test_without_tls_tiers_want_the_internal_token():
    async with draft_server(AccessPolicy(internal=True, internal_token="s3cret")) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await propose(channel)
            assert code_of(err.value) == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await propose(channel, (("x-specdec-internal-token", "guess"),))
            assert code_of(err.value) == grpc.StatusCode.PERMISSION_DENIED
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING  # probes stay open
        async with Dial(token="s3cret").channel(address) as channel:
            assert (await propose(channel)).tokens


async def test_api_keys_and_the_per_key_call_limit():
    policy = AccessPolicy(key_hashes=[bytes.fromhex(hash_api_key("k-1"))], max_calls_per_key=1)
    async with draft_server(policy) as address, grpc.aio.insecure_channel(address) as channel:
        for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "k-1"),)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await propose(channel, metadata)
            assert code_of(err.value) == grpc.StatusCode.UNAUTHENTICATED
        key = (("authorization", "Bearer k-1"),)
        assert (await propose(channel, key)).tokens

        async def idle_stream():  # holds its call open until cancelled
            yield draft_pb2.ProposeRequest()
            await asyncio.Event().wait()

        holding = draft_pb2_grpc.DraftServiceStub(channel).Propose(idle_stream(), metadata=key)
        await holding.wait_for_connection()
        for _ in range(100):  # the server has registered the held call once a second one is refused
            try:
                await propose(channel, key)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the second concurrent call with one key was not refused")
        holding.cancel()


async def test_a_rotated_api_keys_file_is_used_without_a_restart(tmp_path: Path, monkeypatch):
    import os

    from specdec.rpc import auth

    monkeypatch.setattr(auth, "KEYS_POLL_S", 0.0)
    keys = tmp_path / "api-keys"
    keys.write_text(hash_api_key("old-key") + "\n")
    policy = AccessPolicy(key_hashes=auth.load_key_hashes(str(keys)), keys_file=str(keys))
    async with draft_server(policy) as address, grpc.aio.insecure_channel(address) as channel:
        assert (await propose(channel, (("authorization", "Bearer old-key"),))).tokens
        keys.write_text("# rotated\n" + hash_api_key("new-key") + "\n")
        os.utime(keys, ns=(1, 1))  # a changed mtime even within the filesystem's clock resolution
        assert (await propose(channel, (("authorization", "Bearer new-key"),))).tokens
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await propose(channel, (("authorization", "Bearer old-key"),))
        assert code_of(err.value) == grpc.StatusCode.UNAUTHENTICATED
        keys.write_text("not a digest\n")  # a broken rotation keeps the keys in force
        os.utime(keys, ns=(2, 2))
        assert (await propose(channel, (("authorization", "Bearer new-key"),))).tokens


@pytest.fixture(scope="module")
def tls_stack(tiny_models, valkey):
    from specdec.launcher import start_stack
    from tests.conftest import free_port

    prefix = f"specdec-tls-{uuid.uuid4().hex[:6]}:"
    env = {"SPECDEC_REDIS_PREFIX": prefix, "SPECDEC_TORCH_THREADS": "1", "SPECDEC_HEARTBEAT_S": "0.5"}
    stack = start_stack(
        tiny_models[0], "ngram", 1, 1, free_port(), valkey.url, extra_env=env, tls=True, api_key="the-key"
    )
    yield stack
    stack.stop()


async def test_the_stack_under_mtls_generates_as_in_plaintext(tls_stack, prompt_ids, reference):
    from specdec.client import AsyncClient

    pki = tls_stack.pki
    async with AsyncClient(tls_stack.coordinator, timeout_s=60, tls=pki.client, api_key="the-key") as client:
        reply = await client.complete(token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True, drafter="ngram")
        streamed = [  # a streaming call carries the key too
            t
            async for event in client.generate(token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True)
            if event.HasField("chunk")
            for t in event.chunk.token_ids
        ]
    assert list(reply.token_ids) == reference and streamed == reference
    # A refused handshake reaches the caller as UNAVAILABLE, or now and then as INTERNAL
    # ("Internal error from Core": gRPC core's race between the alert and the first read).
    handshake = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
    refused = [
        (TlsFiles("", "", pki.ca), "the-key", handshake),  # no client certificate
        (make_local_pki(Path(tls_stack.log_dir) / "stranger").client, "the-key", handshake),
        (pki.client, "a-wrong-key", (grpc.StatusCode.UNAUTHENTICATED,)),
    ]
    for tls, key, codes in refused:
        async with AsyncClient(tls_stack.coordinator, timeout_s=20, max_retries=0, tls=tls, api_key=key) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete(token_ids=prompt_ids, max_new_tokens=2)
        assert err.value.code() in codes, (tls, key, err.value)


async def test_a_forged_verify_from_a_user_certificate_is_refused(tls_stack, prompt_ids):
    """Holding a certificate of the right CA is not enough to advance someone's session."""
    from specdec.v1 import target_pb2, target_pb2_grpc

    target = next(c.address for c in tls_stack.children if c.name.startswith("target-"))
    item = target_pb2.VerifyItem(
        tag=1,
        session_id="a-victim",
        tokens=prompt_ids,
        draft_tokens=[1, 2],
        sampling=sampling_pb2.SamplingParams(top_p=1.0),
    )

    async def requests():
        await asyncio.sleep(0.2)  # let the refusal arrive first (see below)
        yield target_pb2.VerifyRequest(items=[item])

    codes = []
    async with Dial(tls_stack.pki.client).channel(target) as channel:
        for _ in range(3):  # every attempt is refused; at least one says why
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in target_pb2_grpc.TargetServiceStub(channel).Verify(requests(), timeout=10):
                    pass
            codes.append(err.value.code())
            if codes[-1] == grpc.StatusCode.PERMISSION_DENIED:
                break
    # The tier refuses at the start of the call. A request still being written when the
    # refusal lands makes the client report its own failed write as INTERNAL instead.
    assert codes[-1] == grpc.StatusCode.PERMISSION_DENIED, codes
    assert set(codes) <= {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL}, codes


def served_certificate(port: int, trusted: list[str], client: TlsFiles) -> bytes:
    """The DER certificate the server presents on a fresh handshake."""
    context = ssl.create_default_context(cafile=trusted[0])
    for ca in trusted[1:]:
        context.load_verify_locations(ca)
    context.load_cert_chain(client.cert, client.key)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def leaf_der(cert_file: str) -> bytes:
    pem = Path(cert_file).read_text()
    return ssl.PEM_cert_to_DER_cert(pem[: pem.index("-----END CERTIFICATE-----") + 25])


def test_the_http_front_serves_rotated_certificate_files_without_a_restart(tls_stack, tmp_path: Path):
    import sys

    from specdec.launcher import wait_healthy
    from specdec.rpc.local_pki import tls_env
    from tests.conftest import free_port
    from tests.waiting import wait_until

    old, new = tls_stack.pki, make_local_pki(tmp_path / "new")
    live = TlsFiles(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"), str(tmp_path / "ca.pem"))

    def install(files: TlsFiles) -> None:  # as a mounted Secret changes: new files in place
        for src, dst in ((files.cert, live.cert), (files.key, live.key), (files.ca, live.ca)):
            Path(dst).write_bytes(Path(src).read_bytes())

    install(old.coordinator)
    grpc_port, http_port = free_port(), free_port()
    env = {**tls_stack.env, **tls_env(live), "SPECDEC_HTTP_PORT": str(http_port), "SPECDEC_METRICS_PORT": "0"}
    argv = [sys.executable, "-m", "specdec.cli", "serve", "coordinator", "--port", str(grpc_port)]
    child = tls_stack.spawn("coordinator-rotating", argv, env, f"127.0.0.1:{grpc_port}")
    child.tls = old.client
    try:
        wait_healthy(child)
        trusted = [old.ca, new.ca]
        assert served_certificate(http_port, trusted, old.client) == leaf_der(old.coordinator.cert)
        install(new.coordinator)
        wait_until(
            lambda: served_certificate(http_port, trusted, old.client) == leaf_der(new.coordinator.cert),
            timeout_s=15,
            what="the HTTP front to serve the rotated certificate",
        )
    finally:
        child.proc.terminate()
        child.proc.wait(timeout=30)


def test_hash_key_prints_the_line_the_keys_file_wants(tmp_path: Path):
    import subprocess
    import sys

    from specdec.rpc.auth import load_key_hashes

    done = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "hash-key"], input="s3cret\n", capture_output=True, text=True, check=True
    )
    keys = tmp_path / "keys"
    keys.write_text(done.stdout)
    assert AccessPolicy(key_hashes=load_key_hashes(str(keys))).key_ok("s3cret") is not None
    assert "s3cret" not in done.stdout
