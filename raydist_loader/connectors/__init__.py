"""Layer 1 (connectors): Connector registry: URL scheme -> backend class, imported on first use (fsspec-style).

The built-in backends are named in ``_BUILTIN`` as ``module:Class`` strings, so importing the package never imports
boto3 or redis; a missing optional dependency surfaces when its scheme is first used, as a
:class:`MissingDependencyError` naming the extra to install. Each class declares the schemes it serves in
``Connector.schemes``; tests/test_connectors.py checks that the table and those declarations agree. Plug-ins register
through the ``raydist_loader.connectors`` entry-point group (name = scheme, value = ``module:Class``) or, in-process,
with :func:`register_connector`. Lookup order: registered, entry points, built-ins. Whatever a plug-in names must be a
:class:`Connector` subclass, else a :class:`ConfigError` names where it came from.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import EntryPoint, entry_points
from urllib.parse import urlsplit

from ..errors import ConfigError, MissingDependencyError
from ..redact import nested_credentials, redact_url
from .base import Connector, ReadRequest

__all__ = ["Connector", "ReadRequest", "open_connector", "check_url", "register_connector", "known_schemes",
           "scheme_of"]

ENTRY_POINT_GROUP = "raydist_loader.connectors"

# scheme -> ("module:Class", the extra that provides its dependencies); must agree with each class's `schemes`
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "file": ("raydist_loader.connectors.file:FileConnector", None),
    "redis": ("raydist_loader.connectors.redis:RedisConnector", "redis"),
    "rediss": ("raydist_loader.connectors.redis:RedisConnector", "redis"),
    "s3": ("raydist_loader.connectors.s3:S3Connector", "s3"),
}
_registered: dict[str, type[Connector] | str] = {}


def register_connector(scheme: str, target: type[Connector] | str) -> None:
    """Serve ``scheme://`` URLs with ``target`` (a Connector class, or a ``module:Class`` string imported on use)."""
    if not isinstance(target, str):
        target = _checked(target, f"register_connector({scheme!r}, ...)")
    _registered[scheme.lower()] = target


_scanned: tuple[tuple[str, ...], dict[str, EntryPoint]] | None = None


def _entry_points() -> dict[str, EntryPoint]:
    """The plug-ins' entry points, scanned once per ``sys.path`` (a scan reads every installed distribution's
    metadata: measured 40-100 ms on 2 cores, paid by every connector opened before this cache)."""
    global _scanned
    key = tuple(sys.path)
    if _scanned is None or _scanned[0] != key:
        _scanned = (key, {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)})
    return _scanned[1]


def known_schemes() -> list[str]:
    """Every scheme this process can open: built-ins, entry points and registered ones."""
    return sorted(set(_BUILTIN) | set(_entry_points()) | set(_registered))


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased; a path without ``scheme://`` is ``file``."""
    head, sep, _ = url.partition("://")
    return head.lower() if sep else "file"


def _checked(obj: object, origin: str) -> type[Connector]:
    """``obj`` if it is a Connector subclass, else a ConfigError naming ``origin`` (where it was declared)."""
    if isinstance(obj, type) and issubclass(obj, Connector):
        return obj
    raise ConfigError(
        f"{origin} gives {obj!r}, which is not a subclass of raydist_loader.connectors.Connector; "
        "point it at a Connector subclass (see raydist_loader/connectors/base.py)"
    )


def _import(target: str, origin: str, hint: str) -> type[Connector]:
    """Import ``module:Class``; a failed import is a MissingDependencyError ending in ``hint``."""
    module_name, _, attr = target.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as e:
        raise MissingDependencyError(f"{origin} needs a missing dependency ({e.name or e}): {hint}") from None
    except AttributeError as e:
        raise ConfigError(f"{origin}: {target!r} cannot be imported ({e})") from None
    return _checked(obj, origin)


def _entry_point_origin(ep: EntryPoint) -> str:
    dist = f" (from the {ep.dist.name} package)" if ep.dist is not None else ""
    return f"entry point {ep.name!r} = {ep.value!r} in group {ENTRY_POINT_GROUP!r}{dist}"


def connector_class(url: str) -> type[Connector]:
    """The class that serves ``url``, imported on first use."""
    scheme = scheme_of(url)
    if scheme in _registered:
        target = _registered[scheme]
        if isinstance(target, type):
            return target
        origin = f"the {scheme}:// connector registered as {target!r}"
        return _import(target, origin, f"install the package providing {target.partition(':')[0]}")
    eps = _entry_points()
    if scheme in eps:
        ep = eps[scheme]
        dist = ep.dist.name if ep.dist is not None else "the plug-in's package"
        return _import(f"{ep.module}:{ep.attr}", _entry_point_origin(ep), f"reinstall {dist} with its dependencies")
    if scheme in _BUILTIN:
        target, extra = _BUILTIN[scheme]
        hint = f"pip install 'raydist-loader[{extra}]'" if extra else "reinstall raydist-loader"
        return _import(target, f"the {scheme}:// connector", hint)
    raise ConfigError(
        f"unknown store scheme {scheme!r} in {redact_url(url)!r}; known schemes: {', '.join(known_schemes())} "
        f"(a bare path means file://; plug-ins register through the {ENTRY_POINT_GROUP!r} entry points)"
    )


def check_url(url: str) -> str:
    """Refuse, in one line, a store URL that cannot be parsed (a bad host, port or IPv6 bracket) and one whose
    options carry credentials (an S3 ``endpoint_url=http://key:secret@host``): before any connection is made."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"a store URL is a non-empty string, got {url!r}")
    if "\x00" in url:
        raise ConfigError(f"bad store URL {redact_url(url)!r}: it contains a NUL character")
    if "://" in url:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - parses the port: a bad one raises here, not deep inside a backend
        except ValueError as e:
            raise ConfigError(
                f"bad store URL {redact_url(url)!r}: {e} (expected e.g. redis://host:6379/0, s3://bucket/prefix, "
                "file:///dir)"
            ) from None
    key = nested_credentials(url)
    if key:
        raise ConfigError(
            f"store URL {redact_url(url)!r}: option {key} carries credentials (user:password@): remove them; an S3 "
            "endpoint takes its keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile"
        )
    return url


def open_connector(url: str, **options: object) -> Connector:
    """Open the connector for ``url`` (checked first: :func:`check_url`); ``options`` go to the backend (e.g.
    ``password=`` for Redis)."""
    return connector_class(check_url(url))(url, **options)
