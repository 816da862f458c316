"""Layer 2 (store): RL weight updates: a trainer publishes version after version from memory, each storing only what
changed since the one before (:mod:`.deltas`).

:class:`UpdatePublisher` keeps the bytes it last published (host memory, one copy of the model: it never reads the
store back) and the manifest of that version. Each :meth:`UpdatePublisher.publish` cuts the new tensors on the same
grid and stores per chunk:

* nothing, when its bytes did not change: the new manifest names where an earlier version stored it;
* a delta, ``zstd(new XOR old)``, when the chain policy allows one (:class:`~.deltas.ChainPolicy`);
* the whole chunk otherwise (and for every chunk of the first version, or when the store's current version is no
  longer the one this publisher made: another publish, a promote or a gc came between).

Every chunk keeps its own digest of its full bytes, so a reader (a cold load, ``verify``, an engine applying the
delta to the bytes it serves) rebuilds the chunk and checks it like any other. The version is made current by the
same compare-and-swap as ``publish``; config and engine files are the base version's objects (named, not copied).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import digest
from ..bulk import bulk
from ..connectors import Connector, open_connector
from ..errors import ConfigError, RaydistError, VerificationError
from ..pool import run_all
from . import deltas, versions
from . import manifest as mf
from .ledger import WriteLedger
from .memory import _entries, _inherited, _publish_part, _read_files, _whole_part
from .publish import (
    DEFAULT_MAX_TP,
    DEFAULT_PART_BYTES,
    ChunkBytes,
    Cut,
    PublishResult,
    _digests,
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
from .repo import DEFAULT_MAX_FILE_BYTES
from .rules import RuleSet

log = logging.getLogger(__name__)

#: largest object of packed deltas (a Redis value stays well under its bulk limit; reads take ranges of it)
DELTA_OBJECT_BYTES = 64 << 20


@dataclass
class _Chunk:
    """What publish decided for one chunk: ``kind`` whole / delta / same, and the delta's bytes."""

    kind: str
    blob: bytes | None = None


class UpdatePublisher:
    """Publishes successive versions of ``model`` to store ``url`` from a trainer's memory, each as deltas against
    the version this publisher published before (see the module).

    Options as :func:`~raydist_loader.store.memory.publish_state_dict` (``files_from``: config.json and tokenizer
    files for the first version; default: the current version's); ``full_every`` and ``max_delta_fraction``: the
    :class:`~.deltas.ChainPolicy`. Host memory: one copy of the tensors published (the bytes deltas are made
    against). One publisher per trainer process; not thread-safe."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        files_from: str | Path | None = None,
        max_tp: int = DEFAULT_MAX_TP,
        rules: str | Path | dict | None = None,
        digests: Sequence[str] = ("xxh3_128",),
        full_every: int = 8,
        max_delta_fraction: float = 0.5,
        part_bytes: int = DEFAULT_PART_BYTES,
        concurrency: int = 4,
        connector_options: dict | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        allow_eviction: bool = False,
    ):
        mf.check_model_name(model)
        check_sizes(max_tp=max_tp, part_bytes=part_bytes, concurrency=concurrency, max_file_bytes=max_file_bytes)
        self.url, self.model, self.policy = url, model, deltas.ChainPolicy(full_every, max_delta_fraction)
        self._files = _read_files(files_from, max_file_bytes) if files_from is not None else None
        self._rules, self._allow_eviction, self._connector_options = rules, allow_eviction, connector_options
        self._options = {"max_tp": max_tp, "digests": tuple(digests), "part_bytes": part_bytes,
                         "concurrency": concurrency}
        self._version: str | None = None  # the version this publisher made last (or a part of)
        self._last: mf.Manifest | None = None  # ... its manifest, once known
        self._kept: dict[tuple[str, int], np.ndarray] = {}  # (tensor, chunk index) -> its bytes in that version
        self._digest: dict[tuple[str, int], str] = {}  # ... their xxh3 as that version records it
        self._age: dict[tuple[str, int], int] = {}  # ... versions since the chunk was last stored whole
        self._file_bytes: dict[str, bytes] = {}  # config.json and the engine files, as first published
        self._history: list[str] = []  # the versions this publisher made, oldest first

    def __repr__(self) -> str:  # never show credentials handed in through connector_options
        from ..redact import redact_url

        return f"UpdatePublisher({redact_url(self.url)!r}, {self.model!r}, {self.policy})"

    @property
    def version(self) -> str | None:
        """The version this publisher published last (None before the first)."""
        return self._version

    @bulk
    def publish(self, tensors: Mapping[str, torch.Tensor], *, token: str | None = None, part: int | None = None,
                wait: bool = False) -> PublishResult:
        """Publish ``tensors`` (name -> tensor, CPU or CUDA) as the next version and make it current; returns what
        was written, with ``update`` = ``{"base", "whole", "deltas", "unchanged", "bytes_written"}`` (``base``:
        the version it is built on, None for a version stored whole). With ``token`` (from ``open_version``), this
        publisher's tensors are part ``part`` of that version (one publisher per part, each its own tensors: the
        deltas are against the version its parts made last); ``wait`` as in ``publish_state_dict``. A failure
        leaves the current version serving, and the next publish stores every chunk whole."""
        started = time.perf_counter()
        entries, chunk_of = _entries(tensors)
        try:
            if token is not None:
                return self._part(entries, chunk_of, token, part, wait, started)
            if part is not None or wait:
                raise ConfigError("part= and wait= publish one part of a version: pass token= from open_version too")
            with open_connector(self.url, **(self._connector_options or {})) as conn:
                start = versions.stored_pointer(conn, self.model)
                base = self._base(conn, start)
                if base is None:
                    return self._whole(conn, start, entries, chunk_of, started)
                return self._delta(conn, start, base, entries, chunk_of, started)
        except BaseException:
            self._forget()  # what is kept may be ahead of the store now: start again from a whole version
            raise

    def _forget(self) -> None:
        self._version, self._last = None, None
        self._kept.clear()
        self._digest.clear()
        self._age.clear()
        self._history.clear()

    # ---------------------------------------------------------------- a version stored whole
    def _keeping(self, cuts: list[Cut], chunk_of: ChunkBytes) -> ChunkBytes:
        """``chunk_of`` that also keeps a copy of every chunk as it is written (what the next deltas are against)."""
        self._forget()
        index = {(cut.entry.name, c.id): i for cut in cuts for i, c in enumerate(cut.chunks)}

        def keeping(cut: Cut, c) -> np.ndarray:
            data = chunk_of(cut, c)
            key = (cut.entry.name, index[(cut.entry.name, c.id)])
            self._kept[key], self._age[key] = data.copy(), 0
            return data

        return keeping

    def _whole(self, conn: Connector, start: bytes | None, entries, chunk_of: ChunkBytes,
               started: float) -> PublishResult:
        config, files, skipped = self._files or _inherited(conn, self.model, start)
        ruleset = RuleSet.for_checkpoint(config, self._rules)
        cuts = plan_cuts(entries, config, ruleset, self._options["max_tp"])
        result = publish_cuts(conn, self.model, start, cuts, self._keeping(cuts, chunk_of), ruleset, config, files,
                              started=started, allow_eviction=self._allow_eviction, skipped=skipped, **self._options)
        self._file_bytes = files
        self._done(result.version, versions.read_manifest(conn, self.model, result.version), cuts)
        chunks = sum(len(c.chunks) for c in cuts)
        result.update = {"base": None, "whole": chunks, "deltas": 0, "unchanged": 0, "bytes_written": result.bytes}
        return result

    def _base(self, conn: Connector, start: bytes | None) -> mf.Manifest | None:
        """The version to build on: the one this publisher made, if it is still the current one (``start``: the
        pointer's bytes)."""
        if self._version is None or start is None:
            return None
        cur = versions.parse_current(start, f"{conn.describe()} {mf.manifest_key(self.model)}")
        if cur.version != self._version:
            log.info("%s: the current version is %s, not %s (published here): storing every chunk whole",
                     self.model, cur.version, self._version)
            return None
        if self._last is None or self._last.version != cur.version:  # a version of parts: merged by any of them
            self._last = versions.read_manifest_bytes(conn, self.model, cur.version,
                                                      manifest_sha256=cur.manifest_sha256)[0]
        return self._last

    def _done(self, version: str, manifest: mf.Manifest | None, cuts: list[Cut]) -> None:
        """``version`` (its manifest, when known) holds ``cuts`` as this publisher keeps them: remember each chunk's
        recorded digest, and keep only those chunks."""
        self._version, self._last = version, manifest
        self._history.append(version)
        self._digest = {(cut.entry.name, i): d for cut in cuts for i, d in enumerate(cut.xxh3)}
        self._kept = {k: v for k, v in self._kept.items() if k in self._digest}
        self._age = {k: v for k, v in self._age.items() if k in self._digest}

    # ---------------------------------------------------------------- a version built on the last one
    def _decided(self, conn: Connector, base: mf.Manifest, cuts: list[Cut], ruleset: RuleSet, chunk_of: ChunkBytes,
                 *, subset: bool = False) -> list[list[_Chunk]] | None:
        """Per chunk of ``cuts``: unchanged, a delta or whole (None: the tensors or their cut differ from the
        base's, so everything is stored whole)."""
        limit = conn.max_object_bytes or self._options["part_bytes"]
        if not self._same_shape(base, cuts, ruleset, subset) or (not conn.packs_files and base.key_part_bytes != limit):
            log.info("%s: tensors, rules or grid differ from version %s: storing every chunk whole", self.model,
                     base.version)
            return None
        algos = self._options["digests"]
        return run_all(lambda cut: self._decide(cut, chunk_of, base, algos), cuts, self._options["concurrency"],
                       "publish")

    def _delta(self, conn: Connector, start: bytes, base: mf.Manifest, entries, chunk_of: ChunkBytes,
               started: float) -> PublishResult:
        ruleset = RuleSet.for_checkpoint(base.config, self._rules)
        cuts = plan_cuts(entries, base.config, ruleset, self._options["max_tp"])
        decided = self._decided(conn, base, cuts, ruleset, chunk_of)
        if decided is None:
            return self._whole(conn, start, entries, chunk_of, started)
        version = mf.new_version(f"{self.model}{ruleset.fingerprint()}")
        warnings = eviction_check(conn, self._allow_eviction)
        out = WriteLedger(conn)
        with removed_on_failure(conn, self.model, version, out):
            manifest = self._write(out, base, version, cuts, decided, ruleset, base.config)
            out.confirm()
            manifest = _finish(conn, manifest, start, out)
        for w in warnings:
            log.warning(w)
        self._aged(cuts, decided)
        self._done(manifest.version, manifest, cuts)
        result = result_of(manifest, conn, cuts, started, warnings=warnings, files=sorted(manifest.files))
        result.update = self._stats(base, decided, out)
        return result

    def _aged(self, cuts: list[Cut], decided: list[list[_Chunk]]) -> None:
        for cut, chosen in zip(cuts, decided, strict=True):
            for i, d in enumerate(chosen):
                key = (cut.entry.name, i)
                self._age[key] = 0 if d.kind == "whole" else self._age[key] + 1

    @staticmethod
    def _stats(base: mf.Manifest | None, decided: list[list[_Chunk]], out: WriteLedger) -> dict:
        kinds = [d.kind for chosen in decided for d in chosen]
        return {"base": base.version if base else None, "whole": kinds.count("whole"),
                "deltas": kinds.count("delta"), "unchanged": kinds.count("same"),
                "bytes_written": sum(out.sizes.values())}

    # ---------------------------------------------------------------- one part of a version of several
    def _part(self, entries, chunk_of: ChunkBytes, token: str, part, wait: bool, started: float) -> PublishResult:
        """This publisher's tensors as part ``part`` of the version ``token`` opened: built on the version its
        parts made last when that is the one the token replaces, else whole."""
        seen: dict = {}

        def write_part(out: WriteLedger, cuts: list[Cut], chunk_of: ChunkBytes, ruleset: RuleSet, config: dict,
                       tok, tag: str) -> mf.Manifest:
            start = versions.stored_pointer(out.conn, self.model)
            replaces = start is not None and versions.sha256(start) == tok.base_sha256
            base = self._base(out.conn, start) if replaces else None
            decided = self._decided(out.conn, base, cuts, ruleset, chunk_of, subset=True) if base else None
            seen.update(base=base, cuts=cuts, decided=decided, out=out)
            if decided is None:
                return _whole_part(self._options)(out, cuts, self._keeping(cuts, chunk_of), ruleset, config, tok, tag)
            return self._write(out, base, tok.version, cuts, decided, ruleset, config, tag=tag, files=False)

        result = _publish_part(entries, chunk_of, self.url, self.model, token, part, wait, rules=self._rules,
                               options=self._options, connector_options=self._connector_options,
                               allow_eviction=self._allow_eviction, started=started, write_part=write_part)
        cuts, decided = seen["cuts"], seen["decided"]
        if decided is None:
            decided = [[_Chunk("whole")] * len(cut.chunks) for cut in cuts]
        else:
            self._aged(cuts, decided)
        self._done(result.version, None, cuts)  # its manifest is the merged one: read when the next part builds on it
        result.update = self._stats(seen["base"] if seen["decided"] is not None else None, decided, seen["out"])
        return result

    def _same_shape(self, base: mf.Manifest, cuts: list[Cut], ruleset: RuleSet, subset: bool = False) -> bool:
        """The new tensors are the base's (``subset``: some of them), cut the same way (names, dtypes, shapes,
        rules, max_tp), and this publisher kept every chunk's bytes."""
        if ruleset.fingerprint() != base.rules_fingerprint or self._options["max_tp"] != base.max_tp:
            return False
        names = {c.entry.name for c in cuts}
        if not (names <= set(base.tensors) if subset else names == set(base.tensors)):
            return False
        if any((c.entry.name, i) not in self._kept for c in cuts for i in range(len(c.chunks))):
            return False
        for cut in cuts:
            t = base.tensors[cut.entry.name]
            if t.dtype != cut.entry.dtype or tuple(t.shape) != tuple(cut.entry.shape) or base.rule_of(t) != cut.rule:
                return False
        return True

    def _decide(self, cut: Cut, chunk_of: ChunkBytes, base: mf.Manifest, algos) -> list[_Chunk]:
        """Per chunk of ``cut``: unchanged, a delta or whole; the kept bytes become the new ones, and the cut
        records each changed chunk's digests (a whole chunk's are recorded again as it is written)."""
        t = base.tensors[cut.entry.name]
        cut.xxh3, cut.blake3 = list(t.xxh3), list(t.blake3 or [])
        out = []
        for i, c in enumerate(cut.chunks):
            key = (cut.entry.name, i)
            new, old = chunk_of(cut, c), self._kept[key]
            nbytes = new.nbytes
            held = sum(p.nbytes for p in base.deltas(t, i))
            # due anyway, or the base does not hold what is kept here (the tensor came from another part since)
            if self._age[key] + 1 >= self.policy.full_every or self._digest.get(key) != t.xxh3[i]:
                out.append(_Chunk("whole"))
                np.copyto(old, new)
                continue
            difference = deltas.xor(new, old)
            if not difference.any():
                out.append(_Chunk("same"))
                continue
            blob = deltas.encode(difference)
            np.copyto(old, new)
            if self.policy.stored_whole(self._age[key], held, len(blob), nbytes):
                out.append(_Chunk("whole"))
                continue
            d = _digests(old, algos)
            cut.xxh3[i] = d["xxh3"]
            if cut.blake3:
                cut.blake3[i] = d["blake3"]
            out.append(_Chunk("delta", blob))
        return out

    def _write(self, out: WriteLedger, base: mf.Manifest, version: str, cuts: list[Cut],
               decided: list[list[_Chunk]], ruleset: RuleSet, config: dict, *, tag: str = "",
               files: bool = True) -> mf.Manifest:
        """Write the whole chunks (as publish does, from the bytes kept: what was decided on, even if the trainer's
        tensors change meanwhile) and the deltas (packed; object names start with ``tag``), and return the new
        manifest: every other chunk names the base's stored bytes and deltas; the files are the base's
        (``files=False``: none, a part's manifest)."""
        o, prefix = self._options, mf.version_prefix(self.model, version)
        index = {(cut.entry.name, c.id): i for cut in cuts for i, c in enumerate(cut.chunks)}
        kept_of = lambda cut, c: self._kept[(cut.entry.name, index[(cut.entry.name, c.id)])]  # noqa: E731 - as decided
        whole = [Cut(cut.entry, cut.rule, tuple(c for c, d in zip(cut.chunks, chosen, strict=True)
                                                if d.kind == "whole"))
                 for cut, chosen in zip(cuts, decided, strict=True)]
        written, key_part_bytes = write_chunks(out, [w for w in whole if w.chunks], kept_of, prefix, o["max_tp"],
                                               o["digests"], o["part_bytes"], o["concurrency"], tag=tag)
        objects = _Objects(written)
        blobs = self._write_deltas(out, f"{prefix}{tag}", decided, objects)
        chain = [base.version, *(base.chain or ())]
        for cut, chosen, w in zip(cuts, decided, whole, strict=True):
            t = base.tensors[cut.entry.name]
            packed = bool(written) or t.at is not None
            cut.at, cut.home, cut.delta = [], [], []
            j = 0
            for i, d in enumerate(chosen):
                if d.kind == "whole":
                    cut.xxh3[i] = w.xxh3[j]
                    if cut.blake3:
                        cut.blake3[i] = w.blake3[j]
                    if w.at:
                        cut.at += [w.at[2 * j], w.at[2 * j + 1]]
                    cut.home.append(0)
                    cut.delta.append([])
                    j += 1
                    continue
                if packed:
                    cut.at += [objects.index(base.objects[t.at[2 * i]]), t.at[2 * i + 1]]
                cut.home.append(1 + chain.index(base.home_version(t, i)) if not packed else 0)
                steps = [v for p in base.deltas(t, i) for v in (objects.index(p.object), p.offset, p.nbytes)]
                if d.kind == "delta":
                    steps += list(blobs.pop(0))
                cut.delta.append(steps)
            if packed and len(cut.at) != 2 * len(cut.chunks):
                raise RaydistError(f"tensor {cut.entry.name!r}: stored packed and per object at once (a store "
                                   "that changed how it stores chunks): publish the model whole")
        files = self._files_for(out, prefix, base) if files else {}
        used = {key.split("/")[len(self.model.split("/"))] for key in (*objects.keys, *(f.object for f in
                                                                                        files.values()))}
        for cut in cuts:
            used.update(chain[h - 1] for h in cut.home if h)
        chain_used = sorted(v for v in chain if v in used)
        for cut in cuts:  # homes index the chain as it is recorded
            cut.home = [0 if h == 0 else 1 + chain_used.index(chain[h - 1]) for h in cut.home]
        return _new_manifest(self.model, version, "chunked", o["max_tp"], o["digests"], ruleset, config, cuts,
                             files, objects=objects.keys, key_part_bytes=key_part_bytes, chain=chain_used)

    def _files_for(self, out: WriteLedger, prefix: str, base: mf.Manifest) -> dict[str, mf.FileRecord]:
        """The base's file records, each naming its object where it is, unless that object is in a version
        ``full_every`` or more versions back: written again under ``prefix`` then (a chain names a bounded number
        of versions)."""
        recent = set(self._history[-(self.policy.full_every - 1):]) if self.policy.full_every > 1 else set()
        version_of = lambda key: key.split("/")[len(self.model.split("/"))]  # noqa: E731
        mine = {name: data for name, data in self._file_bytes.items()
                if name in base.files and digest.xxh3(data) == base.files[name].xxh3}
        stale = {name: mine.get(name) or _checked(out.conn, name, rec) for name, rec in base.files.items()
                 if version_of(rec.object) not in recent}
        files = dict(base.files)
        files.update(_file_records(out, stale, f"{prefix}files/", self._options["digests"]) if stale else {})
        return files

    def _write_deltas(self, out: WriteLedger, prefix: str, decided: list[list[_Chunk]],
                      objects: _Objects) -> list[tuple[int, int, int]]:
        """Pack every delta into objects of at most DELTA_OBJECT_BYTES; returns each one's (object, offset,
        nbytes) in order."""
        limit = min(DELTA_OBJECT_BYTES, out.conn.max_object_bytes or DELTA_OBJECT_BYTES)
        places, pack, size = [], [], 0
        items: list[tuple[str, bytes]] = []

        def flush() -> None:
            nonlocal pack, size
            if pack:
                key = f"{prefix}deltas-{len(items):04d}.zst"
                items.append((key, b"".join(pack)))
                obj = objects.index(key)
                places[-len(pack):] = [(obj, off, n) for _, off, n in places[-len(pack):]]
                pack, size = [], 0

        for chosen in decided:
            for d in chosen:
                if d.kind != "delta":
                    continue
                if size and size + len(d.blob) > limit:
                    flush()
                places.append((-1, size, len(d.blob)))
                pack.append(d.blob)
                size += len(d.blob)
        flush()
        for key, data in items:
            out.write(key, data)
        return places


def _checked(conn: Connector, name: str, record: mf.FileRecord) -> bytes:
    """File ``name``'s bytes as stored, checked against its digest."""
    data = conn.read(record.object)
    if digest.xxh3(data) != record.xxh3:
        raise VerificationError(f"file {name!r} at {record.object} differs from its digest: not copied into the new "
                                "version; publish with files_from=DIR")
    return data


class _Objects:
    """The new manifest's object table, built as objects are named (each once)."""

    def __init__(self, keys: Sequence[str]):
        self.keys = list(keys)
        self._index = {k: i for i, k in enumerate(self.keys)}

    def index(self, key: str) -> int:
        i = self._index.get(key)
        if i is None:
            i = self._index[key] = len(self.keys)
            self.keys.append(key)
        return i
