"""Layer 2 (store): Publish from memory: a state dict (name -> ``torch.Tensor``, on the CPU or a GPU) straight to a
store as a new version, no checkpoint directory, through :mod:`.publish`'s pipeline (same layout, rules, digests,
confirm and compare-and-swap).

One process: :func:`publish_state_dict`. Several processes of one trainer publishing ONE version:
:func:`open_version` writes the version's files and returns a token; each process publishes its tensors as one part
(``token=, part=i``); the last part in merges the parts into the version's manifest and swaps the pointer. Under
``<model>/<version>/parts/``::

    open.json       the token's fields, config.json and the version's file records (written by open_version)
    <i>.claim       part i's tensor names, created exclusively before its chunks are written (a part is published
                    once; a tensor is in one part)
    <i>.json        part i's own manifest (its tensors, its objects), written once its chunks are confirmed
    merged          created exclusively by the one part that merges and swaps

A part that never arrives means no swap: the current version keeps serving, and gc deletes the parts later.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import digest, dtypes
from ..bulk import bulk
from ..connectors import Connector, open_connector
from ..errors import ConfigError, ConflictError, NotFoundError, VerificationError
from ..options import check_range
from . import grid, versions
from . import manifest as mf
from .ledger import WriteLedger
from .publish import (
    DEFAULT_MAX_TP,
    DEFAULT_PART_BYTES,
    ChunkBytes,
    Cut,
    PublishResult,
    _file_records,
    _finish,
    _new_manifest,
    check_sizes,
    eviction_check,
    plan_cuts,
    publish_cuts,
    removed_on_failure,
    result_of,
    write_chunks,
)
from .repo import CONFIG, DEFAULT_MAX_FILE_BYTES, ENGINE_FILES, SkippedFile
from .rules import RuleSet
from .safetensors_io import Entry
from .sizing import _load as _load_config  # config.json read as inspect --config-only reads it

log = logging.getLogger(__name__)

TOKEN_FORMAT = "raydist-loader/parts/1"
MAX_PARTS = 4096
_POLL_S = 0.1  # how often a waiting part looks at the pointer


class Token(BaseModel):
    """What :func:`open_version` returns (as JSON): the version every part writes to, how many parts make it, the
    pointer it replaces (sha256 of its bytes at opening, None: the model had none) and the deadline (epoch s)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["raydist-loader/parts/1"]
    model: str
    version: str = Field(pattern=mf.VERSION_RE.pattern)
    parts: int = Field(ge=1, le=MAX_PARTS)
    base_sha256: str | None = Field(pattern=r"^[0-9a-f]{64}$")
    deadline: float


class _Opened(BaseModel):
    """``parts/open.json``: the token, and what every part's manifest shares (config.json, the file records)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: Token
    config: dict
    files: dict[str, mf.FileRecord]


# ------------------------------------------------------------------------------------------ one process
@bulk
def publish_state_dict(
    tensors: Mapping[str, torch.Tensor],
    url: str,
    model: str,
    *,
    files_from: str | Path | None = None,
    max_tp: int = DEFAULT_MAX_TP,
    rules: str | Path | dict | None = None,
    digests: Sequence[str] = ("xxh3_128",),
    part_bytes: int = DEFAULT_PART_BYTES,
    concurrency: int = 4,
    connector_options: dict | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    allow_eviction: bool = False,
    token: str | None = None,
    part: int | None = None,
    wait: bool = False,
) -> PublishResult:
    """Publish ``tensors`` (name -> tensor, CPU or CUDA; each chunk is copied to the host as it is written) to store
    ``url`` as a new version of ``model``: the layout, options and errors of :func:`~.publish.publish`.

    config.json and the tokenizer files come from ``files_from`` (a directory; the files publish would record) or,
    when it is None, from the current version (copied into the new version). With ``token`` (from
    :func:`open_version`) this call publishes part ``part`` of that version; the last part in makes it current;
    ``wait=True`` returns once the version is current, or raises naming the missing parts at the deadline.
    """
    started = time.perf_counter()
    mf.check_model_name(model)
    check_sizes(max_tp=max_tp, part_bytes=part_bytes, concurrency=concurrency, max_file_bytes=max_file_bytes)
    entries, chunk_of = _entries(tensors)
    options = {"max_tp": max_tp, "digests": digests, "part_bytes": part_bytes, "concurrency": concurrency}
    if token is not None:
        if files_from is not None:
            raise ConfigError("files_from goes to open_version when a version is published in parts (token=)")
        return _publish_part(entries, chunk_of, url, model, token, part, wait, rules=rules, options=options,
                             connector_options=connector_options, allow_eviction=allow_eviction, started=started)
    if part is not None or wait:
        raise ConfigError("part= and wait= publish one part of a version: pass token= from open_version too")
    local = _read_files(files_from, max_file_bytes) if files_from is not None else None
    with open_connector(url, **(connector_options or {})) as conn:
        start = versions.stored_pointer(conn, model)
        config, files, skipped = local or _inherited(conn, model, start)
        ruleset = RuleSet.for_checkpoint(config, rules)
        cuts = plan_cuts(entries, config, ruleset, max_tp)
        return publish_cuts(conn, model, start, cuts, chunk_of, ruleset, config, files, started=started,
                            allow_eviction=allow_eviction, skipped=skipped, **options)


def _entries(tensors: Mapping[str, torch.Tensor]) -> tuple[list[Entry], ChunkBytes]:
    """Each tensor as the entry the cuts are planned from, and its chunks' bytes (copied to the host per chunk)."""
    if not isinstance(tensors, Mapping):
        raise ConfigError(f"tensors: got {type(tensors).__name__}; expected a mapping name -> torch.Tensor")
    entries, held = [], {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"tensor name {name!r}: expected a non-empty string")
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"tensor {name!r}: got {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided or t.device.type == "meta":
            raise ConfigError(f"tensor {name!r}: a {t.layout} tensor on {t.device} has no bytes to publish")
        dtype = str(t.dtype).removeprefix("torch.")
        if not dtypes.known(dtype):
            raise ConfigError(f"tensor {name!r}: dtype {dtype} cannot be stored (safetensors dtypes only)")
        entries.append(Entry(name, dtype, tuple(t.shape), 0, t.numel() * dtypes.itemsize(dtype)))
        held[name] = t.detach()

    def chunk(cut: Cut, c: grid.Chunk) -> np.ndarray:
        t = held[cut.entry.name]
        if cut.rule.dim is not None:
            t = t.narrow(cut.rule.dim, c.start, c.end - c.start)
        return t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()

    return entries, chunk


def _read_files(src: str | Path, max_file_bytes: int) -> tuple[dict, dict[str, bytes], list[SkippedFile]]:
    """``files_from``: config.json and the engine files publish would record (top level, each within the cap)."""
    src = Path(src)
    if not (src / CONFIG).is_file():
        raise ConfigError(f"files_from={str(src)!r}: no config.json there (the sharding rules follow its model_type)")
    files, skipped = {}, []
    for path in sorted(p for p in src.iterdir() if p.is_file()):
        size = path.stat().st_size
        if not any(fnmatch.fnmatch(path.name, glob) for glob in ENGINE_FILES):
            skipped.append(SkippedFile(path.name, size, "not a file an engine needs (the weights come from memory)"))
        elif size > max_file_bytes:
            if path.name == CONFIG:
                raise ConfigError(f"{src / CONFIG}: {size} bytes is over the {max_file_bytes}-byte cap")
            skipped.append(SkippedFile(path.name, size, f"{size} bytes is over the {max_file_bytes}-byte cap for "
                                       "engine files (max_file_bytes)"))
        else:
            files[path.name] = path.read_bytes()
    return _load_config(src / CONFIG)[0], files, skipped


def _inherited(conn: Connector, model: str, start: bytes | None) -> tuple[dict, dict[str, bytes], list]:
    """The current version's config and files (each checked against its digest), for a version that keeps them."""
    if start is None:
        raise ConfigError(f"model {model!r} has no current version in {conn.describe()} to take config.json and the "
                          "tokenizer files from: pass files_from=DIR (a directory holding them)")
    cur = versions.parse_current(start, f"{conn.describe()} {mf.manifest_key(model)}")
    manifest, _ = versions.read_manifest_bytes(conn, model, cur.version, manifest_sha256=cur.manifest_sha256)
    files = {}
    for name, record in manifest.files.items():
        data = conn.read(record.object)
        if digest.xxh3(data) != record.xxh3:
            raise VerificationError(f"file {name!r} of version {cur.version} of {model!r} in {conn.describe()} differs "
                                    "from its digest: not copied; pass files_from=DIR")
        files[name] = data
    return manifest.config, files, []


# ------------------------------------------------------------------------------------------ parts
def open_version(
    url: str,
    model: str,
    *,
    parts: int,
    timeout_s: float = 600.0,
    files_from: str | Path | None = None,
    connector_options: dict | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    allow_eviction: bool = False,
) -> str:
    """Open a new version of ``model`` that ``parts`` processes publish together (``publish_state_dict(tensors,
    url, model, token=token, part=i)``, i in 0..parts-1) within ``timeout_s``; returns the token (JSON) to hand
    to them. Writes the version's config and files (``files_from``, else the current version's) now."""
    mf.check_model_name(model)
    check_range("parts", parts, 1, MAX_PARTS)
    check_sizes(max_file_bytes=max_file_bytes)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < 1e9:
        raise ConfigError(f"timeout_s: got {timeout_s!r}; expected seconds > 0")
    local = _read_files(files_from, max_file_bytes) if files_from is not None else None
    with open_connector(url, **(connector_options or {})) as conn:
        start = versions.stored_pointer(conn, model)
        config, files, _ = local or _inherited(conn, model, start)
        eviction_check(conn, allow_eviction)
        version = mf.new_version(f"{model}{parts}")
        token = Token(format=TOKEN_FORMAT, model=model, version=version, parts=parts,
                      base_sha256=versions.sha256(start) if start is not None else None,
                      deadline=time.time() + timeout_s)
        prefix = mf.version_prefix(model, version)
        out = WriteLedger(conn)
        with removed_on_failure(conn, model, version, out):
            records = _file_records(out, files, f"{prefix}files/", ("xxh3_128", "blake3"))
            out.write(_key(token, "open.json"), _Opened(token=token, config=config, files=records).model_dump_json()
                      .encode())
            out.confirm()
    return token.model_dump_json()


def _key(token: Token, name: str) -> str:
    return f"{mf.version_prefix(token.model, token.version)}parts/{name}"


def _parse_token(text: str, model: str) -> Token:
    try:
        token = Token.model_validate_json(text)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"token: not one open_version returned (field {'.'.join(map(str, err['loc']))}: "
                          f"{err['msg']})") from None
    if token.model != model:
        raise ConfigError(f"token: it opened a version of {token.model!r}, not of {model!r}")
    return token


def _check_deadline(token: Token, part: int) -> None:
    late = time.time() - token.deadline
    if late > 0:
        raise ConflictError(f"part {part} of version {token.version} of {token.model!r} arrived {late:.1f} s after "
                            "its deadline: refused (the version never becomes current; open a new one)")


#: How a part's chunks are written: ``(out, cuts, chunk_of, ruleset, opened config, token, tag) -> the part's own
#: manifest`` (default: every chunk whole; :mod:`.updates` writes deltas)
WritePart = Callable[[WriteLedger, list[Cut], ChunkBytes, RuleSet, dict, "Token", str], mf.Manifest]


def _publish_part(entries: list[Entry], chunk_of: ChunkBytes, url: str, model: str, text: str, part, wait: bool, *,
                  rules, options: dict, connector_options: dict | None, allow_eviction: bool,
                  started: float, write_part: WritePart | None = None) -> PublishResult:
    """Part ``part`` of the version ``text`` names: claim it, write its chunks and its manifest (``write_part``:
    default whole), then merge and swap when it is the last part in (and, with ``wait``, wait for the version to
    become current)."""
    token = _parse_token(text, model)
    if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < token.parts:
        raise ConfigError(f"part={part!r} is out of range: version {token.version} was opened with "
                          f"parts={token.parts} (0..{token.parts - 1})")
    _check_deadline(token, part)
    with open_connector(url, **(connector_options or {})) as conn:
        try:
            opened = _Opened.model_validate_json(conn.read(_key(token, "open.json")))
        except NotFoundError:
            raise NotFoundError(f"version {token.version} of {model!r} was never opened in {conn.describe()} (or gc "
                                "deleted it): call open_version again") from None
        if opened.token != token:
            raise ConfigError(f"token: it does not match the version opened as {token.version} in {conn.describe()}")
        ruleset = RuleSet.for_checkpoint(opened.config, rules)
        cuts = plan_cuts(entries, opened.config, ruleset, options["max_tp"])
        warnings = eviction_check(conn, allow_eviction)
        claim = _claim(conn, token, part, [e.name for e in entries])
        out = WriteLedger(conn)
        try:
            with removed_on_failure(conn, model, token.version, out):
                own = (write_part or _whole_part(options))(out, cuts, chunk_of, ruleset, opened.config, token,
                                                           f"p{part:03d}-")
                out.confirm()
                if time.time() > token.deadline:  # too late: nothing of it stays (the refusal passes through)
                    out.remove()
                _check_deadline(token, part)
                out.write(_key(token, f"{part}.json"), own.to_json())
        except BaseException:
            with contextlib.suppress(Exception):
                conn.delete(claim)  # the part may be published again
            raise
        current = _merge(conn, token, part, opened, ruleset)
        while wait and not current:
            current = _is_current(conn, token) or _merge(conn, token, part, opened, ruleset)
            if not current:
                _check_waited(conn, token)
                time.sleep(_POLL_S)
        for w in warnings:
            log.warning(w)
        return result_of(own, conn, cuts, started, warnings=warnings, files=sorted(opened.files), current=current)


def _whole_part(options: dict) -> WritePart:
    """Every chunk of a part written whole, as publish writes them."""

    def write(out: WriteLedger, cuts: list[Cut], chunk_of: ChunkBytes, ruleset: RuleSet, config: dict, token: Token,
              tag: str) -> mf.Manifest:
        objects, key_part_bytes = write_chunks(
            out, cuts, chunk_of, mf.version_prefix(token.model, token.version), options["max_tp"],
            options["digests"], options["part_bytes"], options["concurrency"], tag=tag,
        )
        return _new_manifest(token.model, token.version, "chunked", options["max_tp"], options["digests"], ruleset,
                             config, cuts, {}, objects=objects, key_part_bytes=key_part_bytes)

    return write


def _claim(conn: Connector, token: Token, part: int, names: list[str]) -> str:
    """Create part ``part``'s claim (its tensor names) exclusively; refuse a part published twice and a tensor some
    other part claimed (every claim is read after its own is created, so of two claims of one tensor one sees the
    other). Returns the claim's key."""
    key = _key(token, f"{part}.claim")
    data = json.dumps({"tensors": names, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()})
    if not conn.compare_and_swap(key, None, data.encode()):
        raise ConflictError(f"part {part} of version {token.version} of {token.model!r} is already published (or "
                            "being published): each part is published once")
    mine = set(names)
    for other in range(token.parts):
        if other == part:
            continue
        try:
            theirs = json.loads(conn.read(_key(token, f"{other}.claim")))["tensors"]
        except NotFoundError:
            continue
        both = sorted(mine.intersection(theirs))
        if both:
            conn.delete(key)
            raise ConfigError(f"tensor {both[0]!r} is in part {other} and part {part} of version {token.version}"
                              + (f" (and {len(both) - 1} more)" if len(both) > 1 else "")
                              + ": a tensor goes in one part (tied weights: in one part, each name)")
    return key


def _merge(conn: Connector, token: Token, part: int, opened: _Opened, ruleset: RuleSet) -> bool:
    """When every part's manifest is in and no other part merges them: merge them into the version's manifest and
    swap the pointer (against the one at opening). True when this call made the version current."""
    keys = [_key(token, f"{i}.json") for i in range(token.parts)]
    marker = _key(token, "merged")
    if None in conn.stat_many(keys) or not conn.compare_and_swap(marker, None, b"{}"):
        return False
    try:
        manifest, start = _merged(conn, token, part, opened, ruleset, keys)
    except BaseException:  # not swapped: a waiting part merges again (and raises the same error, if it lasts)
        with contextlib.suppress(Exception):
            conn.delete(marker)
        raise
    _finish(conn, manifest, start)
    return True


def _merged(conn: Connector, token: Token, part: int, opened: _Opened, ruleset: RuleSet, keys: list[str]):
    """The version's manifest from its parts' (checked to agree), and the pointer's bytes it replaces."""
    where = f"{conn.describe()} {mf.version_prefix(token.model, token.version)}parts"
    own = [mf.Manifest.from_json(conn.read(k), where=f"{where}/{i}.json") for i, k in enumerate(keys)]
    mine, cuts, objects, owner = own[part], [], [], {}
    chain = sorted({v for m in own for v in m.chain or ()})
    for i, m in enumerate(own):
        for name in ("max_tp", "digests", "rules_fingerprint", "key_part_bytes"):
            if getattr(m, name) != getattr(mine, name):
                raise ConfigError(f"part {i} of version {token.version} was published with {name}="
                                  f"{getattr(m, name)!r}, part {part} with {getattr(mine, name)!r}: every part takes "
                                  "the same max_tp, rules, digests and part_bytes; the version is not made current")
        for name, t in m.tensors.items():
            if name in owner:
                raise ConfigError(f"tensor {name!r} is in part {owner[name]} and part {i} of version {token.version}")
            owner[name] = i
            at = [v + len(objects) * (1 - k % 2) for k, v in enumerate(t.at or ())]
            home = [0 if h == 0 else 1 + chain.index(m.chain[h - 1]) for h in t.home or ()]
            delta = [[v + len(objects) * (k % 3 == 0) for k, v in enumerate(steps)] for steps in t.delta or ()]
            cuts.append(Cut(Entry(name, t.dtype, tuple(t.shape), 0, t.nbytes), m.rule_of(t), m.grid_of(t),
                            list(t.xxh3), list(t.blake3 or ()), at, home, delta))
        objects += m.objects
    manifest = _new_manifest(token.model, token.version, "chunked", mine.max_tp, mine.digests, ruleset,
                             opened.config, cuts, opened.files, objects=objects, key_part_bytes=mine.key_part_bytes,
                             chain=chain)
    start = versions.stored_pointer(conn, token.model)
    if (versions.sha256(start) if start is not None else None) != token.base_sha256:
        raise ConflictError(f"{mf.manifest_key(token.model)} in {conn.describe()} changed since open_version (another "
                            f"publish, index or promote): version {token.version} was NOT made current")
    return manifest, start


def _is_current(conn: Connector, token: Token) -> bool:
    """The version is current, or was (a later publish replaced it already)."""
    cur = versions.current_or_none(conn, token.model)
    return cur is not None and (cur.version == token.version or token.version in cur.retired)


def _check_waited(conn: Connector, token: Token) -> None:
    """Past the deadline: raise, naming the parts that never arrived and what stays current."""
    if time.time() <= token.deadline:
        return
    keys = [_key(token, f"{i}.json") for i in range(token.parts)]
    missing = [i for i, size in enumerate(conn.stat_many(keys)) if size is None]
    cur = versions.current_or_none(conn, token.model)
    stays = f"version {cur.version} stays current" if cur else f"no version of {token.model!r} is current"
    why = (f"part(s) {', '.join(map(str, missing))} of {token.parts} never arrived" if missing
           else f"all {token.parts} parts arrived but the part that merged them failed (its error says why)")
    raise ConflictError(f"version {token.version} of {token.model!r} did not become current by its deadline: {why}; "
                        f"{stays}")
