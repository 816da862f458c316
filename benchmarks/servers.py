"""Loopback servers the benchmark starts and stops itself: redis-server and s3rver (npm), each on a free port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
S3RVER = HERE / "node" / "node_modules" / ".bin" / "s3rver"
S3_KEY = "S3RVER"  # s3rver's fixed credentials
S3_REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"{what} did not open port {port} within {timeout:.0f}s:\n{log.read_text()[-2000:]}")


class Server:
    """A child process serving on 127.0.0.1:port, with a scratch directory removed on stop()."""

    def __init__(self, what: str, argv: list[str], port: int, workdir: Path, env: dict | None = None):
        self.what, self.port, self.workdir = what, port, workdir
        self.log = workdir / f"{what}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env)
        _wait_port(port, self.proc, what, self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis() -> Server:
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("redis-server is not on PATH: run `bash benchmarks/run.sh` (it installs it)")
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--protected-mode",
        "yes",
    ]
    return Server("redis-server", argv, port, workdir)


def start_s3rver(bucket: str) -> Server:
    if not S3RVER.exists():
        raise RuntimeError(
            f"{S3RVER} is missing: run `bash benchmarks/run.sh` (it installs s3rver with `npm ci` from "
            "benchmarks/node/package-lock.json)"
        )
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-s3rver-"))
    argv = [
        shutil.which("node") or "node",
        str(S3RVER),
        "-d",
        str(workdir / "data"),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "--silent",
        "--configure-bucket",
        bucket,
    ]
    return Server("s3rver", argv, port, workdir, env=dict(os.environ))


def s3_env(port: int) -> dict[str, str]:
    """Environment for boto3, our S3 connector and the Run:ai streamer to reach s3rver on loopback."""
    return {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_KEY,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_REGION": S3_REGION,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
        # Run:ai streamer (C++ AWS SDK): path-style addressing (s3rver has no DNS for bucket vhosts).
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }
