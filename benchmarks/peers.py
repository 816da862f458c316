"""The other ways to get the same bytes into memory, each timed from its first call to all tensors in memory
(client or connection set-up included, as it is for raydist_loader). Every function returns the bytes it delivered.

Nothing here is tuned down: each peer runs with its own defaults, or with the settings named in issue 4.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import resp_ceiling

RANGE_BYTES = 16 << 20
BOTO3_THREADS = 8


def _materialised(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ----------------------------------------------------------------------------------------- local files
def prefaulted(nbytes: int) -> torch.Tensor:
    """A preallocated buffer whose pages are already mapped (the ceilings' destination, made before timing)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.fill_(0)
    return buf


def first_touch(nbytes: int) -> int:
    """Reference: allocate a fresh buffer and touch every page (what any fresh destination costs on this host)."""
    prefaulted(nbytes)
    return nbytes


def page_cache_readinto(files: list[Path], buf: torch.Tensor | None = None) -> int:
    """The local ceiling: ``readinto`` each file from the (warm) page cache into a preallocated buffer
    (``buf``, prefaulted before timing; None allocates a fresh one inside the timing)."""
    total = sum(f.stat().st_size for f in files)
    buf = torch.empty(total, dtype=torch.uint8) if buf is None else buf
    view, pos = memoryview(buf.numpy()), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            end = pos + f.stat().st_size
            while pos < end:
                n = fh.readinto(view[pos:end])
                if not n:
                    raise RuntimeError(f"{f} ended early")
                pos += n
    return total


def safetensors_load_file(files: list[Path]) -> int:
    """``safetensors.torch.load_file`` (mmap-backed tensors) with every tensor materialised by ``.clone()``."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({k: v.clone() for k, v in load_file(str(f)).items()})
    return _materialised(out)


def runai_streamer(paths: list[str]) -> int:
    """Run:ai Model Streamer's ``SafetensorsStreamer`` on local paths or s3:// URLs (tensors are owned copies)."""
    from runai_model_streamer import SafetensorsStreamer

    out: dict[str, torch.Tensor] = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(paths)
        for name, tensor in streamer.get_tensors():
            out[name] = tensor
    return _materialised(out)


# ----------------------------------------------------------------------------------------- Redis
def sglang_redis(port: int, keys: list[str]) -> int:
    """SGLang's RemoteModelLoader way: one key per tensor holding a one-tensor safetensors blob, a sequential GET
    per tensor (redis-py, hiredis parser when installed), then ``safetensors.torch.load``."""
    import redis
    from safetensors.torch import load

    client = redis.Redis(host="127.0.0.1", port=port)
    out: dict[str, torch.Tensor] = {}
    try:
        for key in keys:
            out.update(load(client.get(key)))
    finally:
        client.close()
    return _materialised(out)


def resp_ceiling_read(port: int, sizes: dict[str, int], buf: torch.Tensor) -> int:
    """The Redis ceiling: minimal RESP reader, pipelined GETs, recv_into one preallocated buffer, 2 connections."""
    total = sum(sizes.values())
    view, pos, items = memoryview(buf.numpy()), 0, []
    for key, n in sizes.items():
        items.append((key.encode(), view[pos : pos + n]))
        pos += n
    resp_ceiling.read_all(port, items, connections=2)
    return total


# ----------------------------------------------------------------------------------------- S3
def _s3_client(threads: int):
    import boto3
    from botocore.config import Config

    config = Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=threads,
    )
    return boto3.session.Session().client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], config=config)


def boto3_ranges(bucket: str, keys: list[str], sizes: list[int], buf: torch.Tensor | None = None) -> int:
    """boto3, 8 threads of 16 MiB range GETs, each body ``readinto`` its slice of one preallocated buffer (``buf``,
    prefaulted before timing; None: a fresh ``torch.empty`` inside the timing, first touched by the reads as any
    loader's destination is)."""
    s3 = _s3_client(BOTO3_THREADS)
    buf = torch.empty(sum(sizes), dtype=torch.uint8) if buf is None else buf
    view = memoryview(buf.numpy())
    jobs, base = [], 0
    for key, size in zip(keys, sizes, strict=True):
        jobs += [(key, off, base + off, min(RANGE_BYTES, size - off)) for off in range(0, size, RANGE_BYTES)]
        base += size

    def get(job: tuple[str, int, int, int]) -> None:
        key, off, dest, n = job
        body = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={off}-{off + n - 1}")["Body"]
        done = 0
        while done < n:
            got = body.readinto(view[dest + done : dest + n])
            if not got:
                raise RuntimeError(f"short range GET of {key} at {off}")
            done += got
        body.close()

    with ThreadPoolExecutor(BOTO3_THREADS) as pool:
        list(pool.map(get, jobs))
    s3.close()
    return sum(sizes)


# ----------------------------------------------------------------------------------------- publish peers
def cp_files(files: list[Path], dest: Path, sync: bool = False) -> int:
    """``cp`` of the checkpoint's weight files into an empty ``dest`` (coreutils: copy_file_range, page cache
    only); ``sync``: then ``sync -f`` on it, the same bytes made durable as our file publish makes them."""
    import subprocess

    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", *map(str, files), str(dest)], check=True)
    if sync:
        subprocess.run(["sync", "-f", str(dest)], check=True)
    return sum(f.stat().st_size for f in files)


def boto3_upload_file(bucket: str, prefix: str, files: list[Path]) -> int:
    """boto3 ``upload_file`` of each weight file with ``TransferConfig(max_concurrency=8)`` (its multipart
    defaults otherwise: 8 MiB threshold and parts), client created inside the clock."""
    from boto3.s3.transfer import TransferConfig

    s3 = _s3_client(BOTO3_THREADS)
    config = TransferConfig(max_concurrency=BOTO3_THREADS)
    for f in files:
        s3.upload_file(str(f), bucket, prefix + f.name, Config=config)
    s3.close()
    return sum(f.stat().st_size for f in files)
