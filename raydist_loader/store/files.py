"""Layer 2 (store): Config and tokenizer files stored beside the weights: ``pull_files`` writes them to a local
directory, confined and whole, and the locator ``raydist.json`` (:mod:`.locator`) that tells an engine
which store the weights are in.

A store may be damaged or hostile, so a pull never leaves the destination and never leaves it half-written: every
name is checked first (the manifest's rules: relative, no ``..``, NUL or control characters, parts of at most 255
bytes, no file that is also a directory of another); the destination is resolved once; every file is fetched in
bounded blocks and checked against its digests into a temporary directory beside the destination; only when all
match are they moved in, each by one ``rename``, through directory descriptors opened without following symlinks
(a symlink inside the destination is refused, never followed, and no directory is created outside it).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import ExitStack
from pathlib import Path, PurePosixPath

from ..connectors import Connector, open_connector
from ..digest import ChunkHash
from ..errors import ConfigError, RaydistError, VerificationError
from .locator import write_locator
from .manifest import FileRecord, Manifest, file_name_clash, is_safe_file_name
from .versions import read_manifest

_BLOCK = 16 << 20  # a file is read, hashed and written in blocks of this size: memory stays bounded
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def safe_name(name: str) -> PurePosixPath:
    """Refuse absolute names, ``..``, NUL and control characters, and over-long parts (a store must never write
    outside ``dest``)."""
    if not is_safe_file_name(name):
        raise ConfigError(
            f"refusing file name {name!r} from the manifest: absolute, '..', empty, NUL or control characters, or "
            "a part over 255 bytes are not allowed"
        )
    return PurePosixPath(name)


def pull_files(
    url: str,
    model: str,
    dest: str | Path,
    *,
    manifest: Manifest | None = None,
    connector_options: dict | None = None,
    password_env: str | None = None,
    model_version: str | None = None,
) -> list[Path]:
    """Write the model's config/tokenizer files into ``dest`` (created), each checked against its digest; either all
    of them land or none does. Then the locator ``raydist.json`` (the URL without secrets, the model,
    ``password_env`` when given: the name of the environment variable that holds the store's password). Returns the
    model's files written (not the locator). ``model_version``: that version's files, and the locator pins it (an
    engine started on ``dest``, or updated from it, loads that version)."""
    base = Path(dest).resolve()  # resolved once: everything below goes through descriptors of this directory
    with open_connector(url, **(connector_options or {})) as conn:
        manifest = manifest or read_manifest(conn, model, model_version)
        names = {name: safe_name(name) for name in manifest.files}  # every name checked before anything is written
        clash = file_name_clash(names)
        if clash:
            raise ConfigError(f"refusing files {clash[0]!r} and {clash[1]!r}: one would be a directory of the other")
        if base.exists() and not base.is_dir():
            raise ConfigError(f"pull-files destination {str(base)!r} exists and is not a directory")
        staging = _staging(base)
        try:
            for name, rec in manifest.files.items():
                _fetch(conn, name, rec, staging / names[name])
            base.mkdir(exist_ok=True)
            written = _move_in(staging, base, names)
            write_locator(base, url, model, password_env=password_env, model_version=model_version)
            return written
        except RaydistError:  # the store's errors (some are OSErrors) as they are
            raise
        except OSError as e:  # disk full, permissions: one line
            raise ConfigError(f"pull-files into {str(base)!r}: {e.strerror or e}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _staging(base: Path) -> Path:
    """A fresh temporary directory beside ``base`` (same file system: the final moves are renames), or hidden
    inside ``base`` (then created) when its parent cannot be written."""
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base.parent, prefix=f".{base.name}.pull-"))
    except OSError:
        pass
    try:
        base.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base, prefix=f".{base.name}.pull-"))
    except OSError as e:
        raise ConfigError(f"pull-files cannot write into {str(base)!r}: {e.strerror or e}") from None


def _fetch(conn: Connector, name: str, rec: FileRecord, path: Path) -> None:
    """Copy one file's object into ``path`` (in the staging directory) block by block, checking its size first and
    its digests at the end."""
    size = conn.stat(rec.object)
    if size != rec.nbytes:
        got = "it is missing" if size is None else f"it holds {size}"
        raise VerificationError(
            f"file {name} ({rec.object}) should hold {rec.nbytes} bytes but {got}: re-publish the model",
            [{"file": name, "error": f"size {size} != expected {rec.nbytes}"}],
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = ChunkHash(rec.xxh3, rec.blake3)
    buf = bytearray(min(_BLOCK, rec.nbytes))
    with open(path, "wb") as f:
        for offset in range(0, rec.nbytes, _BLOCK):
            view = memoryview(buf)[: min(_BLOCK, rec.nbytes - offset)]
            conn.readinto(rec.object, offset, view)
            digest.update(view)
            f.write(view)
    got = digest.hexdigest()
    if got != rec.xxh3:
        raise VerificationError(
            f"file {name} ({rec.object}) does not match its digest: re-publish the model; nothing was written",
            [{"file": name, "expected": rec.xxh3, "got": got}],
        )


def _move_in(staging: Path, base: Path, names: dict[str, PurePosixPath]) -> list[Path]:
    """Rename every staged file into ``base``. Each target's directories are opened (created when missing) one
    part at a time without following symlinks, and every target is checked before the first rename."""
    with ExitStack() as fds:
        root = os.open(base, _DIR_FLAGS)
        fds.callback(os.close, root)
        dirs: dict[PurePosixPath, int] = {PurePosixPath("."): root}

        def directory(rel: PurePosixPath) -> int:
            if rel not in dirs:
                parent = directory(rel.parent)
                try:
                    os.mkdir(rel.name, 0o777, dir_fd=parent)
                except FileExistsError:
                    pass
                try:
                    fd = os.open(rel.name, _DIR_FLAGS, dir_fd=parent)
                except OSError as e:
                    why = _why_not_a_directory(rel.name, parent, e)
                    raise ConfigError(
                        f"refusing to write into {str(base / rel)!r}: it {why}; pull-files never follows links or "
                        "leaves the destination (remove it, or pull into an empty directory)"
                    ) from None
                fds.callback(os.close, fd)
                dirs[rel] = fd
            return dirs[rel]

        moves = []
        for name, rel in names.items():
            parent = directory(rel.parent)
            try:
                if stat.S_ISDIR(os.stat(rel.name, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise ConfigError(f"refusing to write {name!r}: {str(base / rel)!r} is a directory")
            except FileNotFoundError:
                pass
            moves.append((staging / rel, parent, rel))
        for src, parent, rel in moves:  # a rename replaces a file (or a symlink itself), never follows one
            try:
                os.replace(src, rel.name, dst_dir_fd=parent)
            except OSError as e:
                raise ConfigError(f"cannot move {rel} into {str(base)!r}: {e.strerror or e}") from None
    return [base / rel for _, _, rel in moves]


def _why_not_a_directory(name: str, parent: int, error: OSError) -> str:
    """Why ``name`` (in the directory open as ``parent``) cannot be entered: a symlink, a file, or the OS's word."""
    try:
        mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
    except OSError:
        return error.strerror or str(error)
    if stat.S_ISLNK(mode):
        return "is a symlink"
    return "is not a directory" if not stat.S_ISDIR(mode) else (error.strerror or str(error))
