"""Layer 2 (store): ``raydist.json``, the locator ``pull-files`` leaves in an engine's model directory: which store
and which model the directory's weights come from, with no secret in it.

An engine started on the directory with load format ``raydist`` and no options (SGLang's
``update_weights_from_disk(DIR, load_format="raydist")`` passes none) reads its store from here. The password of a
store is never written: the URL loses it, and the file names the environment variable that holds it, if any.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import ConfigError
from ..redact import url_without_secrets

LOCATOR_FILE = "raydist.json"
"""The locator's file name inside the model directory."""


def write_locator(dest: str | Path, url: str, model: str, *, password_env: str | None = None,
                  model_version: str | None = None) -> Path:
    """Write ``dest/raydist.json`` (atomically): the store URL without secrets, the model name, the name of the
    environment variable that holds the store's password (when given) and the version the directory pins (when
    given: an engine started on it, or updated from it, loads that version). Returns its path."""
    body: dict[str, str] = {"url": url_without_secrets(url), "model": model}
    if password_env:
        body["password_env"] = password_env
    if model_version:
        body["model_version"] = model_version
    base = Path(dest)
    base.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=base, prefix=f".{LOCATOR_FILE}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=1)
        f.write("\n")
    target = base / LOCATOR_FILE
    os.replace(tmp, target)
    return target


def read_locator(model_dir: str | Path) -> dict | None:
    """The locator in ``model_dir`` as a dict, or None when the directory has none."""
    path = Path(model_dir) / LOCATOR_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    try:
        body = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): re-run `raydist-loader pull-files` into "
                          f"{model_dir}") from e
    if not isinstance(body, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(body).__name__}: re-run `raydist-loader "
                          f"pull-files` into {model_dir}")
    return body
