"""Where nats-server spends its CPU during a drain: a Go CPU profile, read without Go.

    python bench/server_profile.py [--contender jsworker|raw] [--procs 2] [--partitions 8]
                                   [--keys K] [--tasks 40000] [--top 25] [--out FILE]

Starts its own ``nats-server -js --profile PORT`` (free loopback ports, temp store),
provisions it with ``jsworker.setup_all``, pre-publishes the tasks, and runs one drain of
``bench/suite.py`` (the same contender processes). While the contenders drain, it takes
a CPU profile from the server's ``/debug/pprof/profile`` endpoint, then prints the
functions with the most samples, flat (the function itself) and cumulative (with what
it calls). ``--out`` keeps the raw profile (gzipped protobuf) for ``go tool pprof``.

This is how the partitioned drain's cost was found: with every task its own key, half
of the server's CPU is in ``fileStore.LoadNextMsgMulti`` ->
``msgBlock.firstMatchingMulti`` -> ``stree.IntersectGSL`` (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats

import jsworker
from jsworker._server import find_nats_server, free_port

sys.path.insert(0, str(Path(__file__).parent))
import suite

# --------------------------------------------------------------- a pprof reader
# profile.proto: Profile{sample=2, location=4, function=5, string_table=6};
# Sample{location_id=1, value=2}; Location{id=1, line=4}; Line{function_id=1};
# Function{id=1, name=2}.


def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = s = 0
    while True:
        x = b[i]
        i += 1
        r |= (x & 0x7F) << s
        s += 7
        if x < 0x80:
            return r, i


def _fields(b: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        f, wire = key >> 3, key & 7
        v: int | bytes
        if wire == 0:
            v, i = _varint(b, i)
        elif wire == 2:
            n, i = _varint(b, i)
            v, i = b[i : i + n], i + n
        elif wire == 1:
            v, i = b[i : i + 8], i + 8
        elif wire == 5:
            v, i = b[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield f, wire, v


def _ints(v: int | bytes) -> list[int]:
    if isinstance(v, int):
        return [v]
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(x)
    return out


def top_functions(profile: bytes) -> tuple[float, list[tuple[str, float]], list[tuple[str, float]]]:
    """(sampled CPU seconds, [(function, flat share)], [(function, cumulative share)])."""
    data = gzip.decompress(profile)
    samples: list[tuple[list[int], int]] = []
    locations: dict[int, list[int]] = {}
    functions: dict[int, int] = {}
    strings: list[str] = []
    for f, _, v in _fields(data):
        if f == 2 and isinstance(v, bytes):
            ids: list[int] = []
            values: list[int] = []
            for f2, _, v2 in _fields(v):
                if f2 == 1:
                    ids += _ints(v2)
                elif f2 == 2:
                    values += _ints(v2)
            samples.append((ids, values[-1] if values else 0))
        elif f == 4 and isinstance(v, bytes):
            lid, funcs = 0, []
            for f2, _, v2 in _fields(v):
                if f2 == 1 and isinstance(v2, int):
                    lid = v2
                elif f2 == 4 and isinstance(v2, bytes):
                    funcs += [x for f3, _, x in _fields(v2) if f3 == 1 and isinstance(x, int)]
            locations[lid] = funcs
        elif f == 5 and isinstance(v, bytes):
            fid = name = 0
            for f2, _, v2 in _fields(v):
                if f2 == 1 and isinstance(v2, int):
                    fid = v2
                elif f2 == 2 and isinstance(v2, int):
                    name = v2
            functions[fid] = name
        elif f == 6 and isinstance(v, bytes):
            strings.append(v.decode())
    flat: collections.Counter[str] = collections.Counter()
    cum: collections.Counter[str] = collections.Counter()
    total = 0
    for ids, weight in samples:
        total += weight
        names = [strings[functions[fid]] for loc in ids for fid in locations.get(loc, [])]
        if names:
            flat[names[0]] += weight
        for name in set(names):
            cum[name] += weight
    t = total or 1
    return (
        total / 1e9,
        [(n, w / t) for n, w in flat.most_common()],
        [(n, w / t) for n, w in cum.most_common()],
    )


def short(name: str) -> str:
    """``github.com/nats-io/nats-server/v2/server.(*fileStore).X`` -> ``(*fileStore).X``,
    generic shapes cut."""
    out, depth = [], 0
    for ch in name:  # drop generic shapes: they hold '/' and '.' of their own
        if ch == "[":
            depth += 1
            if depth == 1:
                out.append("[...]")
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out).rsplit("/", 1)[-1]


# ---------------------------------------------------------------------- the run
def start_server(store: str, port: int, prof_port: int) -> subprocess.Popen[bytes]:
    argv = ["-js", "-sd", store, "-a", "127.0.0.1", "-p", str(port), "--profile", str(prof_port)]
    return subprocess.Popen(
        [find_nats_server(), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def run(args: argparse.Namespace, url: str, prof_port: int) -> bytes:
    """One drain of ``bench/suite.py`` with a CPU profile of the server taken meanwhile."""
    nc = await _connect(url)
    await jsworker.setup_all(nc)
    profile: list[bytes] = []

    def take() -> None:
        u = f"http://127.0.0.1:{prof_port}/debug/pprof/profile?seconds={args.seconds}"
        with urllib.request.urlopen(u, timeout=args.seconds + 30) as r:
            profile.append(r.read())

    taker = threading.Thread(target=take)
    go = suite.go

    async def go_and_profile(procs: list[Any]) -> None:
        taker.start()  # from the moment the contenders are told to start
        await go(procs)

    suite.go = go_and_profile
    here = str(Path(__file__).parent / "_contenders.py")
    c = suite.Contender(args.contender, sys.executable, [here, args.contender])
    try:
        d = await suite.drain(
            nc, url, c, args.tasks, procs=args.procs, partitions=args.partitions, keys=args.keys
        )
    finally:
        suite.go = go
    print(
        f"{args.contender}: {args.tasks} tasks, {args.procs} process(es), "
        f"{args.partitions or 'no'} partitions, keys {args.keys or 'one per task'}: "
        f"{d['tasks_per_s']:,.0f} tasks/s ({d['seconds']:.2f} s)",
        file=sys.stderr,
    )
    await asyncio.get_running_loop().run_in_executor(None, taker.join)
    await nc.close()
    if not profile:
        raise RuntimeError("the server returned no profile")
    return profile[0]


async def _connect(url: str) -> nats.NATS:
    async def quiet(e: Exception) -> None:
        pass

    for _ in range(100):
        try:
            return await nats.connect(url, max_reconnect_attempts=0, error_cb=quiet)
        except Exception:  # not listening yet
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nats-server did not start on {url}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contender", choices=["jsworker", "raw"], default="jsworker")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=8, help="0: unpartitioned")
    ap.add_argument("--keys", type=int, default=0, help="distinct keys (0: one per task)")
    ap.add_argument("--tasks", type=int, default=40_000)
    ap.add_argument("--seconds", type=int, default=3, help="length of the CPU profile")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", help="also write the raw profile (gzipped protobuf) here")
    args = ap.parse_args()
    port, prof_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="jsworker-prof-") as store:
        server = start_server(store, port, prof_port)
        try:
            raw = asyncio.run(run(args, f"nats://127.0.0.1:{port}", prof_port))
        finally:
            server.terminate()
            server.wait()
    if args.out:
        Path(args.out).write_bytes(raw)
    secs, flat, cum = top_functions(raw)
    print(f"nats-server CPU sampled: {secs:.2f} s in {args.seconds} s")
    print("\ncumulative (the function and what it calls):")
    for name, share in cum[: args.top]:
        print(f"  {share * 100:5.1f}%  {short(name)}")
    print("\nflat (the function itself):")
    for name, share in flat[: args.top]:
        print(f"  {share * 100:5.1f}%  {short(name)}")


if __name__ == "__main__":
    main()
