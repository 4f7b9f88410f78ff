"""One way to connect to Redis/Valkey from a URL, for every process.

* ``redis://[user:password@]host:port/db``: plaintext, with AUTH (or ACL user) when the URL
  carries credentials;
* ``rediss://...``: TLS, the server's certificate checked against SPECDEC_REDIS_CA (the
  system's CAs when unset) and its host name; SPECDEC_REDIS_CERT / SPECDEC_REDIS_KEY add a
  client certificate for servers that want one (``tls-auth-clients``).
* ``unix:///path/to/socket``.

The TLS files apply to ``rediss://`` URLs only (an operator watching several deployments may
reach some over TLS and some not). They are read whenever a connection opens, so rotated
files take effect without a restart. Sync clients for threads and tools, asyncio ones for
event loops (never a blocking call inside ``async def``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis

SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisTls:
    """Certificate files for ``rediss://`` (paths; empty = not used)."""

    ca_file: str = ""  # PEM CA bundle the server's certificate must chain to (SPECDEC_REDIS_CA)
    cert_file: str = ""  # PEM client certificate (SPECDEC_REDIS_CERT)
    key_file: str = ""  # PEM key of the client certificate (SPECDEC_REDIS_KEY)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RedisTls:
        env = os.environ if env is None else env
        return cls(env.get("SPECDEC_REDIS_CA", ""), env.get("SPECDEC_REDIS_CERT", ""), env.get("SPECDEC_REDIS_KEY", ""))

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("SPECDEC_REDIS_CERT and SPECDEC_REDIS_KEY go together: set both or neither")


@dataclass(frozen=True)
class Timeouts:
    """Seconds a call (`socket_s`) and a connect (`connect_s`) may take before they fail."""

    socket_s: float
    connect_s: float


# What each kind of caller waits: the serving path fails fast and carries on without Redis.
SERVICE = Timeouts(2.0, 2.0)  # registry, session records (asyncio)
KV = Timeouts(1.0, 0.5)  # KV chunks on the worker thread: a slow Redis is a miss, not a stall
OPERATOR = Timeouts(5.0, 5.0)  # the operator's load reads, once a reconcile
TOOL = Timeouts(10.0, 5.0)  # launcher, soak, benchmarks, tests


def redact(url: str) -> str:
    """The URL with its password replaced, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}***@{netloc}"))


def connection_options(url: str, timeouts: Timeouts, tls: RedisTls | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Redis.from_url(url, **options)``; ValueError for a URL that is
    not a Redis URL, or TLS files that do not exist."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"Redis URL {redact(url)!r}: the scheme must be one of {SCHEMES}")
    options: dict[str, Any] = {"socket_timeout": timeouts.socket_s, "socket_connect_timeout": timeouts.connect_s}
    if scheme != "rediss":
        return options
    tls = RedisTls.from_env() if tls is None else tls
    for name, path in (("SPECDEC_REDIS_CA", tls.ca_file), ("SPECDEC_REDIS_CERT", tls.cert_file)):
        if path and not os.path.isfile(path):
            raise ValueError(f"{name}: no such file {path!r}")
    options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
    if tls.ca_file:
        options["ssl_ca_certs"] = tls.ca_file
    if tls.cert_file:
        options.update(ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file)
    return options


def connect(url: str, timeouts: Timeouts = TOOL, tls: RedisTls | None = None, **extra: Any) -> redis.Redis:
    """A sync client (threads, tools). `tls` defaults to the SPECDEC_REDIS_* files; `extra`
    goes to redis-py as is (``retry=...``)."""
    return redis.Redis.from_url(url, **connection_options(url, timeouts, tls), **extra)


def connect_async(url: str, timeouts: Timeouts = SERVICE, tls: RedisTls | None = None, **extra: Any) -> aioredis.Redis:
    """An asyncio client (event loops), otherwise as :func:`connect`."""
    return aioredis.Redis.from_url(url, **connection_options(url, timeouts, tls), **extra)
