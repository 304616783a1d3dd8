"""Test material for auth: nkeys, an operator/account/user JWT chain for creds files, and
a CA with server and client certificates for TLS.

JWTs are made here by hand, as the NATS JWT v2 format defines them: base64url(header) .
base64url(claims) . base64url(ed25519 signature of the first two parts), signed with the
issuer's nkey; ``jti`` is the base32 SHA-512/256-style hash of the claims. The server
checks the chain operator -> account -> user through ``resolver: MEMORY`` with the
account JWTs preloaded.

Certificates come from the ``openssl`` command line (a test that cannot run it fails).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Key:
    """An nkey pair: ``seed`` (``S...``) and ``public`` (``O...``/``A...``/``U...``)."""

    seed: str
    public: str

    @classmethod
    def new(cls, prefix: int) -> Key:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        kp = nkeys.from_seed(bytearray(seed))
        return cls(seed.decode(), kp.public_key.decode())

    def sign(self, data: bytes) -> bytes:
        kp = nkeys.from_seed(bytearray(self.seed.encode()))
        return bytes(kp.sign(data))


def user_key() -> Key:
    return Key.new(nkeys.PREFIX_BYTE_USER)


def encode_jwt(issuer: Key, subject: str, name: str, nats: dict[str, Any]) -> str:
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    digest = hashlib.sha512(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest[:32]).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signing_input = f"{header}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(issuer.sign(signing_input.encode()))}"


UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}
JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


@dataclass
class Operator:
    """An operator with a system account and one JetStream-enabled account ``APP``."""

    key: Key = field(default_factory=lambda: Key.new(nkeys.PREFIX_BYTE_OPERATOR))
    system: Key = field(default_factory=lambda: Key.new(nkeys.PREFIX_BYTE_ACCOUNT))
    account: Key = field(default_factory=lambda: Key.new(nkeys.PREFIX_BYTE_ACCOUNT))

    def server_config(self) -> str:
        """``nats-server`` config lines for operator mode with a MEMORY resolver."""
        op = encode_jwt(
            self.key,
            self.key.public,
            "jsworker-test-operator",
            {"type": "operator", "system_account": self.system.public},
        )
        sys_jwt = encode_jwt(
            self.key, self.system.public, "SYS", {"type": "account", "limits": UNLIMITED}
        )
        app_jwt = encode_jwt(
            self.key,
            self.account.public,
            "APP",
            {"type": "account", "limits": {**UNLIMITED, **JETSTREAM}},
        )
        return (
            f"operator: {op}\n"
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f"  {self.system.public}: {sys_jwt}\n"
            f"  {self.account.public}: {app_jwt}\n"
            "}\n"
        )

    def creds(self, path: Path, name: str = "app-user", *, signer: Key | None = None) -> Path:
        """Write a ``.creds`` file for a new user of ``APP`` (signed by ``signer``,
        default the account key: another key makes credentials the server refuses)."""
        user = user_key()
        user_jwt = encode_jwt(
            signer or self.account,
            user.public,
            name,
            {
                "type": "user",
                "pub": {},
                "sub": {},
                "subs": -1,
                "data": -1,
                "payload": -1,
                "issuer_account": self.account.public,
            },
        )
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{user_jwt}\n"
            "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{user.seed}\n"
            "------END USER NKEY SEED------\n"
        )
        return path


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: verification against it fails


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for ca in ("ca", "other-ca"):
        _openssl(
            "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
            "-days", "2", "-subj", f"/CN=jsworker {ca}", cwd=d,
        )  # fmt: skip
    exts = {
        "server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for who, ext in exts.items():
        (d / f"{who}.ext").write_text(ext)
        _openssl(
            "req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr",
            "-subj", f"/CN=jsworker-{who}", cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext",
            cwd=d,
        )  # fmt: skip
    return Certs(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "other-ca.pem",
    )


def tls_config(certs: Certs, *, verify: bool) -> str:
    """A server ``tls {}`` block; ``verify`` asks clients for a certificate (mutual TLS)."""
    lines = [
        f'cert_file: "{certs.server_cert}"',
        f'key_file: "{certs.server_key}"',
        f'ca_file: "{certs.ca}"',
        "timeout: 5",
    ]
    if verify:
        lines.append("verify: true")
    return "tls {\n  " + "\n  ".join(lines) + "\n}\n"
