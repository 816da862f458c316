"""Shared fixtures: real servers on loopback (redis-server, moto's S3 server) and a fresh store per test."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SETUP_HINT = "run the set-up steps in README.md (they install redis-server and the test extras)"
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port(below: int = 65536) -> int:
    """A loopback TCP port nobody listens on right now (the kernel picks it), lower than ``below``."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < below:
            return port


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


FIRST = ("test_vllm.py", "test_sglang.py")
"""The engine modules, the longest (a few minutes each, one process each): run first, so that with two pytest
workers (``-n 2 --dist loadfile``, scripts/test.sh) each starts one while the many short modules fill in beside
them, instead of one engine module starting last."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the session: the modules of :data:`FIRST` first, in that order, then the rest as collected (pytest
    collects a directory in name order whatever the command line's order). xdist keeps this order with
    ``--no-loadscope-reorder`` (its default sorts modules by their number of tests)."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its private key."""

    cert: Path
    key: Path


@dataclass
class RedisServer:
    """A redis-server process on a fixed loopback port; ``stop()``/``start()`` simulate an outage.

    With ``tls`` it serves only TLS on that port, and ``url`` is a ``rediss://`` URL naming the CA file.
    """

    port: int
    workdir: Path
    host: str = "127.0.0.1"
    extra_args: tuple[str, ...] = ()
    tls: TlsFiles | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://{self.host}:{self.port}/0?ssl_ca_certs={self.tls.cert}"
        return f"redis://{self.host}:{self.port}/0"

    def _listen_args(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        cert, key = str(self.tls.cert), str(self.tls.key)
        files = ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", cert]
        return ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no", *files]

    def start(self) -> None:
        """(Re)start the server on the same port and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(f"redis-server is not installed or not on PATH: {SETUP_HINT}", pytrace=False)
        args = [binary, *self._listen_args(), "--bind", self.host, "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.workdir), *self.extra_args]
        with open(self.workdir / "redis.log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(args, stdout=log, stderr=log)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self._connect() as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"redis-server did not start on port {self.port}:\n{log}", pytrace=False)
            time.sleep(0.05)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=0.5)
        if self.tls is None:
            return sock
        ctx = ssl.create_default_context(cafile=self.tls.cert)
        return ctx.wrap_socket(sock, server_hostname=self.host)

    def stop(self) -> None:
        """Kill the server (its data is lost: nothing is persisted)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def client(self):  # -> redis.Redis
        """A redis-py client to the server's db 0, for test set-up."""
        import redis

        tls = {"ssl": True, "ssl_ca_certs": str(self.tls.cert)} if self.tls else {}
        return redis.Redis(host=self.host, port=self.port, db=0, **tls)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the whole session."""
    server = RedisServer(port=free_port(), workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """A factory for extra redis-servers with their own options (TLS, cluster mode), killed after the test."""
    servers: list[RedisServer] = []

    def start(*extra_args: str, tls: TlsFiles | None = None) -> RedisServer:
        workdir = tmp_path / f"redis-{len(servers)}"
        workdir.mkdir()
        # below 55536: a cluster node also listens on port + 10000
        server = RedisServer(port=free_port(below=55536), workdir=workdir, extra_args=extra_args, tls=tls)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate with ``subjectAltName = IP:127.0.0.1`` (a CN alone fails verification)."""
    if shutil.which("openssl") is None:
        pytest.fail(f"the openssl command is missing: {SETUP_HINT}", pytrace=False)
    workdir = tmp_path_factory.mktemp("tls")
    files = TlsFiles(cert=workdir / "cert.pem", key=workdir / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(files.key), "-out", str(files.cert)],
        check=True,
        capture_output=True,
    )
    return files


@dataclass
class S3Server:
    """moto's S3 server on loopback; the AWS_* environment points boto3 at it."""

    endpoint: str

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return it."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session; fake credentials go into ``os.environ`` (restored at the end)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.fail(f"moto[server] is missing ({e}): {SETUP_HINT}", pytrace=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*_AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(_AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        wait_for_port(host, port)
        yield S3Server(endpoint=endpoint)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(params=["file", "redis", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store of each kind: a directory, a flushed Redis db 0, or a new S3 bucket."""
    kind = request.param
    if kind == "file":
        return f"file://{tmp_path}/store"
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.start()  # a test may have stopped it
        with server.client() as client:
            client.flushdb()
        return server.url
    s3: S3Server = request.getfixturevalue("s3_server")
    return f"s3://{s3.make_bucket(f'test-{uuid.uuid4().hex[:8]}')}/store"


@pytest.fixture(scope="session")
def two_llamas(tmp_path_factory: pytest.TempPathFactory):
    """Two tiny bf16 GQA llamas with different weights (a model and its re-publish)."""
    import torch

    from raydist_loader.testing.tiny_models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("two-llamas")
    return tuple(make_tiny_checkpoint("llama", root / n, dtype=torch.bfloat16, seed=i) for i, n in enumerate("ab"))


@pytest.fixture(scope="session")
def many_tensor_moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The Qwen3-30B-A3B-shaped tiny MoE (18,867 tensors) and a file store it is published in at max_tp=4
    (model ``moe``), made once per session; tests only read them."""
    from raydist_loader import publish
    from raydist_loader.testing.tiny_models import make_many_tensor_moe

    root = tmp_path_factory.mktemp("many-tensors")
    ckpt = make_many_tensor_moe(root / "ckpt")
    url = f"file://{root}/store"
    publish(ckpt, url, "moe", max_tp=4)
    return ckpt, url
