"""Every NATS auth method, each against a real nats-server configured for it, through the
CLI as an operator runs it (subprocesses): user/password (options and URL), token, an
nkey seed file, a creds file (operator/account/user JWTs, MEMORY resolver), TLS with a
CA, and mutual TLS. Each has its refusal case: one line on stderr, exit 1, no secret."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nats
import pytest
from authkit import Certs, Operator, make_certs, tls_config, user_key

import jsworker
from jsworker import EmbeddedServer


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jsworker.cli", *args],
        capture_output=True,
        text=True,
        env={"NATS_URL": "", **(env or os.environ), "COLUMNS": "200", "NO_COLOR": "1"},
        timeout=60,
        check=False,
    )


async def acli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, *args, env=env)


def one_line_error(p: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, one line on stderr starting with 'Error:', no traceback; the line."""
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("Error: "), p.stderr
    assert "Traceback" not in p.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


async def works(*auth: str) -> None:
    """Provision and submit through the CLI with these connection options."""
    p = await acli(*auth, "kv", "setup", "--json")
    assert p.returncode == 0, p.stderr
    assert {r["status"] for r in json.loads(p.stdout)} <= {"created", "exists"}
    p = await acli(*auth, "task", "submit", "auth-check", '{"n": 1}', "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["subject"].startswith("task.auth-check.")
    p = await acli(*auth, "workers", "--json")
    assert p.returncode == 0 and json.loads(p.stdout) == [], p.stderr
    # asyncio's "returning true from eof_received() has no effect when using ssl"
    assert p.stderr == "", p.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def test_user_and_password_as_options_and_in_the_url() -> None:
    async with EmbeddedServer(user="alice", password="pa55-w0rd") as srv:
        await works("--url", srv.url, "--user", "alice", "--password", "pa55-w0rd")
        await works("--url", f"nats://alice:pa55-w0rd@127.0.0.1:{srv.port}")
        env = {**os.environ, "JSWORKER_USER": "alice", "JSWORKER_PASSWORD": "pa55-w0rd"}
        p = await acli("--url", srv.url, "workers", "--json", env=env)
        assert p.returncode == 0, p.stderr

        p = await acli("--url", srv.url, "--user", "alice", "--password", "nope", "workers")
        line = one_line_error(p, "refused the credentials")
        assert "nope" not in line
        p = await acli("--url", f"nats://alice:nope-pw@127.0.0.1:{srv.port}", "workers")
        line = one_line_error(p, "refused the credentials", "alice:***@")
        assert "nope-pw" not in line


async def test_token() -> None:
    async with EmbeddedServer(token="t0ken-s3cret") as srv:
        await works("--url", srv.url, "--token", "t0ken-s3cret")
        await works("--url", f"nats://t0ken-s3cret@127.0.0.1:{srv.port}")
        env = {**os.environ, "JSWORKER_TOKEN": "t0ken-s3cret"}
        assert (await acli("--url", srv.url, "workers", env=env)).returncode == 0
        p = await acli("--url", srv.url, "--token", "wr0ng-t0ken", "workers")
        assert "wr0ng-t0ken" not in one_line_error(p, "refused the credentials")


async def test_nkey_seed_file(tmp_path: Path) -> None:
    alice, mallory = user_key(), user_key()
    (tmp_path / "alice.nk").write_text(alice.seed + "\n")
    (tmp_path / "mallory.nk").write_text(mallory.seed)
    (tmp_path / "garbage.nk").write_text("SUNOTASEED\n")
    conf = f"authorization {{ users: [ {{ nkey: {alice.public} }} ] }}"
    async with EmbeddedServer(extra_config=conf) as srv:
        await works("--url", srv.url, "--nkey", str(tmp_path / "alice.nk"))
        # the library path too: a Worker on an nkey connection serves a task
        nc = await nats.connect(srv.url, nkeys_seed=str(tmp_path / "alice.nk"))
        try:
            w = jsworker.Worker(nc)
            w.handle("nkey-echo", lambda ctx: ctx.json())
            async with w:
                h = await jsworker.Client(nc).submit("nkey-echo", {"via": "nkey"})
                assert await h.result(timeout=20) == {"via": "nkey"}
        finally:
            await nc.close()

        p = await acli("--url", srv.url, "--nkey", str(tmp_path / "mallory.nk"), "workers")
        assert mallory.seed not in one_line_error(p, "refused the credentials")
        p = await acli("--url", srv.url, "--nkey", str(tmp_path / "garbage.nk"), "workers")
        one_line_error(p, "does not hold a valid NATS nkey seed")
        p = await acli("--url", srv.url, "--nkey", str(tmp_path), "workers")
        assert p.returncode == 2 and "is a directory" in p.stderr  # click's usage error


CREDS_APP = textwrap.dedent(
    """
    import jsworker

    def make_worker(nc):
        w = jsworker.Worker(nc, grace_period=2)
        w.handle("creds-echo", lambda ctx: {"echo": ctx.json()})
        return w
    """
)


async def test_creds_file_operator_mode(tmp_path: Path) -> None:
    op = Operator()
    good = op.creds(tmp_path / "app.creds")
    forged = op.creds(tmp_path / "forged.creds", signer=user_key())  # not the account's key
    async with EmbeddedServer(extra_config=op.server_config()) as srv:
        # a plain connection has no account in operator mode
        p = await acli("--url", srv.url, "workers")
        one_line_error(p, "refused the credentials")
        await works("--url", srv.url, "--creds", str(good))

        # `jsworker serve` with the creds serves a task submitted with the same creds
        (tmp_path / "creds_app.py").write_text(CREDS_APP)
        env = {**os.environ, "NATS_URL": srv.url, "JSWORKER_CREDS": str(good)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jsworker.cli", "serve", "creds_app:make_worker",
            "--app-dir", str(tmp_path), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            p = await acli("task", "submit", "creds-echo", '{"a": 1}', "--wait", "--json", env=env)
            assert p.returncode == 0, p.stderr
            assert json.loads(p.stdout)["output"] == {"echo": {"a": 1}}
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        assert "serving creds-echo on " in out.decode() and "Traceback" not in err.decode()

        p = await acli("--url", srv.url, "--creds", str(forged), "workers")
        one_line_error(p, "refused the credentials")
        # a file that is not a creds file: nats-py would loop forever on it
        (tmp_path / "not.creds").write_text("hello\n")
        p = await acli("--url", srv.url, "--creds", str(tmp_path / "not.creds"), "workers")
        one_line_error(p, "has no BEGIN NATS USER JWT block")
        bad_seed = good.read_text().replace("-----BEGIN USER NKEY SEED-----\nSU", "x\nSU")
        (tmp_path / "bad-seed.creds").write_text(bad_seed)
        p = await acli("--url", srv.url, "--creds", str(tmp_path / "bad-seed.creds"), "workers")
        one_line_error(p, "has no BEGIN USER NKEY SEED block")
        (tmp_path / "binary.creds").write_bytes(b"\xff\xfe\x00")
        p = await acli("--url", srv.url, "--creds", str(tmp_path / "binary.creds"), "workers")
        one_line_error(p, "is not a text file")


async def test_tls_with_a_ca(certs: Certs) -> None:
    async with EmbeddedServer(extra_config=tls_config(certs, verify=False)) as srv:
        await works("--url", f"tls://127.0.0.1:{srv.port}", "--tls-ca", str(certs.ca))
        await works("--url", srv.url, "--tls-ca", str(certs.ca))  # nats:// upgraded to TLS
        p = await acli("--url", srv.url, "--tls-ca", str(certs.other_ca), "workers")
        one_line_error(p, "did not verify", "--tls-ca")


async def test_mutual_tls(certs: Certs) -> None:
    async with EmbeddedServer(extra_config=tls_config(certs, verify=True)) as srv:
        mtls = ("--tls-ca", str(certs.ca), "--tls-cert", str(certs.client_cert))
        await works("--url", srv.url, *mtls, "--tls-key", str(certs.client_key))
        # TLS 1.3: the server's refusal races the client's first write, so the client
        # sees a hang-up or the server's "certificate required" alert; both name the fix
        for _ in range(3):
            p = await acli("--url", srv.url, "--tls-ca", str(certs.ca), "workers")
            one_line_error(p, "--tls-cert and --tls-key")
        p = await acli("--url", srv.url, *mtls, "--tls-key", str(certs.server_cert), "workers")
        one_line_error(p, "cannot load the TLS files")


async def test_tls_without_tls_options_says_so(certs: Certs) -> None:
    async with EmbeddedServer(extra_config=tls_config(certs, verify=False)) as srv:
        p = await acli("--url", srv.url, "workers")
        assert p.returncode == 1, p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
