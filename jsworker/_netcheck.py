"""What is wrong with a NATS URL that did not connect: a scheme NATS does not speak, a
host name that does not resolve, or a server that is not there. One sentence each,
shared by the CLI and the interactive mode."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from ._redact import redact_urls

HINT = "is it running? set --url or NATS_URL; `jsworker dev` starts one"
SCHEMES = ("nats", "tls", "ws", "wss")  # what nats-py connects with
_WEB = {"http": "nats", "https": "tls"}


def scheme_problem(servers: list[str]) -> str | None:
    """A server URL whose scheme nats-py cannot speak (``http://``), as one sentence
    naming the scheme to use; None when every URL's scheme is fine (or has none:
    nats-py then assumes ``nats://``)."""
    for url in servers:
        if "://" not in url:
            continue
        scheme = url.split("://", 1)[0].lower()
        if scheme in SCHEMES:
            continue
        shown = redact_urls(url)
        fix = _WEB.get(scheme)
        hostport = url.split("://", 1)[1].split("/", 1)[0]
        better = (
            f": use {fix}://{hostport}"
            if fix
            else f"; NATS URLs start with {', '.join(s + '://' for s in SCHEMES)}"
        )
        if hostport.endswith(":8222"):
            better += " with the client port (4222 by default; 8222 is the monitoring port)"
        return f"{shown} is not a NATS URL ({scheme}:// is not a NATS scheme){better}"
    return None


def unresolvable_hosts(servers: list[str]) -> list[str]:
    """The host names among ``servers`` that the resolver does not know."""
    bad: list[str] = []
    for url in servers:
        try:
            host = urlsplit(url if "://" in url else f"nats://{url}").hostname
        except ValueError:
            continue
        if not host or host in bad:
            continue
        try:
            socket.getaddrinfo(host, None)
        except (socket.gaierror, UnicodeError):
            bad.append(host)
    return bad


def unreachable(url: str, servers: list[str], hint: str) -> str:
    """Why none of ``servers`` answered: hosts that do not resolve are named; else the
    server is not there (``hint`` says what to do)."""
    bad = unresolvable_hosts(servers)
    if bad and len(bad) == len(servers):
        names = ", ".join(repr(h) for h in bad)
        return (
            f"cannot reach a NATS server at {redact_urls(url)}: the host name {names} does "
            "not resolve (a typo? or use an IP address)"
        )
    return f"cannot reach a NATS server at {redact_urls(url)} ({hint})"
