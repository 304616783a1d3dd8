"""The benchmark scripts still run (what they measure is reported by `make bench`, never
asserted here): a small drain of bench/server_profile.py, which also exercises the
suite's contender processes and its pprof reader against a real nats-server profile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench"


def test_server_profile_reads_a_real_profile() -> None:
    args = ["--tasks", "2000", "--procs", "1", "--partitions", "0", "--seconds", "1", "--top", "5"]
    p = subprocess.run(
        [sys.executable, str(BENCH / "server_profile.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "jsworker: 2000 tasks, 1 process(es), no partitions" in p.stderr
    out = p.stdout.splitlines()
    assert out[0].startswith("nats-server CPU sampled: ")
    cumulative = out[out.index("cumulative (the function and what it calls):") + 1 :][:5]
    assert len(cumulative) == 5
    # shares, then Go function names with their package path cut
    for line in cumulative:
        share, name = line.split("%", 1)
        assert 0 < float(share) <= 100
        assert "/" not in name and name.strip()
