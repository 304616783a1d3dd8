"""Secrets out of URLs before they are printed: ``nats://alice:pw@host`` becomes
``nats://alice:***@host`` and ``nats://TOKEN@host`` becomes ``nats://***@host``. Used by
the CLI's banners and errors and by the interactive session's displays."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

REDACTED = "***"


def split_url(url: str) -> SplitResult | None:
    try:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return None
    return parts


def redact_url(url: str) -> str:
    """``url`` without its secret: the password (``user:***@``) or a token (``***@``)."""
    parts = split_url(url)
    if parts is None:
        # not a URL we can take apart: hide everything up to the last '@'
        return f"{REDACTED}@{url.rpartition('@')[2]}" if "@" in url else url
    if not parts.username and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    who = f"{parts.username}:{REDACTED}" if parts.password is not None else REDACTED
    scheme = f"{parts.scheme}://" if "://" in url else ""
    return f"{scheme}{who}@{host}{parts.path}"


def redact_urls(urls: str) -> str:
    """A comma-separated URL list, each URL without its secret."""
    return ",".join(redact_url(u.strip()) for u in urls.split(",") if u.strip())
