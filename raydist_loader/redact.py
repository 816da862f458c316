"""Layer 0 (base): Keep secrets out of everything printed, logged or reported."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

# a query parameter whose name looks secret: stops at '&' and whitespace so free text around it survives
_SECRET_QUERY = re.compile(r"(?i)(\b[\w-]*(?:password|secret|token|key|signature|credential)[\w-]*=)[^&\s]*")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@/\s]*)@")


def redact_url(url: str) -> str:
    """Return ``url`` with any password and secret-looking query values replaced by ``***``.

    ``redis://user:pw@host:6379/0`` -> ``redis://user:***@host:6379/0``. Works on text that is not a URL too.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if not parts.scheme or not parts.netloc:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{userinfo}@{host}"
    query = _SECRET_QUERY.sub(r"\1***", _redact_nested(parts.query))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_without_secrets(url: str) -> str:
    """``url`` with its password and secret-looking query parameters removed (not masked), for a URL that is
    stored and used again: ``redis://u:pw@h:6379/0?password=x`` -> ``redis://u@h:6379/0``. Paths pass through."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{host}" if user else host
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = urlencode([(k, v) for k, v in pairs if not _SECRET_QUERY.fullmatch(f"{k}=")])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def url_password(url: str) -> str | None:
    """The password inline in ``url`` (``scheme://user:pw@host``), or None."""
    if "://" not in url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Redact URL passwords inside free text, and any of the given secret strings."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    text = _SECRET_QUERY.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _has_userinfo(value: str) -> bool:
    """Whether ``value`` (decoded) is a URL that carries ``user:password@`` (or ``user@``) before its host."""
    return "://" in value and "@" in value.split("://", 1)[1].split("/", 1)[0]


def _redact_nested(query: str) -> str:
    """``query`` with the credentials of every option value that is itself a URL carrying them replaced by ``***``
    (``endpoint_url=http://ak:sk@host`` -> ``endpoint_url=http://***@host``), percent-encoded or not."""
    parts = []
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        decoded = unquote_plus(value)
        if sep and _has_userinfo(decoded):
            scheme, rest = decoded.split("://", 1)
            netloc, slash, path = rest.partition("/")
            item = f"{key}={scheme}://***@{netloc.rsplit('@', 1)[1]}{slash}{path}"
        parts.append(item)
    return "&".join(parts)


def nested_credentials(url: str) -> str | None:
    """The query option of ``url`` whose value is a URL carrying credentials (``s3://b/p?endpoint_url=http://ak:sk@h``),
    or None. boto3 and the like take such credentials from the environment or a profile; inside a URL they would
    travel wherever the URL does (command lines, ``ray job list``, configs)."""
    try:
        query = urlsplit(url).query
    except ValueError:
        return None
    for key, value in parse_qsl(query, keep_blank_values=True):
        if _has_userinfo(value):
            return key
    return None
