"""Layer 2 (store): Put a model in a store: ``publish`` (HF checkpoint dir -> chunked layout) and ``index`` (in
place).

Both apply the sharding rules once, cut every tensor on the chunk grid, hash each chunk, and write the manifest
last, so a half-written model is never taken for a complete one (a reader sees the old manifest or the new one).
The chunked pipeline (:func:`publish_cuts`: write, confirm, swap; :func:`write_chunks`, :func:`removed_on_failure`)
takes its bytes from a :data:`ChunkBytes` function, so a checkpoint's mapped files and tensors in memory
(:mod:`.memory`) go through the same code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import digest, dtypes
from ..bulk import bulk
from ..connectors import Connector, open_connector
from ..errors import BackendError, ConfigError, ConflictError, RaydistError
from ..options import MAX_CONCURRENCY, MAX_PART_BYTES, MAX_TP, check_range
from ..pool import batches, run_all
from . import grid, versions
from . import manifest as mf
from .ledger import WriteLedger
from .repo import DEFAULT_MAX_FILE_BYTES, RepoFiles, SkippedFile, select
from .rules import ModelDims, RuleSet, TensorRule
from .safetensors_io import Entry, layout, read_header, stream

log = logging.getLogger(__name__)

DEFAULT_MAX_TP = 8
DEFAULT_PART_BYTES = 1536 << 20
#: Tensor bytes per ``write_many`` when each chunk is its own object (Redis): enough to pipeline many small
#: tensors, small enough that a few batches in flight overlap hashing with sending.
OBJECT_BATCH_BYTES = 16 << 20


@dataclass
class PublishResult:
    """What publish/index wrote: the version, how much, and how fast."""

    model: str
    version: str
    url: str
    layout: str
    tensors: int
    chunks: int
    bytes: int
    seconds: float
    objects: int
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # recorded for pull_files
    skipped: list[SkippedFile] = field(default_factory=list)  # repo entries neither weights nor recorded
    current: bool = True  # the version is current (False: a part of a version whose other parts are not all in)
    #: a version published by an UpdatePublisher (:mod:`.updates`): its base and what it stored, per chunk
    update: dict | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


@dataclass
class Cut:
    """One tensor as it will be stored: its source entry, its rule and its chunks; then, as publish or index
    hashes the chunks, their digests (and, packed, where each landed), by grid index."""

    entry: Entry
    rule: TensorRule
    chunks: tuple[grid.Chunk, ...]
    xxh3: list[str] = field(default_factory=list)
    blake3: list[str] = field(default_factory=list)
    at: list[int] = field(default_factory=list)  # packed: [object, offset] per chunk, flattened
    home: list[int] = field(default_factory=list)  # built on earlier versions (:mod:`.updates`): manifest ``home``
    delta: list[list[int]] = field(default_factory=list)  # ... and its ``delta`` triples per chunk

    def start(self, algos: Sequence[str], packed: bool = False) -> None:
        """Make room for every chunk's digests (and place) before the chunks are hashed, in any order."""
        n = len(self.chunks)
        self.xxh3 = [""] * n
        self.blake3 = [""] * n if "blake3" in algos else []
        self.at = [0] * (2 * n) if packed else []

    def hashed(self, i: int, data, algos: Sequence[str], place: tuple[int, int] | None = None) -> None:
        """Record chunk ``i``'s digests of its bytes ``data`` (and its place: object index, offset)."""
        d = _digests(data, algos)
        self.xxh3[i] = d["xxh3"]
        if self.blake3:
            self.blake3[i] = d["blake3"]
        if place is not None:
            self.at[2 * i : 2 * i + 2] = place


#: A chunk's row-major bytes, contiguous (a numpy uint8 array): how the writers read what they publish.
ChunkBytes = Callable[[Cut, grid.Chunk], np.ndarray]


def array_chunks(raw: Mapping[str, np.ndarray]) -> ChunkBytes:
    """Chunks cut from each tensor's flat bytes (``raw``: name -> uint8 array, e.g. a checkpoint's mapped file)."""

    def chunk(cut: Cut, c: grid.Chunk) -> np.ndarray:
        return grid.chunk_bytes(raw[cut.entry.name], cut.entry.shape, cut.rule.dim, dtypes.itemsize(cut.entry.dtype), c)

    return chunk


# ------------------------------------------------------------------------------------------ shared pieces
def plan_cuts(entries: Sequence[Entry], config: dict, rules: RuleSet, max_tp: int) -> list[Cut]:
    """Every tensor with its rule and chunks at ``max_tp`` (publish, index and config-only sizing share this)."""
    dims = ModelDims.from_config(config)
    resolved = rules.resolve_all({e.name: e.shape for e in entries}, dims)
    grid.check_max_tp(resolved, {e.name: e.shape for e in entries}, max_tp)
    return [Cut(e, resolved[e.name], grid.chunks(resolved[e.name], e.shape, max_tp)) for e in entries]


def _digests(data, algos: Sequence[str]) -> dict[str, str]:
    view = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    out = {"xxh3": digest.xxh3(view)}
    if "blake3" in algos:
        out["blake3"] = digest.blake3_hex(view)
    return out


def _cut_bytes(cut: Cut, chunk_of: ChunkBytes) -> Iterator[tuple[grid.Chunk, np.ndarray]]:
    for c in cut.chunks:
        yield c, chunk_of(cut, c)


def _tensors(cuts: Sequence[Cut], sources: dict[str, list[int]] | None = None) -> tuple[list[dict], dict[str, dict]]:
    """The manifest's rule table and tensor records (plain dicts, validated once with the whole manifest)."""
    table: dict[TensorRule, int] = {}
    tensors = {}
    for cut in cuts:
        e = cut.entry
        record = {"dtype": e.dtype, "shape": list(e.shape), "rule": table.setdefault(cut.rule, len(table))}
        record["xxh3"] = cut.xxh3
        if cut.blake3:
            record["blake3"] = cut.blake3
        if cut.at:
            record["at"] = cut.at
        if any(cut.home):
            record["home"] = cut.home
        if any(cut.delta):
            record["delta"] = cut.delta
        if sources is not None:
            record["source"] = sources[e.name]
        tensors[e.name] = record
    return [r.to_dict() for r in table], tensors


def _file_records(out: WriteLedger, files: dict[str, bytes], prefix: str, algos) -> dict[str, mf.FileRecord]:
    records = {}
    for name, data in files.items():
        records[name] = mf.FileRecord(object=f"{prefix}{name}", nbytes=len(data), **_digests(data, algos))
    out.write_many([(f"{prefix}{name}", data) for name, data in files.items()])  # one pipeline on Redis
    return records


def _finish(conn: Connector, manifest: mf.Manifest, start: bytes | None, out: WriteLedger | None = None) -> mf.Manifest:
    """Write the version's own manifest, then swap the current pointer to it last: the atomic switch that makes the
    new version visible, a compare-and-swap against the pointer as it was when this publish started (``start``):
    when another publish, index or promote changed it meanwhile, this one did not become current and says so
    (:class:`ConflictError`; the version stays complete, for ``promote``). The version it replaces is retired now,
    which is when ``gc``'s grace period for it starts."""
    try:
        return versions.write_version(conn, manifest, start, what="publish", write=out.write if out else None)[0]
    except ConflictError as e:
        raise ConflictError(f"{e}; its objects under {mf.version_prefix(manifest.model, manifest.version)} stay "
                            "complete: `raydist-loader promote` makes it current, `raydist-loader gc` deletes it "
                            "after its grace") from None


@contextmanager
def removed_on_failure(conn: Connector, model: str, version: str, out: WriteLedger) -> Iterator[None]:
    """Around a publish's writes: any failure removes what ``out`` wrote and raises one :class:`BackendError`
    (a lost swap race, :class:`ConflictError`, leaves the complete version for promote or gc)."""
    try:
        yield
    except ConflictError:  # lost the race: its objects stay for gc (a reader may have seen their names)
        raise
    except (RaydistError, OSError) as e:
        raise _failed(conn, model, version, out, e) from None
    except BaseException:  # Ctrl-C or a bug: still leave nothing behind
        out.remove()
        raise


def _failed(conn: Connector, model: str, version: str, out: WriteLedger, error: BaseException) -> BackendError:
    """One line for a publish that failed: the store, the cause, what was removed and what stays current."""
    where = conn.describe()
    try:
        current = versions.current_or_none(conn, model)
        stays = f"version {current.version} stays current" if current else f"no version of {model!r} is current"
    except RaydistError:
        current, stays = None, "the previous manifest, if any, stays current"
    if current is not None and current.version == version:  # the swap landed though its write reported an error
        return BackendError(
            f"publish of {model!r} to {where} reported an error after the manifest swap ({error}), but the store "
            f"names the new version {version}: run `raydist-loader verify` to check it"
        )
    removed = out.remove()
    return BackendError(
        f"publish of {model!r} to {where} failed: {error}; removed {removed} of the {len(out.sizes)} object(s) it "
        f"started to write under {mf.version_prefix(model, version)}; {stays}"
    )


def _new_manifest(
    model, version, layout_name, max_tp, algos, rules, config, cuts, files, *, objects, sources=None,
    key_part_bytes=None, chain=None,
) -> mf.Manifest:
    """The manifest of what was written, validated and checked as a reader will."""
    tensor_rules, tensors = _tensors(cuts, sources)
    doc = {
        "format": mf.FORMAT,
        "model": model,
        "version": version,
        "layout": layout_name,
        "created": time.time(),
        "max_tp": max_tp,
        "digests": ["xxh3_128", *(["blake3"] if "blake3" in algos else [])],
        "rules": rules.to_dict(),
        "rules_fingerprint": rules.fingerprint(),
        "config": config,
        "tensor_rules": tensor_rules,
        "objects": objects,
        "key_part_bytes": key_part_bytes,
        "tensors": tensors,
        "files": files,
        "chain": chain or None,
    }
    m = mf.Manifest.model_validate(doc)
    m.check()
    return m


# ------------------------------------------------------------------------------------------ publish
def _read_checkpoint(src: Path, max_file_bytes: int) -> RepoFiles:
    """The checkpoint directory's weights (keys relative to ``src``), config and engine files (see repo.py)."""
    from ..connectors.file import FileConnector

    if not src.is_dir():
        raise ConfigError(f"checkpoint directory {str(src)!r} does not exist or is not a directory")
    with FileConnector(str(src.resolve())) as local:
        return select(local, "", str(src), max_file_bytes=max_file_bytes)


def _local_entries(weights: list[Path]) -> tuple[list[Entry], dict[str, np.ndarray]]:
    from ..connectors.file import FileConnector

    entries, raw = [], {}
    with FileConnector(str(weights[0].parent)) as local:
        for path in weights:
            mm = np.memmap(path, dtype=np.uint8, mode="r")
            for e in read_header(local, path.name):
                if e.name in raw:
                    raise ConfigError(f"tensor {e.name!r} appears in more than one file of the checkpoint")
                entries.append(e)
                raw[e.name] = mm[e.offset : e.offset + e.nbytes]
    return entries, raw


@bulk
def publish(
    src_dir: str | Path,
    url: str,
    model: str,
    *,
    max_tp: int = DEFAULT_MAX_TP,
    rules: str | Path | dict | None = None,
    digests: Sequence[str] = ("xxh3_128",),
    part_bytes: int = DEFAULT_PART_BYTES,
    concurrency: int = 4,
    connector_options: dict | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    allow_eviction: bool = False,
) -> PublishResult:
    """Publish the HF checkpoint in ``src_dir`` to store ``url`` as ``model`` (chunked layout, new version).

    ``rules`` (YAML path or dict) override the preset chosen by config.json's model_type; ``max_tp`` is the finest
    tp the store will serve (every divisor that the tensors allow is served too). The weights are the files
    ``model.safetensors.index.json`` names (else ``model.safetensors``); config/tokenizer files up to
    ``max_file_bytes`` are stored for ``pull_files``; the result lists everything skipped. Before the manifest swap
    every object written is confirmed to be there with its size; any failure removes what was written and raises
    one :class:`BackendError` (the previous version stays current). A store that may evict objects (Redis with a
    ``maxmemory-policy`` other than ``noeviction``) is refused unless ``allow_eviction``.
    """
    started = time.perf_counter()
    mf.check_model_name(model)
    check_sizes(max_tp=max_tp, part_bytes=part_bytes, concurrency=concurrency, max_file_bytes=max_file_bytes)
    src = Path(src_dir)
    repo = _read_checkpoint(src, max_file_bytes)
    entries, raw = _local_entries([src / w for w in repo.weights])
    ruleset = RuleSet.for_checkpoint(repo.config, rules)
    cuts = plan_cuts(entries, repo.config, ruleset, max_tp)
    with open_connector(url, **(connector_options or {})) as conn:
        start = versions.stored_pointer(conn, model)  # what the swap replaces: a publish landing meanwhile loses
        return publish_cuts(
            conn, model, start, cuts, array_chunks(raw), ruleset, repo.config, repo.files, started=started,
            max_tp=max_tp, digests=digests, part_bytes=part_bytes, concurrency=concurrency,
            allow_eviction=allow_eviction, skipped=repo.skipped,
        )


def publish_cuts(
    conn: Connector, model: str, start: bytes | None, cuts: list[Cut], chunk_of: ChunkBytes, ruleset: RuleSet,
    config: dict, files: dict[str, bytes], *, started: float, max_tp: int, digests: Sequence[str], part_bytes: int,
    concurrency: int, allow_eviction: bool, skipped: list[SkippedFile] | None = None,
) -> PublishResult:
    """The chunked publish of planned ``cuts`` (bytes from ``chunk_of``) with ``config`` and engine ``files`` as a
    new version of ``model``: write, confirm, then swap the pointer against ``start`` (its bytes when the caller
    began). A failure removes what was written (:func:`removed_on_failure`)."""
    version = mf.new_version(f"{model}{ruleset.fingerprint()}{max_tp}")
    prefix = mf.version_prefix(model, version)
    warnings = eviction_check(conn, allow_eviction)
    out = WriteLedger(conn)
    with removed_on_failure(conn, model, version, out):
        objects, key_part_bytes = write_chunks(out, cuts, chunk_of, prefix, max_tp, digests, part_bytes, concurrency)
        file_recs = _file_records(out, files, f"{prefix}files/", digests)
        manifest = _new_manifest(
            model, version, "chunked", max_tp, digests, ruleset, config, cuts, file_recs, objects=objects,
            key_part_bytes=key_part_bytes,
        )
        out.confirm()
        manifest = _finish(conn, manifest, start, out)
    for w in warnings:
        log.warning(w)
    return result_of(manifest, conn, cuts, started, warnings=warnings, files=sorted(files), skipped=skipped or [])


def result_of(manifest: mf.Manifest, conn: Connector, cuts: list[Cut], started: float, **extra) -> PublishResult:
    """What ``cuts`` were published as ``manifest`` (a part's own manifest when a part of a version)."""
    return PublishResult(
        manifest.model, manifest.version, conn.describe(), manifest.layout, len(cuts),
        sum(len(c.chunks) for c in cuts), manifest.total_bytes, time.perf_counter() - started,
        len(manifest.all_objects()), **extra,
    )


def eviction_check(conn: Connector, allow: bool) -> list[str]:
    """Refuse a store that may evict what publish writes (its warning, when ``allow``)."""
    check = getattr(conn, "check_eviction_policy", None)
    message = check() if check else None
    if message and not allow:
        raise ConfigError(
            f"{message}; or pass --allow-eviction (allow_eviction=True) to publish anyway (publish then fails "
            "cleanly if objects are evicted before its manifest swap, but later evictions break loads)"
        )
    return [message] if message else []


def write_chunks(
    out: WriteLedger, cuts: list[Cut], chunk_of: ChunkBytes, prefix: str, max_tp: int, algos: Sequence[str],
    part_bytes: int, concurrency: int, tag: str = "",
) -> tuple[list[str], int | None]:
    """Write every chunk of ``cuts`` under ``prefix``, hashing each into its cut: packed into safetensors files
    (file, S3; their names start with ``tag``) or one object per chunk (Redis). Returns the manifest's object table
    and ``key_part_bytes``."""
    if out.conn.packs_files:
        return _write_files(out, cuts, chunk_of, prefix, max_tp, algos, part_bytes, concurrency, tag), None
    return [], _write_objects(out, cuts, chunk_of, prefix, algos, part_bytes, concurrency)


def _groups(cuts: list[Cut], max_tp: int, part_bytes: int, tag: str = "") -> dict[str, list[tuple[Cut, int]]]:
    """File name -> the chunks it holds (tensor, grid index), in tensor order: chunks of the lowest rank slot that
    reads them, replicated tensors in their own files, each group cut into parts of about ``part_bytes``; every
    name starts with ``tag``."""
    slots: dict[str, list[tuple[Cut, int]]] = {}
    names = [f"{tag}rank{r:03d}-of-{max_tp:03d}" for r in range(max_tp)]
    for cut in cuts:
        if cut.rule.style == "replicate":
            slots.setdefault(f"{tag}replicated", []).extend((cut, i) for i in range(len(cut.chunks)))
            continue
        owner = grid.lowest_slot(cut.rule, cut.entry.shape, max_tp)
        for i, c in enumerate(cut.chunks):
            slots.setdefault(names[owner[c.id]], []).append((cut, i))
    files: dict[str, list[tuple[Cut, int]]] = {}
    for slot, members in slots.items():
        part, size = 0, 0
        for cut, i in members:
            nbytes = _chunk_nbytes(cut, cut.chunks[i])
            if size and size + nbytes > part_bytes:
                part, size = part + 1, 0
            files.setdefault(f"{slot}-part{part:03d}.safetensors", []).append((cut, i))
            size += nbytes
    return files


def _chunk_nbytes(cut: Cut, c: grid.Chunk) -> int:
    return grid.chunk_nbytes(cut.entry.shape, cut.rule.dim, c.start, c.end, dtypes.itemsize(cut.entry.dtype))


def _chunk_name(cut: Cut, c: grid.Chunk) -> str:
    return f"{cut.entry.name}::{c.id}"


def _write_files(out, cuts, chunk_of, prefix, max_tp, algos, part_bytes, concurrency, tag) -> list[str]:
    """file/S3: chunks packed into safetensors files; records each chunk's digests and place in its cut and
    returns the object table (the files' keys)."""
    for cut in cuts:
        cut.start(algos, packed=True)
    groups = _groups(cuts, max_tp, part_bytes, tag)
    keys = [f"{prefix}{fname}" for fname in groups]

    def write_one(obj: int, members: list[tuple[Cut, int]]) -> None:
        key = keys[obj]
        items = [
            (
                _chunk_name(cut, cut.chunks[i]),
                cut.entry.dtype,
                grid.chunk_shape(cut.entry.shape, cut.rule.dim, cut.chunks[i]),
                _chunk_nbytes(cut, cut.chunks[i]),
            )
            for cut, i in members
        ]
        head, offsets = layout(items, {"format": "raydist-loader chunks"})

        def blocks():
            for (cut, i), item in zip(members, items, strict=True):
                data = chunk_of(cut, cut.chunks[i])
                cut.hashed(i, data, algos, (obj, offsets[item[0]]))
                yield memoryview(data)

        out.write(key, stream(head, blocks()))

    run_all(lambda item: write_one(*item), enumerate(groups.values()), concurrency, "publish")
    return keys


def _write_objects(out, cuts, chunk_of, prefix, algos, part_bytes, concurrency) -> int:
    """Redis-like stores: one object per chunk, ``<tensor>::<chunk id>`` (split into parts ``#0``, ``#1``...
    above the backend's value limit), written in batches of about ``OBJECT_BATCH_BYTES`` of tensors with one
    ``write_many`` each (pipelined on Redis), values sent from the checkpoint's mapped bytes (or a chunk's one
    gathered copy), never copied again; records each chunk's digests in its cut and returns the part size."""
    limit = out.conn.max_object_bytes or part_bytes

    def write_batch(batch: list[Cut]) -> None:
        """Write once about OBJECT_BATCH_BYTES are held (a big tensor cut on dim > 0: its gathered chunk copies are
        sent a few at a time, not all held at once)."""
        items, held = [], 0
        for cut in batch:
            cut.start(algos)
            for i, (c, data) in enumerate(_cut_bytes(cut, chunk_of)):
                key = f"{prefix}{_chunk_name(cut, c)}"
                view = memoryview(data)
                spans = [(a, min(a + limit, data.nbytes)) for a in range(0, data.nbytes, limit)] or [(0, 0)]
                items += [(key if len(spans) == 1 else f"{key}#{k}", view[a:b]) for k, (a, b) in enumerate(spans)]
                cut.hashed(i, data, algos)
                held += data.nbytes
                if held >= OBJECT_BATCH_BYTES:
                    out.write_many(items)
                    items, held = [], 0
        if items:
            out.write_many(items)

    run_all(write_batch, batches(cuts, OBJECT_BATCH_BYTES, lambda cut: cut.entry.nbytes), concurrency, "publish")
    return limit


# ------------------------------------------------------------------------------------------ index
@bulk
def index(
    url: str,
    model: str,
    *,
    max_tp: int = DEFAULT_MAX_TP,
    rules: str | Path | dict | None = None,
    digests: Sequence[str] = ("xxh3_128",),
    connector_options: dict | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> PublishResult:
    """Record an in-place manifest for the HF checkpoint stored under ``<url>/<model>/`` (files left untouched).

    Reads every tensor once to hash its chunks; a later load reads byte ranges of the original files. Files are
    chosen as by :func:`publish` (weights the index names; engine files up to ``max_file_bytes``; the rest
    skipped, unread, and listed in the result).
    """
    started = time.perf_counter()
    mf.check_model_name(model)
    check_sizes(max_tp=max_tp, max_file_bytes=max_file_bytes)
    with open_connector(url, **(connector_options or {})) as conn:
        start = versions.stored_pointer(conn, model)
        repo = select(conn, f"{model}/", f"{conn.describe()}/{model}", max_file_bytes=max_file_bytes)
        config = repo.config
        entries = [e for key in repo.weights for e in _keyed(read_header(conn, key), key)]
        ruleset = RuleSet.for_checkpoint(config, rules)
        cuts = plan_cuts([e for e, _ in entries], config, ruleset, max_tp)
        keys = dict(entries)
        objects = sorted(set(keys.values()))
        position = {key: i for i, key in enumerate(objects)}
        sources = {c.entry.name: [position[keys[c.entry]], c.entry.offset] for c in cuts}
        for c in cuts:
            _index_tensor(conn, c, keys[c.entry], digests)
        file_recs = {
            n: mf.FileRecord(object=f"{model}/{n}", nbytes=len(d), **_digests(d, digests))
            for n, d in repo.files.items()
        }
        version = mf.new_version(f"{model}{ruleset.fingerprint()}{[(e.name, e.offset) for e, _ in entries]}")
        manifest = _new_manifest(
            model, version, "inplace", max_tp, digests, ruleset, config, cuts, file_recs, objects=objects,
            sources=sources,
        )
        manifest = _finish(conn, manifest, start)
        where = conn.describe()
    return PublishResult(
        model,
        version,
        where,
        "inplace",
        len(cuts),
        sum(len(c.chunks) for c in cuts),
        manifest.total_bytes,
        time.perf_counter() - started,
        len(manifest.all_objects()),
        files=sorted(repo.files),
        skipped=repo.skipped,
    )


def check_sizes(**values: int) -> None:
    """publish's and index's numeric arguments, each within its range (one error naming it)."""
    high = {"max_tp": MAX_TP, "concurrency": MAX_CONCURRENCY}
    for name, value in values.items():
        check_range(name, value, 1, high.get(name, MAX_PART_BYTES))


def _keyed(entries: list[Entry], key: str) -> list[tuple[Entry, str]]:
    return [(e, key) for e in entries]


def _index_tensor(conn: Connector, cut: Cut, key: str, algos) -> None:
    """Read one tensor of the checkpoint and record its chunks' digests in ``cut``."""
    buf = np.empty(cut.entry.nbytes, dtype=np.uint8)
    if cut.entry.nbytes:
        conn.readinto(key, cut.entry.offset, memoryview(buf))
    cut.start(algos)
    for i, (_, data) in enumerate(_cut_bytes(cut, array_chunks({cut.entry.name: buf}))):
        cut.hashed(i, data, algos)
