"""Layer 2 (store): Config and tokenizer files stored beside the weights: ``pull_files`` writes them to a local
directory, and the locator ``raydist.json`` (:mod:`.locator`) that tells an engine which store the weights are in."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath

from .. import digest
from ..connectors import open_connector
from ..errors import ConfigError, VerificationError
from .locator import write_locator
from .manifest import Manifest, is_safe_file_name, read_manifest


def safe_name(name: str) -> PurePosixPath:
    """Refuse absolute names and names with ``..`` (a store must never write outside ``dest``)."""
    if not is_safe_file_name(name):
        raise ConfigError(f"refusing file name {name!r} from the manifest: absolute or '..' names are not allowed")
    return PurePosixPath(name)


def pull_files(
    url: str,
    model: str,
    dest: str | Path,
    *,
    manifest: Manifest | None = None,
    connector_options: dict | None = None,
    password_env: str | None = None,
) -> list[Path]:
    """Write the model's config/tokenizer files into ``dest`` (created), each checked against its digest, then the
    locator ``raydist.json`` (the URL without secrets, the model, ``password_env`` when given: the name of the
    environment variable that holds the store's password). Returns the model's files written (not the locator)."""
    base = Path(dest).resolve()
    written = []
    with open_connector(url, **(connector_options or {})) as conn:
        manifest = manifest or read_manifest(conn, model)
        targets = {name: base / safe_name(name) for name in manifest.files}  # check every name before writing
        for name, rec in manifest.files.items():
            data = conn.read(rec.object)
            if digest.xxh3(data) != rec.xxh3:
                raise VerificationError(f"file {name} ({rec.object}) does not match its digest: re-publish the model")
            target = targets[name]
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.parent.resolve().is_relative_to(base):  # a symlinked directory inside dest
                raise ConfigError(f"refusing to write {name!r}: {target.parent} leads outside {base}")
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)  # atomic: a reader never sees half a file, concurrent pulls never collide
            written.append(target)
    write_locator(base, url, model, password_env=password_env)
    return written
