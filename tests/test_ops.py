"""fieldcrypt in production: TLS on both sides, credentials, metrics, logs, hot reload,
limits and workers.

Everything runs for real: the `redis` kind's server (tests/conftest.py), with TLS
where it matters (tests/servers.py TlsServer), fieldcrypt either in a thread of the test
process (`ProxyThread`, built from a YAML file by `load_settings` and `Runtime` as
`fieldcrypt serve` builds it) or as the `fieldcrypt serve` subprocess itself, and real
clients (redis-py, redis-cli, bare sockets where exact reply bytes or an unannounced
disconnect matter).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from proxy import resp
from proxy.app import Runtime
from proxy.config import load_settings
from proxy.crypto import Key, KeyRing, generate_key
from tests.servers import (
    EmbeddedServer,
    ProxyThread,
    ServeProcess,
    TlsServer,
    cli_binary,
    cli_has_tls,
    free_port,
    server_binary,
    wait_for,
)

HOST = "127.0.0.1"
UPSTREAM_PW = "upstream-Only@pw/9:x"  # what Redis requires; clients never see it
CLIENT_PW = "client-pw-7c1e0b"  # what clients give the proxy
ADMIN_PW = "admin-pw-5d3f9a"
NO_RETRY = Retry(NoBackoff(), 0)  # a failed command fails; redis-py must not hide it
MAX_READS = 10_000  # bound on recv() calls while reading one reply or waiting for a close


# --- Certificates ------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate,
    and an unrelated CA that signed none of them."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    usage: x509.ObjectIdentifier | None = None,
    names: tuple[x509.GeneralName, ...] = (),
) -> x509.Certificate:
    now = datetime.now(UTC)
    is_ca = issuer is None
    signer = key if issuer is None else issuer[1]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name) if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(directory: Path, name: str, item: x509.Certificate | ec.EllipticCurvePrivateKey) -> str:
    path = directory / name
    if isinstance(item, x509.Certificate):
        path.write_bytes(item.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("fieldcrypt test CA", ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        "localhost",
        server_key,
        (ca, ca_key),
        ExtendedKeyUsageOID.SERVER_AUTH,
        (x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")),
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("fieldcrypt", client_key, (ca, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _certificate("some other CA", other_key)
    return Pki(
        ca=_write(directory, "ca.pem", ca),
        server_cert=_write(directory, "server.pem", server),
        server_key=_write(directory, "server-key.pem", server_key),
        client_cert=_write(directory, "client.pem", client),
        client_key=_write(directory, "client-key.pem", client_key),
        other_ca=_write(directory, "other-ca.pem", other),
    )


# --- Servers -----------------------------------------------------------------------


class TlsRedis:
    """A Redis serving TLS only: Debian's redis-server (`--port 0 --tls-port P`), or
    without it a pip server behind a TLS front (tests/servers.py TlsServer)."""

    def __init__(self, pki: Pki, directory: Path, auth_clients: bool) -> None:
        self.pki = pki
        self.server = TlsServer(pki.server_cert, pki.server_key, pki.ca, auth_clients, directory)
        self.port = self.server.port
        wait_for(self._answers, 10, f"redis-server with TLS on port {self.port}")

    def _answers(self) -> bool:
        assert not self.server.exited(), "redis-server with TLS exited at start"
        try:
            with self.direct() as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    @property
    def url(self) -> str:
        return f"rediss://{HOST}:{self.port}"

    def direct(self) -> redis.Redis:
        return redis.Redis(
            host=HOST,
            port=self.port,
            ssl=True,
            ssl_ca_certs=self.pki.ca,
            ssl_certfile=self.pki.client_cert,
            ssl_keyfile=self.pki.client_key,
        )

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def tls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(pki, tmp_path_factory.mktemp("tls-redis"), auth_clients=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    server = TlsRedis(pki, tmp_path_factory.mktemp("mtls-redis"), auth_clients=True)
    yield server
    server.stop()


@pytest.fixture
def plain_redis() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(server_binary("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def locked_redis(plain_redis: EmbeddedServer) -> EmbeddedServer:
    """A Redis that requires UPSTREAM_PW from every connection."""
    with redis.Redis(host=HOST, port=plain_redis.port) as client:
        client.config_set("requirepass", UPSTREAM_PW)
    return plain_redis


class Proxies:
    """fieldcrypt in threads of the test process, each configured by a YAML file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[ProxyThread] = []

    def start(self, url: str, **config: Any) -> ProxyThread:
        path = self.directory / f"fieldcrypt-{len(self.started)}.yaml"
        path.write_text(yaml.safe_dump({"upstream": url, **config}), encoding="utf-8")
        settings = load_settings(str(path), {}, {}, self.directory)
        proxy = ProxyThread(Runtime(settings, url, {}).state)
        self.started.append(proxy)
        return proxy

    def stop(self) -> None:
        for proxy in self.started:
            proxy.stop()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator[Proxies]:
    handle = Proxies(tmp_path)
    yield handle
    handle.stop()


@pytest.fixture
def cli_proxies() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for proxy in started:
        proxy.kill()


# --- Clients -----------------------------------------------------------------------


class Conn:
    """A bare RESP connection: exact reply bytes, and it never reconnects, so a dropped
    connection shows as ConnectionError."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(10)
        sock.connect((HOST, port))
        self.sock = sock
        self.replies = resp.ReplyReader()

    def send(self, *args: str | bytes) -> None:
        self.sock.sendall(
            resp.encode_request([a.encode() if isinstance(a, str) else a for a in args])
        )

    def read(self) -> bytes:
        for _ in range(MAX_READS):
            end = self.replies.next()
            if end >= 0:
                frame = bytes(self.replies.buffer[self.replies.pos : end])
                self.replies.pos = end
                self.replies.compact()
                return frame
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the proxy closed the connection")
            self.replies.feed(chunk)
        raise AssertionError("no complete reply")

    def call(self, *args: str | bytes) -> bytes:
        self.send(*args)
        return self.read()

    def closed_by_peer(self) -> bool:
        """Reads until the proxy closes the connection (True), or 10 s pass (False)."""
        try:
            for _ in range(MAX_READS):
                if not self.sock.recv(1 << 20):
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        self.sock.close()


def bulk(value: str | bytes) -> bytes:
    return resp.bulk(value.encode() if isinstance(value, str) else value)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[str, float]:
    """/metrics as {'name{label="v"}': value}."""
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def write_yaml(path: Path, config: Mapping[str, Any]) -> None:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")


def key_files(directory: Path, *names: str) -> dict[str, tuple[str, str]]:
    """A fresh secret per name, in name.secret: {name: (secret, kid)}."""
    made: dict[str, tuple[str, str]] = {}
    for name in names:
        secret = generate_key()
        (directory / f"{name}.secret").write_text(secret + "\n", encoding="ascii")
        made[name] = (secret, Key.from_secret(secret).kid)
    return made


def ring(*names: str) -> list[dict[str, str]]:
    return [{"secret_file": f"{name}.secret"} for name in names]


IAD_RULE = {"key": "iad:*", "fields": ["imap", "smtp"]}


# --- Upstream TLS ------------------------------------------------------------------


def test_proxy_reaches_a_tls_redis_when_it_trusts_the_ca(
    tls_redis: TlsRedis, pki: Pki, proxies: Proxies
) -> None:
    proxy = proxies.start(tls_redis.url, upstream_tls={"ca_file": pki.ca})
    with redis.Redis(host=HOST, port=proxy.port) as client:
        assert client.set("tls:greeting", "over rediss") is True
        assert client.get("tls:greeting") == b"over rediss"
    with tls_redis.direct() as direct:
        assert direct.get("tls:greeting") == b"over rediss"


@pytest.mark.parametrize(
    ("upstream_tls", "reason"),
    [
        pytest.param(
            {"ca_file": "other"},
            "(self-signed certificate in certificate chain|unable to get local issuer)",
            id="wrong-ca",
        ),
        pytest.param(
            {"ca_file": "ca", "server_hostname": "wrong.example"},
            "Hostname mismatch.*'wrong.example'",
            id="wrong-hostname",
        ),
    ],
)
@pytest.mark.parametrize("mode", ["dedicated", "pooled"])
def test_proxy_refuses_a_tls_redis_it_cannot_verify(
    tls_redis: TlsRedis,
    pki: Pki,
    proxies: Proxies,
    upstream_tls: dict[str, str],
    reason: str,
    mode: str,
) -> None:
    files = {"ca": pki.ca, "other": pki.other_ca}
    settings = {k: files.get(v, v) for k, v in upstream_tls.items()}
    proxy = proxies.start(tls_redis.url, upstream_tls=settings, upstream_mode=mode)
    conn = Conn(proxy.port)
    if mode == "pooled":
        conn.send("PING")  # a pooled client reaches upstream when it first sends
    # (dedicated: said unprompted, as soon as the client's own connection fails)
    reply = conn.read()
    assert re.fullmatch(
        rb"-ERR fieldcrypt: upstream 127\.0\.0\.1:%d unreachable "
        rb"\(TLS certificate verification failed: [^\r\n]+\)\r\n" % tls_redis.port,
        reply,
    ), reply
    assert re.search(reason.encode(), reply), reply
    assert conn.closed_by_peer()
    errors = proxy.run(lambda: proxy.state.stats.upstream_errors)
    assert errors == 1 if mode == "dedicated" else errors >= 1  # (and the spares' tries)


def test_proxy_reaches_a_tls_redis_without_verification_when_told_to(
    tls_redis: TlsRedis, proxies: Proxies
) -> None:
    proxy = proxies.start(tls_redis.url, upstream_tls={"verify": False})
    with redis.Redis(host=HOST, port=proxy.port) as client:
        assert client.set("tls:unverified", "ok") is True
        assert client.get("tls:unverified") == b"ok"


def test_redis_requiring_client_certificates_accepts_the_proxy_only_with_its_cert(
    mtls_redis: TlsRedis, pki: Pki, proxies: Proxies
) -> None:
    without = proxies.start(mtls_redis.url, upstream_tls={"ca_file": pki.ca})
    conn = Conn(without.port)
    with contextlib.suppress(OSError):
        conn.send("SET", "mtls:without", "1")
    assert conn.closed_by_peer()
    with mtls_redis.direct() as direct:
        assert direct.exists("mtls:without") == 0

    with_cert = proxies.start(
        mtls_redis.url,
        upstream_tls={"ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key},
    )
    with redis.Redis(host=HOST, port=with_cert.port) as client:
        assert client.set("mtls:with", "1") is True
    with mtls_redis.direct() as direct:
        assert direct.get("mtls:with") == b"1"


# --- Client TLS --------------------------------------------------------------------


def test_clients_talk_tls_to_the_proxy_and_plaintext_is_turned_away(
    plain_redis: EmbeddedServer, pki: Pki, proxies: Proxies
) -> None:
    proxy = proxies.start(
        plain_redis.url, tls={"cert_file": pki.server_cert, "key_file": pki.server_key}
    )
    secure = redis.Redis(
        host=HOST, port=proxy.port, ssl=True, ssl_ca_certs=pki.ca, ssl_check_hostname=True
    )
    assert secure.set("tls:client", "secret-free") is True

    plaintext = Conn(proxy.port)
    with contextlib.suppress(OSError):
        plaintext.send("PING")
    assert plaintext.closed_by_peer()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host=HOST, port=proxy.port, socket_timeout=5, retry=NO_RETRY).ping()

    assert secure.get("tls:client") == b"secret-free"  # the TLS client kept its connection
    with redis.Redis(host=HOST, port=proxy.port, ssl=True, ssl_ca_certs=pki.ca) as fresh:
        assert fresh.get("tls:client") == b"secret-free"
    secure.close()
    assert redis.Redis(port=plain_redis.port).get("tls:client") == b"secret-free"


def test_verify_clients_rejects_a_client_without_a_certificate(
    plain_redis: EmbeddedServer, pki: Pki, proxies: Proxies
) -> None:
    proxy = proxies.start(
        plain_redis.url,
        tls={
            "cert_file": pki.server_cert,
            "key_file": pki.server_key,
            "ca_file": pki.ca,
            "verify_clients": True,
        },
    )
    anonymous = redis.Redis(
        host=HOST, port=proxy.port, ssl=True, ssl_ca_certs=pki.ca, socket_timeout=5, retry=NO_RETRY
    )
    with pytest.raises(redis.ConnectionError):
        anonymous.set("mtls:anonymous", "1")
    anonymous.close()
    assert redis.Redis(port=plain_redis.port).exists("mtls:anonymous") == 0

    with redis.Redis(
        host=HOST,
        port=proxy.port,
        ssl=True,
        ssl_ca_certs=pki.ca,
        ssl_certfile=pki.client_cert,
        ssl_keyfile=pki.client_key,
    ) as known:
        assert known.set("mtls:known", "1") is True
        assert known.get("mtls:known") == b"1"


def test_redis_cli_tls_talks_to_the_proxy(
    plain_redis: EmbeddedServer, pki: Pki, proxies: Proxies
) -> None:
    proxy = proxies.start(
        plain_redis.url, tls={"cert_file": pki.server_cert, "key_file": pki.server_key}
    )
    if not cli_has_tls(cli_binary("redis")):
        pytest.skip(f"{cli_binary('redis')} has no TLS (Debian's redis-cli has it)")
    base = [cli_binary("redis"), "--tls", "--cacert", pki.ca, "-h", HOST, "-p", str(proxy.port)]
    run = subprocess.run([*base, "SET", "cli:tls", "typed"], capture_output=True, timeout=30)
    assert run.stdout.strip() == b"OK", run.stderr
    run = subprocess.run([*base, "GET", "cli:tls"], capture_output=True, timeout=30)
    assert run.stdout.strip() == b"typed", run.stderr
    refused = subprocess.run(
        [cli_binary("redis"), "-h", HOST, "-p", str(proxy.port), "PING"],
        capture_output=True,
        timeout=30,
    )
    assert b"PONG" not in refused.stdout


# --- Credentials -------------------------------------------------------------------


def test_upstream_password_from_the_url_is_used_for_every_connection(
    locked_redis: EmbeddedServer, proxies: Proxies
) -> None:
    with_password = proxies.start(
        f"redis://:{quote(UPSTREAM_PW, safe='')}@{HOST}:{locked_redis.port}"
    )
    conn = Conn(with_password.port)
    assert conn.call("SET", "cred:url", "1") == b"+OK\r\n"
    assert conn.call("GET", "cred:url") == bulk("1")

    without = proxies.start(locked_redis.url)
    assert Conn(without.port).call("GET", "cred:url").startswith(b"-NOAUTH")


@pytest.mark.parametrize("source", ["env", "file"])
def test_upstream_password_from_the_environment(
    locked_redis: EmbeddedServer, tmp_path: Path, cli_proxies: list[ServeProcess], source: str
) -> None:
    if source == "env":
        env = {"FIELDCRYPT_UPSTREAM_PASSWORD": UPSTREAM_PW}
    else:
        secret = tmp_path / "upstream-password"
        secret.write_text(UPSTREAM_PW + "\n", encoding="utf-8")
        env = {"FIELDCRYPT_UPSTREAM_PASSWORD_FILE": str(secret)}
    proxy = ServeProcess(tmp_path, "--upstream", locked_redis.url, env=env)
    cli_proxies.append(proxy)
    conn = Conn(proxy.port)
    assert conn.call("SET", f"cred:{source}", "1") == b"+OK\r\n"
    assert conn.call("GET", f"cred:{source}") == bulk("1")
    conn.close()
    assert proxy.stop() == 0
    assert UPSTREAM_PW not in proxy.log


def test_a_clients_own_auth_and_hello_auth_reach_redis(
    plain_redis: EmbeddedServer, proxies: Proxies
) -> None:
    direct = redis.Redis(port=plain_redis.port)
    direct.acl_setuser(
        "alice", enabled=True, passwords=["+alice-pw"], keys=["*"], commands=["+@all"]
    )
    proxy = proxies.start(plain_redis.url)

    plain = Conn(proxy.port)
    assert plain.call("AUTH", "alice", "alice-pw") == b"+OK\r\n"
    assert plain.call("ACL", "WHOAMI") == bulk("alice")

    hello = Conn(proxy.port)
    reply = hello.call("HELLO", "3", "AUTH", "alice", "alice-pw")
    assert reply.startswith(b"%") and b"proto" in reply
    assert hello.call("ACL", "WHOAMI") == bulk("alice")

    wrong = Conn(proxy.port)
    assert wrong.call("AUTH", "alice", "not-it").startswith(b"-WRONGPASS")
    assert wrong.call("ACL", "WHOAMI") == bulk("default")
    log = direct.acl_log()
    assert [entry["username"] for entry in log] == ["alice"]  # Redis judged it


@pytest.mark.parametrize("mode", ["dedicated", "pooled"])
def test_proxy_side_client_password_gates_clients_and_never_reaches_redis(
    locked_redis: EmbeddedServer, proxies: Proxies, mode: str
) -> None:
    url = f"redis://:{quote(UPSTREAM_PW, safe='')}@{HOST}:{locked_redis.port}"
    proxy = proxies.start(url, client_password=CLIENT_PW, upstream_mode=mode)
    direct = redis.Redis(port=locked_redis.port, password=UPSTREAM_PW)
    direct.config_resetstat()
    direct.acl_log_reset()

    auth = Conn(proxy.port)
    assert auth.call("GET", "gate:1") == b"-NOAUTH Authentication required.\r\n"
    assert auth.call("AUTH", CLIENT_PW) == b"+OK\r\n"
    assert auth.call("SET", "gate:1", "v") == b"+OK\r\n"
    assert auth.call("GET", "gate:1") == bulk("v")

    named = Conn(proxy.port)
    assert named.call("AUTH", "default", CLIENT_PW) == b"+OK\r\n"
    assert named.call("GET", "gate:1") == bulk("v")

    hello = Conn(proxy.port)
    reply = hello.call("HELLO", "3", "AUTH", "default", CLIENT_PW)
    assert reply.startswith(b"%") and b"proto" in reply
    assert hello.call("GET", "gate:1") == bulk("v")

    wrong = Conn(proxy.port)
    assert wrong.call("AUTH", "wrong-password").startswith(b"-WRONGPASS")
    assert wrong.call("HELLO", "3", "AUTH", "default", "wrong-password").startswith(b"-WRONGPASS")
    assert wrong.call("GET", "gate:1") == b"-NOAUTH Authentication required.\r\n"
    assert wrong.call("AUTH", UPSTREAM_PW).startswith(b"-WRONGPASS")  # Redis's is no use here

    # The proxy's own AUTH, once per upstream connection it opened: one for each client
    # that authenticated (dedicated), or each shared and spare one (pooled); `wrong`
    # never reached Redis.
    assert proxy.state.pools is None or mode == "pooled"
    pools = proxy.state.pools
    connections = 3 if pools is None else proxy.run(lambda: pools.opened)
    stats = direct.info("commandstats")
    assert stats["cmdstat_auth"]["calls"] == connections  # the proxy's own, one per connection
    assert stats["cmdstat_auth"].get("failed_calls", 0) == 0
    assert "cmdstat_hello" in stats  # HELLO went on, without the credentials
    assert stats["cmdstat_hello"].get("failed_calls", 0) == 0
    assert direct.acl_log() == []


# --- Metrics -----------------------------------------------------------------------


def test_metrics_count_the_traffic_and_health_follows_the_upstream(
    plain_redis: EmbeddedServer, tmp_path: Path, cli_proxies: list[ServeProcess]
) -> None:
    key_files(tmp_path, "a")
    write_yaml(tmp_path / "fieldcrypt.yaml", {"keys": ring("a"), "rules": [IAD_RULE]})
    metrics_port = free_port()
    proxy = ServeProcess(
        tmp_path,
        "--upstream",
        plain_redis.url,
        "--config",
        "fieldcrypt.yaml",
        "--metrics-listen",
        f"{HOST}:{metrics_port}",
    )
    cli_proxies.append(proxy)
    direct = redis.Redis(port=plain_redis.port)
    sets, hsets, hgets = 40, 6, 9
    client = redis.Redis(port=proxy.port)
    for i in range(sets):
        client.set(f"plain:{i}", f"value-{i}")
    for i in range(hsets):
        client.hset(f"iad:{i}", "imap", f"imap-secret-{i}")
    for i in range(hgets):
        assert client.hget(f"iad:{i % hsets}", "imap") == f"imap-secret-{i % hsets}".encode()
    foreign = KeyRing([Key.from_secret(generate_key())]).encrypt(b"not ours", b"imap")
    direct.hset("iad:foreign", "imap", foreign)
    with pytest.raises(redis.ResponseError, match="cannot decrypt"):
        client.hget("iad:foreign", "imap")
    direct.hset("iad:legacy", "imap", "written-before-encryption")
    assert client.hget("iad:legacy", "imap") == b"written-before-encryption"

    metrics = scrape(metrics_port)
    assert metrics['fieldcrypt_commands_total{command="set"}'] == sets
    assert metrics['fieldcrypt_commands_total{command="hset"}'] == hsets
    assert metrics['fieldcrypt_commands_total{command="hget"}'] == hgets + 2
    assert metrics["fieldcrypt_connections_total"] == 1
    assert metrics["fieldcrypt_connections_open"] == 1
    assert metrics["fieldcrypt_connections_rejected_total"] == 0
    assert metrics["fieldcrypt_bytes_in_total"] > 0
    assert metrics["fieldcrypt_bytes_out_total"] > 0
    assert metrics["fieldcrypt_values_encrypted_total"] == hsets
    assert metrics["fieldcrypt_values_decrypted_total"] == hgets
    assert metrics["fieldcrypt_cleartext_reads_total"] == 1
    assert metrics['fieldcrypt_decrypt_failures_total{reason="no key in the ring"}'] == 1
    assert metrics["fieldcrypt_upstream_errors_total"] == 0
    assert metrics["fieldcrypt_command_latency_seconds_count"] > 0  # >= 32 SETs: sampled
    assert http_get(metrics_port, "/healthz") == (200, "ok\n")
    assert http_get(metrics_port, "/readyz")[0] == 200

    cli = subprocess.run(
        [cli_binary("redis"), "-p", str(proxy.port), "FIELDCRYPT", "INFO"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    info = dict(line.split(":", 1) for line in cli.stdout.decode().splitlines() if ":" in line)
    assert info["values_encrypted"] == str(hsets)
    assert info["values_decrypted"] == str(hgets)
    assert info["cleartext_reads"] == "1"
    assert info["decrypt_failures"] == "1"
    assert info["decrypt_failures_no_key_in_the_ring"] == "1"
    assert info["cmdstat_set"] == f"calls={sets}"
    assert info["cmdstat_hset"] == f"calls={hsets}"
    assert int(info["total_net_input_bytes"]) >= metrics["fieldcrypt_bytes_in_total"]
    assert info["upstream_errors"] == "0"

    admin = Conn(proxy.port)  # a loopback client: admin without an admin password
    assert admin.call("MIGRATE").endswith(bulk("state") + bulk("running"))
    assert bulk("state") + bulk("done") in admin.call("MIGRATE", "WAIT", "30")
    admin.close()
    metrics = scrape(metrics_port)
    assert metrics['fieldcrypt_migration{what="keys_scanned"}'] == hsets + 2
    assert metrics['fieldcrypt_migration{what="fields_encrypted"}'] == 1  # iad:legacy
    assert metrics['fieldcrypt_migration{what="fields_undecryptable"}'] == 1  # iad:foreign
    assert metrics["fieldcrypt_migration_running"] == 0
    client.close()

    plain_redis.stop()
    statuses: list[int] = []
    for _ in range(100):  # /readyz caches its check for a second
        statuses.append(http_get(metrics_port, "/readyz")[0])
        if statuses[-1] == 503:
            break
        time.sleep(0.05)
    assert statuses[-1] == 503, statuses
    assert http_get(metrics_port, "/healthz")[0] == 200  # alive, though not ready
    conn = Conn(proxy.port)
    conn.send("PING")  # pooled: a client reaches upstream when it first sends
    reply = conn.read()
    assert b"unreachable (connection refused)" in reply
    assert scrape(metrics_port)["fieldcrypt_upstream_errors_total"] >= 1
    assert proxy.stop() == 0


# --- Logs --------------------------------------------------------------------------


def test_json_logs_record_lifecycle_events_and_never_a_value_or_secret(
    locked_redis: EmbeddedServer, tmp_path: Path, cli_proxies: list[ServeProcess]
) -> None:
    keys = key_files(tmp_path, "a", "b")
    config = {"keys": ring("a"), "rules": [IAD_RULE], "admin_password": ADMIN_PW}
    write_yaml(tmp_path / "fieldcrypt.yaml", config)
    url = f"redis://:{quote(UPSTREAM_PW, safe='')}@{HOST}:{locked_redis.port}"
    proxy = ServeProcess(
        tmp_path, "--upstream", url, "--config", "fieldcrypt.yaml", "--log-format", "json"
    )
    cli_proxies.append(proxy)
    values = ["canary-set-value-41", "canary-imap-value-42", "canary-smtp-value-43"]
    names = ["canary-key-name-44", "iad:canary-45"]
    admin = Conn(proxy.port)
    assert admin.call("AUTH", "fieldcrypt-admin", ADMIN_PW) == b"+OK\r\n"
    assert admin.call("SET", names[0], values[0]) == b"+OK\r\n"
    assert admin.call("HSET", names[1], "imap", values[1], "smtp", values[2]) == b":2\r\n"
    assert admin.call("HGET", names[1], "imap") == bulk(values[1])

    write_yaml(tmp_path / "fieldcrypt.yaml", {**config, "keys": ring("b", "a")})
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for_log("key ring changed")
    assert admin.call("MIGRATE").startswith(b"*")
    assert b"done" in admin.call("MIGRATE", "WAIT", "30")
    proxy.wait_for_log(r"migration \S+ done")
    admin.close()

    locked_redis.stop()
    for _ in range(2):
        conn = Conn(proxy.port)
        conn.send("PING")  # pooled: a client reaches upstream when it first sends
        assert b"unreachable" in conn.read()
    proxy.wait_for_log("unreachable", count=2)
    assert proxy.stop() == 0

    entries = [json.loads(line) for line in proxy.lines]  # every line is one JSON object
    for entry in entries:
        assert {"time", "level", "message"} <= entry.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
        assert entry["level"] in ("debug", "info", "warning", "error", "critical")
    messages = [entry["message"] for entry in entries]

    def count(pattern: str) -> int:
        return sum(1 for message in messages if re.search(pattern, message))

    assert count(r"^fieldcrypt listening on ") == 1
    assert count(r"^fieldcrypt stopped$") == 1
    assert count(r"^config reloaded") == 1
    assert count(r"^key ring changed") == 1
    assert count(rf"{keys['b'][1]}") == 1  # the new key's id, in the key ring line
    assert count(r"^migration \S+ started$") == 1
    assert count(r"^migration \S+ done") == 1
    assert count(rf"upstream 127\.0\.0\.1:{locked_redis.port} unreachable") == 2
    text = "\n".join(proxy.lines)
    secrets = [ADMIN_PW, UPSTREAM_PW, quote(UPSTREAM_PW, safe="")]
    secrets += [keys[k][0] for k in keys] + [keys[k][0].removeprefix("base64:") for k in keys]
    for forbidden in [*secrets, *values, *names]:
        assert forbidden not in text, forbidden


# --- Hot reload --------------------------------------------------------------------


@dataclass
class Traffic:
    """Clients writing and reading protected fields without pause, each on one connection
    for its whole life, noting the reload epoch before and after each write."""

    port: int
    threads: int = 4
    epoch: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    writes: list[tuple[str, str, int, int]] = field(default_factory=list)  # key, value, epochs
    errors: list[str] = field(default_factory=list)
    ops: list[int] = field(default_factory=list)
    workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.ops = [0] * self.threads
        for number in range(self.threads):
            worker = threading.Thread(target=self._run, args=(number,), daemon=True)
            self.workers.append(worker)
            worker.start()

    def _run(self, number: int) -> None:
        try:
            conn = Conn(self.port)
            for i in range(50_000):
                if self.stop.is_set():
                    break
                key, value = f"iad:reload:{number}:{i}", f"imap-{number}-{i}"
                before = self.epoch
                reply = conn.call("HSET", key, "imap", value)
                after = self.epoch
                if reply != b":1\r\n":
                    self.errors.append(f"HSET {key}: {reply!r}")
                    return
                self.writes.append((key, value, before, after))
                reply = conn.call("HGET", key, "imap")
                if reply != bulk(value):
                    self.errors.append(f"HGET {key}: {reply!r}")
                    return
                self.ops[number] += 1
            conn.close()
        except (OSError, AssertionError) as error:
            self.errors.append(f"client {number}: {error!r}")

    def advance(self, epoch: int, more_ops: int = 20) -> None:
        """Enter `epoch` once every client has done `more_ops` more operations."""
        target = [n + more_ops for n in self.ops]
        wait_for(
            lambda: self.errors != [] or all(n >= t for n, t in zip(self.ops, target, strict=True)),
            20,
            "client traffic",
        )
        assert self.errors == []
        self.epoch = epoch

    def finish(self) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(20)


def test_reload_under_traffic_rotates_keys_without_dropping_a_client(
    plain_redis: EmbeddedServer, tmp_path: Path, cli_proxies: list[ServeProcess]
) -> None:
    keys = key_files(tmp_path, "a", "b", "c")
    kid = {name: keys[name][1] for name in keys}
    path = tmp_path / "fieldcrypt.yaml"
    base = {"rules": [IAD_RULE], "admin_password": ADMIN_PW}
    write_yaml(path, {"keys": ring("a"), **base})
    proxy = ServeProcess(tmp_path, "--upstream", plain_redis.url, "--config", str(path))
    cli_proxies.append(proxy)
    traffic = Traffic(proxy.port)
    traffic.start()
    try:
        traffic.advance(1)  # 1: SIGHUP sent
        write_yaml(path, {"keys": ring("b", "a"), **base})
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for_log("key ring changed")
        traffic.advance(2)  # 2: ring [B, A] is in force

        outsider = Conn(proxy.port)
        assert outsider.call("FIELDCRYPT", "RELOAD").startswith(b"-NOPERM")
        admin = Conn(proxy.port)
        assert admin.call("AUTH", "fieldcrypt-admin", ADMIN_PW) == b"+OK\r\n"
        write_yaml(path, {"keys": ring("c", "b", "a"), **base})
        traffic.advance(3)  # 3: FIELDCRYPT RELOAD sent
        assert admin.call("FIELDCRYPT", "RELOAD") == b"+OK\r\n"
        traffic.advance(4)  # 4: ring [C, B, A] is in force

        path.write_text(
            "keys:\n  - secret_file: a.secret\nrules:\n  - key: 'iad:*'\n    fields: imap\n",
            encoding="utf-8",
        )
        rejected = admin.call("FIELDCRYPT", "RELOAD")
        assert rejected.startswith(b"-ERR fieldcrypt: reload rejected, old config kept: "), rejected
        assert re.search(rb"%s:5: rules\[0\]\.fields" % re.escape(str(path).encode()), rejected)
        traffic.advance(5)  # 5: the rejected reload is behind us
        traffic.advance(6)  # the old configuration kept serving
    finally:
        traffic.finish()
    assert traffic.errors == []
    assert all(not worker.is_alive() for worker in traffic.workers)

    direct = redis.Redis(port=plain_redis.port)
    expected = {(0, 0): {kid["a"]}, (2, 2): {kid["b"]}, (4, 4): {kid["c"]}, (5, 5): {kid["c"]}}
    seen: dict[tuple[int, int], int] = {}
    reader = Conn(proxy.port)
    for key, value, before, after in traffic.writes:
        stored = direct.hget(key, "imap")
        assert isinstance(stored, bytes)
        found = KeyRing.kid_of(stored)
        assert found in kid.values()
        if (before, after) in expected:
            assert found in expected[(before, after)], (key, before, after)
            seen[(before, after)] = seen.get((before, after), 0) + 1
        assert reader.call("HGET", key, "imap") == bulk(value)  # old and new keys still read
    assert set(seen) == set(expected)
    assert proxy.count("config reload rejected") == 1
    assert proxy.stop() == 0


# --- Limits ------------------------------------------------------------------------


def test_max_clients_turns_away_the_extra_client_only(
    plain_redis: EmbeddedServer, proxies: Proxies
) -> None:
    proxy = proxies.start(plain_redis.url, max_clients=2)
    first, second = Conn(proxy.port), Conn(proxy.port)
    assert first.call("PING") == b"+PONG\r\n"
    assert second.call("PING") == b"+PONG\r\n"
    extra = Conn(proxy.port)
    assert extra.read() == b"-ERR max number of clients reached\r\n"
    assert extra.closed_by_peer()
    assert first.call("SET", "limit:clients", "1") == b"+OK\r\n"
    assert second.call("GET", "limit:clients") == bulk("1")
    assert proxy.run(lambda: proxy.state.stats.connections_rejected) == 1

    first.close()
    wait_for(lambda: proxy.run(lambda: proxy.state.stats.connections_open) == 1, 10, "a free slot")
    assert Conn(proxy.port).call("PING") == b"+PONG\r\n"


def test_a_client_that_does_not_read_is_cut_off_at_max_client_output_bytes(
    plain_redis: EmbeddedServer, proxies: Proxies
) -> None:
    big = 4 * 1024 * 1024
    redis.Redis(port=plain_redis.port).set("limit:big", b"x" * big)
    proxy = proxies.start(plain_redis.url, max_client_output_bytes="1mb")
    other = Conn(proxy.port)
    assert other.call("PING") == b"+PONG\r\n"

    stalled = Conn(proxy.port, rcvbuf=4096)
    assert stalled.call("PING") == b"+PONG\r\n"
    requests = 20
    stalled.sock.sendall(resp.encode_request([b"GET", b"limit:big"]) * requests)
    wait_for(
        lambda: proxy.run(lambda: proxy.state.stats.connections_open) == 1,
        20,
        "the stalled client to be disconnected",
    )
    received = 0
    with contextlib.suppress(ConnectionResetError):
        for _ in range(MAX_READS):
            chunk = stalled.sock.recv(1 << 20)
            if not chunk:
                break
            received += len(chunk)
    assert received < requests * big

    assert other.call("SET", "limit:small", "fine") == b"+OK\r\n"
    assert other.call("GET", "limit:small") == bulk("fine")
    assert Conn(proxy.port).call("PING") == b"+PONG\r\n"


def test_a_request_over_max_request_bytes_gets_a_protocol_error_and_is_closed(
    plain_redis: EmbeddedServer, proxies: Proxies
) -> None:
    proxy = proxies.start(plain_redis.url, max_request_bytes="4kb")
    conn = Conn(proxy.port)
    assert conn.call("SET", "limit:fits", "y" * 1000) == b"+OK\r\n"
    reply = conn.call("SET", "limit:huge", "x" * 8000)
    assert reply.startswith(b"-ERR Protocol error: "), reply
    assert conn.closed_by_peer()
    direct = redis.Redis(port=plain_redis.port)
    assert direct.exists("limit:huge") == 0
    assert direct.get("limit:fits") == b"y" * 1000
    assert Conn(proxy.port).call("GET", "limit:fits") == bulk("y" * 1000)


def test_idle_timeout_closes_idle_clients_but_not_blocked_ones(
    plain_redis: EmbeddedServer, proxies: Proxies
) -> None:
    idle_timeout = 0.5
    strict = proxies.start(plain_redis.url, idle_timeout=idle_timeout)
    relaxed = proxies.start(plain_redis.url, idle_timeout=0)
    unlimited = Conn(relaxed.port)
    assert unlimited.call("PING") == b"+PONG\r\n"

    blocked = Conn(strict.port)
    blocked.send("BLPOP", "idle:queue", "0")
    idle = Conn(strict.port)
    assert idle.call("PING") == b"+PONG\r\n"
    assert idle.closed_by_peer()  # within the socket's 10 s timeout

    time.sleep(4 * idle_timeout)  # the blocked client waits well past the idle timeout
    redis.Redis(port=plain_redis.port).rpush("idle:queue", "work")
    assert blocked.read() == b"*2\r\n" + bulk("idle:queue") + bulk("work")
    assert blocked.call("PING") == b"+PONG\r\n"
    assert unlimited.call("PING") == b"+PONG\r\n"  # idle_timeout 0: never closed


# --- Workers -----------------------------------------------------------------------


def test_two_workers_serve_clients_and_all_exit_cleanly_on_sigterm(
    plain_redis: EmbeddedServer, tmp_path: Path, cli_proxies: list[ServeProcess]
) -> None:
    proxy = ServeProcess(tmp_path, "--upstream", plain_redis.url, "--workers", "2", ready=2)
    cli_proxies.append(proxy)
    found = re.search(r"started 2 workers: pids (\d+), (\d+)", proxy.log)
    assert found, proxy.log
    pids = [int(found.group(1)), int(found.group(2))]
    clients = [Conn(proxy.port) for _ in range(12)]
    for number, conn in enumerate(clients):
        assert conn.call("SET", f"worker:{number}", str(number)) == b"+OK\r\n"
    for number, conn in enumerate(clients):
        assert conn.call("GET", f"worker:{number}") == bulk(str(number))
        conn.close()
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)

    assert proxy.stop() == 0
    assert proxy.count("fieldcrypt stopped") == 2
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
