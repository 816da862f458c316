"""Config and tokenizer files stored beside the weights: ``pull_files`` writes them to a local directory."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from . import digest
from .connectors import open_connector
from .errors import ConfigError, VerificationError
from .manifest import Manifest, read_manifest


def safe_name(name: str) -> PurePosixPath:
    """Refuse absolute names and names with ``..`` (a store must never write outside ``dest``)."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("~"):
        raise ConfigError(f"refusing file name {name!r} from the manifest: absolute or '..' names are not allowed")
    return path


def pull_files(
    url: str, model: str, dest: str | Path, *, manifest: Manifest | None = None, connector_options: dict | None = None
) -> list[Path]:
    """Write the model's config/tokenizer files into ``dest`` (created), each checked against its digest."""
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
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
            written.append(target)
    return written
