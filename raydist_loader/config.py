"""Layer 5 (entry points): Deployment configs: YAML -> validated :class:`LoadConfig` (``raydist-loader load --config
FILE``).

Every problem is a :class:`~raydist_loader.errors.ConfigError` that names the file (and line, when known), the
dotted path of the bad key (``load.tp``, ``store.url``), what was received and what is expected. Secrets never
live in a config: the store's password is named by ``store.password_env`` (an environment variable) or
``store.password_file`` and resolved only by :func:`resolve_secret`; a URL with an inline password is refused.

Relative ``load.rules`` and ``store.password_file`` paths are taken relative to the config file's directory;
``report`` (an output) is taken relative to the working directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .options import MAX_TP, LoadOptions, RetriesOptions
from .validation import format_validation_error

__all__ = ["StoreConfig", "RetriesSection", "LoadSection", "LoadConfig", "load_config", "resolve_secret"]

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StoreConfig(_Model):
    """Where the model lives, and how to authenticate (by reference only: env var or file)."""

    url: str = Field(min_length=1)
    password_env: str | None = None
    password_file: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        from .connectors import known_schemes, scheme_of

        try:
            parts = urlsplit(url)
            has_password = "://" in url and parts.password is not None
        except ValueError as e:
            raise ValueError(f"not a valid URL ({e})") from None
        from .connectors import check_url

        check_url(url)  # a bad port or IPv6 bracket, credentials in an option such as endpoint_url
        if has_password:
            raise ValueError(
                "the URL carries an inline password, which `ray job list`, the dashboard and logs show; "
                "remove it from the URL and set store.password_env (an environment variable's name) or "
                "store.password_file instead"
            )
        scheme = scheme_of(url)
        if scheme not in known_schemes():
            raise ValueError(f"unknown store scheme {scheme!r}; known schemes: {', '.join(known_schemes())}")
        return url

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not _ENV_NAME.match(name):
            raise ValueError(
                "expected the NAME of an environment variable (letters, digits, '_'), not its value"
            )
        return name

    @field_validator("options")
    @classmethod
    def _no_password_option(cls, options: dict[str, Any]) -> dict[str, Any]:
        for key in options:
            if key.lower() in {"password", "passwd", "secret", "token", "aws_secret_access_key"}:
                raise ValueError(
                    f"store.options.{key} would put a secret in the config file; use store.password_env or "
                    "store.password_file"
                )
        return options

    @model_validator(mode="after")
    def _one_secret_source(self) -> StoreConfig:
        if self.password_env and self.password_file:
            raise ValueError("store.password_env and store.password_file are mutually exclusive: give one")
        return self


RetriesSection = RetriesOptions  # ``load.retries``


class LoadSection(LoadOptions):
    """``load:``: every knob of :class:`~raydist_loader.options.LoadOptions` (same names, defaults and checks),
    plus the tensor-parallel size and what this deployment pins."""

    tp: int = Field(strict=True, ge=1, le=MAX_TP)
    rules: str | None = None
    expect_manifest_sha256: str | None = None
    ray_address: str | None = None

    @field_validator("expect_manifest_sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.match(value):
            raise ValueError("expected 64 hex digits (`raydist-loader inspect` / manifest_sha256() print it)")
        return value.lower() if value else value

    def options(self) -> LoadOptions:
        """The load options alone (without tp and the pins)."""
        return LoadOptions.model_validate(self.model_dump(include=set(LoadOptions.model_fields)))


class LoadConfig(_Model):
    """A whole deployment config (see ``configs/*.yaml``)."""

    model: str = Field(min_length=1)
    store: StoreConfig
    load: LoadSection
    report: str | None = None
    hold: bool = Field(default=False, strict=True)
    _source: str | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        """The file this config was read from (None when it came from a dict)."""
        return self._source

    @field_validator("model")
    @classmethod
    def _model_name(cls, model: str) -> str:
        from .store.manifest import check_model_name

        return check_model_name(model)  # its ManifestError is a ValueError: pydantic reports it at `model`


# ------------------------------------------------------------------------------------------ loading
def load_config(source: str | os.PathLike | Mapping[str, Any]) -> LoadConfig:
    """Read and validate a deployment config from a YAML file path or an already-parsed mapping."""
    if isinstance(source, Mapping):
        doc, where, root = dict(source), "config", None
        base_dir = None
    else:
        path = Path(source)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {where} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {where}: {e.strerror or e}") from None
        doc, root = _parse(text, where)
        base_dir = path.resolve().parent
    if doc is None:
        raise ConfigError(f"{where}: the config is empty; expected a mapping with keys model, store, load")
    if not isinstance(doc, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping with keys model, store, load at the top level, "
            f"got {type(doc).__name__}"
        )
    try:
        config = LoadConfig.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(format_validation_error(where, e, LoadConfig, root)) from None
    if base_dir is not None:
        if config.load.rules and not Path(config.load.rules).expanduser().is_absolute():
            config.load.rules = str(base_dir / config.load.rules)
        if config.store.password_file and not Path(config.store.password_file).expanduser().is_absolute():
            config.store.password_file = str(base_dir / config.store.password_file)
    config._source = where if base_dir is not None else None
    return config


def resolve_secret(store: StoreConfig) -> dict[str, Any]:
    """The connector options for ``store``: its ``options`` plus ``password`` read from the env var or file.

    A missing variable or file is a :class:`ConfigError` naming the variable (or path), never a value.
    """
    options = dict(store.options)
    if store.password_env:
        value = os.environ.get(store.password_env)
        if value is None:
            raise ConfigError(
                f"store.password_env: environment variable {store.password_env} is not set; export it with "
                "the store's password (read on the driver, never put in a job entrypoint or runtime_env)"
            )
        if value == "":
            raise ConfigError(
                f"store.password_env: environment variable {store.password_env} is set but empty"
            )
        options["password"] = value
    elif store.password_file:
        path = Path(store.password_file).expanduser()
        try:
            value = path.read_text(encoding="utf-8").rstrip("\r\n")
        except FileNotFoundError:
            raise ConfigError(f"store.password_file: {path} does not exist") from None
        except OSError as e:
            raise ConfigError(f"store.password_file: cannot read {path}: {e.strerror or e}") from None
        if not value:
            raise ConfigError(f"store.password_file: {path} is empty")
        options["password"] = value
    return options


# ------------------------------------------------------------------------------------------ error messages
def _parse(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "syntax error"
        raise ConfigError(f"{where}:{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    return doc, root
