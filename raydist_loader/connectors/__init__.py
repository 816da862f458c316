"""Connector registry: URL scheme -> backend class, imported lazily (fsspec-style).

Built-in schemes are listed in ``_BUILTIN``; plug-ins register through the ``raydist_loader.connectors`` entry-point
group (name = scheme, value = ``module:Class``) or, in-process, with :func:`register_connector`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..errors import ConfigError, MissingDependencyError
from ..redact import redact_url
from .base import Connector, ReadRequest

__all__ = ["Connector", "ReadRequest", "open_connector", "register_connector", "known_schemes", "scheme_of"]

# scheme -> ("module:Class", extra that provides its dependencies)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "file": ("raydist_loader.connectors.file:FileConnector", None),
    "redis": ("raydist_loader.connectors.redis:RedisConnector", "redis"),
    "rediss": ("raydist_loader.connectors.redis:RedisConnector", "redis"),
    "s3": ("raydist_loader.connectors.s3:S3Connector", "s3"),
}
_registered: dict[str, type[Connector] | str] = {}


def register_connector(scheme: str, target: type[Connector] | str) -> None:
    """Serve ``scheme://`` URLs with ``target`` (a Connector class or a ``module:Class`` string)."""
    _registered[scheme.lower()] = target


def _entry_points() -> dict[str, str]:
    return {ep.name.lower(): ep.value for ep in entry_points(group="raydist_loader.connectors")}


def known_schemes() -> list[str]:
    """Every scheme this process can open: built-ins, entry points and registered ones."""
    return sorted(set(_BUILTIN) | set(_entry_points()) | set(_registered))


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased; a path without ``scheme://`` is ``file``."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else "file"


def _load(target: str, scheme: str, extra: str | None) -> type[Connector]:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = f"pip install 'raydist-loader[{extra}]'" if extra else f"install the package providing {module_name}"
        raise MissingDependencyError(
            f"the {scheme}:// connector needs a missing dependency ({e.name or e}): {hint}"
        ) from None
    return getattr(module, attr)


def connector_class(url: str) -> type[Connector]:
    """The class that serves ``url``, imported on first use."""
    scheme = scheme_of(url)
    if scheme in _registered:
        target = _registered[scheme]
        return target if isinstance(target, type) else _load(target, scheme, None)
    eps = _entry_points()
    if scheme in eps:
        return _load(eps[scheme], scheme, None)
    if scheme in _BUILTIN:
        return _load(*_BUILTIN[scheme][:1], scheme, _BUILTIN[scheme][1])
    raise ConfigError(
        f"unknown store scheme {scheme!r} in {redact_url(url)!r}; known schemes: {', '.join(known_schemes())} "
        "(a bare path means file://; plug-ins register through the 'raydist_loader.connectors' entry points)"
    )


def open_connector(url: str, **options: object) -> Connector:
    """Open the connector for ``url``; ``options`` go to the backend (e.g. ``password=`` for Redis)."""
    return connector_class(url)(url, **options)
