"""Layer 1 (connectors): S3 (or S3-compatible) store: ``s3://bucket/prefix?endpoint_url=...&region=...``.

The endpoint comes from ``?endpoint_url=`` or else ``AWS_ENDPOINT_URL``; credentials only from boto3's own
chain (environment, profile, instance role), never from the URL or code. Reads are ranged GETs streamed
straight into the caller's buffer; writes are one PUT, or a multipart upload for data larger than one part,
its parts uploaded concurrently (aborted on failure, so no partial object ever appears).
"""

from __future__ import annotations

import http.client
import itertools
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import botocore.loaders
import botocore.session
import urllib3.exceptions
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from ..errors import BackendError, ConfigError, NotFoundError, RaydistError
from ..pool import run_all
from .base import Buffer, Connector, check_key, refuse_options, short_read

#: Size of each multipart-upload part (S3 wants >= 5 MiB for all parts but the last).
PART_BYTES = 8 << 20
#: Objects up to this size go up as one PUT: measured on s3rver (0.25 GB checkpoint published as 20 MiB files),
#: one PUT per file 1.8x multipart, whose completion makes the server write every byte a second time; publish
#: writes several files at once, so single PUTs still keep several requests in flight.
MULTIPART_THRESHOLD = 64 << 20
#: Part uploads in flight per connector (boto3's TransferConfig default is 10), and parts held at once.
UPLOAD_CONCURRENCY = 8
UPLOAD_SLOTS = 2 * UPLOAD_CONCURRENCY
_QUERY_OPTIONS = ("endpoint_url", "region")
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}
)
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError"}
)
_TRANSPORT_ERRORS = (BotoCoreError, urllib3.exceptions.HTTPError, OSError)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(?:\d+|\*)")


def _config(concurrency: int) -> Config:
    """botocore settings: no checksums that S3-compatible servers reject; a pool as wide as our threads."""
    return Config(
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=max(32, concurrency),
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=30,
    )


_LOADER_LOCK = threading.Lock()
_loader: botocore.loaders.Loader | None = None


def _session() -> boto3.session.Session:
    """A private session (building clients from one shared session races) whose data loader is shared by the
    process: botocore parses the S3 service model and endpoint rules once per process instead of once per
    connector (measured: a client from a fresh session 70 ms on an idle 2-core host, 200+ ms when busy; with the
    loader shared 12 ms). Credentials stay per session, so a changed environment is seen by the next connector."""
    global _loader
    with _LOADER_LOCK:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
    core = botocore.session.get_session()
    core.register_component("data_loader", _loader)
    session = boto3.session.Session(botocore_session=core)
    with _LOADER_LOCK:  # each boto3 session appends its data folder to the (shared) loader's search paths
        _loader.search_paths[:] = dict.fromkeys(_loader.search_paths)
    return session


def _parse_url(url: str) -> tuple[str, str, dict[str, str]]:
    """``s3://bucket/prefix?opts`` -> (bucket, prefix without slashes, options)."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise ConfigError(f"S3 URL {url!r} names no bucket: use s3://bucket/prefix")
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = sorted(set(options) - set(_QUERY_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown S3 URL option(s) {unknown}; known: {', '.join(_QUERY_OPTIONS)}")
    return parts.netloc, parts.path.strip("/"), options


def iter_parts(blocks: Iterable[Buffer], part_bytes: int) -> Iterator[bytearray]:
    """Regroup a stream of blocks into parts of exactly ``part_bytes`` (the last one may be shorter). Each block is
    copied into its part as it arrives (the one copy on the way: botocore sends only ``bytes``-like bodies), so a
    producer may reuse its buffer for the next block, and at most the parts held by the caller are in memory."""
    part, size = bytearray(part_bytes), 0
    for block in blocks:
        view = memoryview(block).cast("B")
        while len(view):
            take = min(len(view), part_bytes - size)
            part[size : size + take] = view[:take]
            view, size = view[take:], size + take
            if size == part_bytes:
                yield part
                part, size = bytearray(part_bytes), 0
    if size:
        del part[size:]
        yield part


def body_reader(body: Any) -> Callable[[memoryview], int]:
    """A ``readinto`` for a botocore StreamingBody that writes straight into the caller's buffer.

    urllib3 2.x implements ``readinto`` as ``read()`` plus a copy; reading through the underlying
    ``http.client.HTTPResponse`` (inside urllib3's error handling, which also returns the connection to the
    pool once the body is consumed) skips that copy. Anything unexpected (a compressed body, another urllib3)
    falls back to botocore's own ``readinto``.
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    catcher = getattr(raw, "_error_catcher", None)
    headers = getattr(raw, "headers", {}) or {}
    if not isinstance(fp, http.client.HTTPResponse) or catcher is None or headers.get("content-encoding"):
        return body.readinto

    def readinto(buf: memoryview) -> int:
        with catcher():
            return fp.readinto(buf)

    return readinto


class S3Connector(Connector):
    """Objects are S3 keys under ``bucket/prefix``."""

    schemes = ("s3",)
    packs_files = True
    coalesce_gap = 1 << 20
    default_concurrency = 8
    max_request_bytes = 16 << 20

    def __init__(self, url: str, **connector_options: object):
        super().__init__(url)
        refuse_options("s3://", connector_options)
        self.bucket, prefix, options = _parse_url(url)
        self._root = f"{prefix}/" if prefix else ""
        endpoint = options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(UPLOAD_SLOTS)
        self._s3 = _session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=options.get("region"),
            config=_config(self.default_concurrency),
        )

    def _key(self, key: str) -> str:
        return self._root + check_key(key)

    # ----------------------------------------------------------------- primitives
    def readinto(self, key: str, offset: int, buf: memoryview) -> None:
        self.readv(key, offset, [buf])

    def readv(self, key: str, offset: int, bufs: Sequence[memoryview]) -> None:
        """One ranged GET whose body is read into each buffer in turn (adjacent chunks: one request)."""
        want = sum(len(b) for b in bufs)
        if not want:
            if self.stat(key) is None:
                raise NotFoundError(f"{key!r} does not exist in {self.describe()}")
            return
        with self._errors(f"reading {key!r}", key):
            try:
                resp = self._s3.get_object(
                    Bucket=self.bucket, Key=self._key(key), Range=f"bytes={offset}-{offset + want - 1}"
                )
            except ClientError as e:
                if _code(e) != "InvalidRange":  # the range starts past the end of the object
                    raise
                raise short_read(key, offset, want, 0, self.describe()) from None
            self._check_range(resp, key, offset, want)
            got = 0
            for buf in bufs:
                n = self._drain_into(resp["Body"], buf)
                got += n
                if n < len(buf):
                    break
        if got < want:
            raise short_read(key, offset, want, got, self.describe())

    def read(self, key: str) -> bytes:
        """One whole-object GET: S3 serves one version of the object, even while a publish replaces it."""
        with self._errors(f"reading {key!r}", key):
            body = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                return body.read()
            finally:
                body.close()

    def _check_range(self, resp: dict, key: str, offset: int, want: int) -> None:
        """A ranged GET must answer 206 with the range asked for; a server that ignores Range answers 200 with the
        whole object, which would land at the wrong offset. Anything else closes the body and is an error."""
        status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        got = _CONTENT_RANGE.fullmatch(str(resp.get("ContentRange") or "").strip())
        start, end = (int(got[1]), int(got[2])) if got else (-1, -1)
        last = offset + want - 1
        if status == 206 and start == offset and end == last:
            return
        resp["Body"].close()  # a response to another request than ours is never read (nor its connection reused)
        if status == 206 and start == offset and offset <= end < last:  # the object ends inside the range
            raise short_read(key, offset, want, end - offset + 1, self.describe())
        raise BackendError(
            f"S3 at {self.describe()} answered a ranged read of {key!r} (bytes {offset}-{last}) with "
            f"HTTP {status} and Content-Range {resp.get('ContentRange')!r}, not 206 with that range: the server "
            "does not honour Range requests; use an S3-compatible server that does"
        )

    @staticmethod
    def _drain_into(body: Any, buf: memoryview) -> int:
        """Read ``body`` into ``buf`` until full or the body ends; returns the bytes read."""
        readinto, done = body_reader(body), 0
        try:
            while done < len(buf):
                n = readinto(buf[done:])
                if not n:
                    break
                done += n
        except BaseException:
            body.close()  # a half-read connection cannot go back to the pool
            raise
        if done < len(buf):
            body.close()
        return done

    def write(self, key: str, data: Buffer | Iterable[Buffer]) -> None:
        """One PUT for data up to ``MULTIPART_THRESHOLD``, else a multipart upload that is aborted if anything
        fails. Blocks are copied as they arrive (a producer may reuse its buffer): once into the PUT's body, or
        into each part (:func:`iter_parts`; the first ``MULTIPART_THRESHOLD`` bytes of a multipart upload twice);
        a multipart upload holds at most ``UPLOAD_SLOTS`` parts."""
        full = self._key(key)
        blocks = iter([data] if isinstance(data, (bytes, bytearray, memoryview)) else data)
        head = bytearray()
        for block in blocks:
            head += memoryview(block)  # a view: ``+=`` with a numpy array would be numpy's broadcasting add
            if len(head) > MULTIPART_THRESHOLD:
                break
        with self._errors(f"writing {key!r}", key):
            if len(head) <= MULTIPART_THRESHOLD:
                self._s3.put_object(Bucket=self.bucket, Key=full, Body=head)
            else:
                self._multipart(full, iter_parts(itertools.chain([head], blocks), PART_BYTES))

    def compare_and_swap(self, key: str, expected: bytes | None, data: Buffer) -> bool:
        """A conditional PUT (atomic on S3 and servers that honour it; moto does): ``If-None-Match: *`` when the
        key must not exist, else ``If-Match`` the ETag of the value read and found equal to ``expected``. A server
        that ignores the conditions, or answers them 501 Not Implemented, degrades to last-writer-wins."""
        from contextlib import closing  # local: this method stays self-contained

        full = self._key(key)
        with self._errors(f"replacing {key!r}", key):
            if expected is None:
                condition = {"IfNoneMatch": "*"}
            else:
                try:
                    resp = self._s3.get_object(Bucket=self.bucket, Key=full)
                except ClientError as e:
                    if _code(e) in _MISSING_CODES:
                        return False
                    raise
                with closing(resp["Body"]) as body:
                    if body.read() != expected:
                        return False
                condition = {"IfMatch": resp["ETag"]}
            try:
                self._s3.put_object(Bucket=self.bucket, Key=full, Body=bytes(data), **condition)
            except ClientError as e:  # 412: the condition failed; 409: a concurrent conditional write won
                status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
                if status in (409, 412) or _code(e) in _MISSING_CODES:
                    return False
                if status != 501 and _code(e) != "NotImplemented":
                    raise
                # a server without conditional writes: last writer wins, as documented
                self._s3.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))
        return True

    def _multipart(self, full: str, parts: Iterable[bytearray]) -> None:
        """Parts go up on the connector's upload pool while the next are produced (read, hashed, cut); at most
        ``UPLOAD_SLOTS`` parts are held at once, whatever the object's size; any failure aborts the upload."""
        upload_id = self._s3.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        futures: list[Future] = []
        try:
            for number, part in enumerate(parts, start=1):
                self._slots.acquire()
                try:
                    future = self._uploader().submit(self._upload_part, full, upload_id, number, part)
                except BaseException:
                    self._slots.release()
                    raise
                future.add_done_callback(lambda _: self._slots.release())
                futures.append(future)
                if any(f.done() and f.exception() for f in futures):
                    break  # fail fast: result() below raises it
            done = [{"PartNumber": n, "ETag": f.result()} for n, f in enumerate(futures, start=1)]
            self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": done}
            )
        except BaseException:
            for f in futures:
                f.cancel()
            wait(futures)  # no part may land after the abort
            self._abort(full, upload_id)
            raise

    def _uploader(self) -> ThreadPoolExecutor:
        """The connector's pool of part uploads, shared by every write in flight (publish writes several files
        at once: the pool bounds the requests to the server, not each file)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(UPLOAD_CONCURRENCY, thread_name_prefix="s3-upload")
            return self._pool

    def _upload_part(self, full: str, upload_id: str, number: int, body: bytearray) -> str:
        resp = self._s3.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body)
        return resp["ETag"]

    def _abort(self, full: str, upload_id: str) -> None:
        """Best effort: the original error matters more than a failed abort (a lifecycle rule cleans up)."""
        try:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (ClientError, *_TRANSPORT_ERRORS):
            pass

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under the root that starts with ``prefix``; paginates past S3's 1000 keys per page."""
        keys: list[str] = []
        with self._errors(f"listing {prefix!r}", prefix):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._root + prefix
            )
            for page in pages:
                keys.extend(obj["Key"][len(self._root) :] for obj in page.get("Contents", ()))
        yield from sorted(keys)

    def stat(self, key: str) -> int | None:
        head = self._head(key)
        return None if head is None else int(head["ContentLength"])

    def stat_many(self, keys: Sequence[str]) -> list[int | None]:
        return [int(head["ContentLength"]) if head else None for head in self._heads(keys)]

    def modified(self, keys: Sequence[str]) -> list[float | None]:
        """Last-Modified has whole seconds: the write may have ended up to a second later (never date it early)."""
        return [head["LastModified"].timestamp() + 1.0 if head else None for head in self._heads(keys)]

    def _heads(self, keys: Sequence[str]) -> list[dict | None]:
        """HEAD each key, a few in flight (one round trip each); None for a missing key."""
        return run_all(self._head, keys, self.default_concurrency, "s3-head")

    def _head(self, key: str) -> dict | None:
        with self._errors(f"checking {key!r}", key):
            try:
                return self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if _code(e) in _MISSING_CODES:
                    return None
                raise

    def delete(self, key: str) -> None:
        with self._errors(f"deleting {key!r}", key):
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._s3.close()

    # ----------------------------------------------------------------- errors
    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn boto3/botocore/urllib3 failures into our errors; ours pass through."""
        try:
            yield
        except RaydistError:
            raise
        except ClientError as e:
            raise self._client_error(e, action, key) from None
        except (NoCredentialsError, PartialCredentialsError):
            raise BackendError(
                f"no usable AWS credentials for {self.describe()}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, as for the aws CLI"
            ) from None
        except _TRANSPORT_ERRORS as e:
            where = self.describe()
            raise BackendError(f"cannot reach S3 at {where} while {action}: {e}", transient=True) from None

    def _client_error(self, e: ClientError, action: str, key: str) -> RaydistError:
        code, where = _code(e), self.describe()
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = e.response.get("Error", {}).get("Message") or code
        if code in _MISSING_CODES:
            return NotFoundError(f"{key!r} does not exist in {where}")
        if code == "NoSuchBucket":
            return BackendError(f"bucket {self.bucket!r} does not exist ({where}): create it or fix the URL")
        if code in _DENIED_CODES:
            return BackendError(
                f"S3 denied {action} in {where} ({code}: {message}): check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_PROFILE) and the bucket's policy"
            )
        if code in _THROTTLE_CODES or status >= 500:
            return BackendError(f"S3 at {where} failed {action} ({code}: {message}); retry", transient=True)
        return BackendError(f"S3 at {where} refused {action} ({code}: {message})")


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))
