"""What the notebook shows, read as a person reads it: the status and partition-map
HTML (a placeholder across the whole row, no stray separators, counts that add up, a
legend for the bar), the dead-letter trial's hint and the replay summary, and
``%jsworker submit`` with JSON typed without quotes. Renderers are unit tested; the
magics also run in a real kernel against a real server."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from interactive_helpers import Kernel, own_server

from jsworker import ConfigError, EmbeddedServer
from jsworker._dead import DeadLetter, ReplayResult
from jsworker.interactive._dead_loop import Replayed, Trial, TrialRow
from jsworker.interactive._display import _COLOURS, GroupMap, Snapshot
from jsworker.interactive._magics import _split

ROOT = Path(__file__).resolve().parent.parent

server = pytest.fixture(scope="module", name="server")(own_server)


# ------------------------------------------------------------------- renderers
def _snapshot(**kw: Any) -> Snapshot:
    base: dict[str, Any] = dict(
        worker_id="worker-1",
        url="nats://127.0.0.1:4222",
        group=None,
        state="running",
        in_flight=0,
        stats={"started": 0, "completed": 0},
        handlers=[],
        maps=[],
        recent=[],
    )
    base.update(kw)
    return Snapshot(**base)


def _rows(html: str) -> list[str]:
    return re.findall(r"<tr>(.*?)</tr>", html)


def test_empty_handler_table_placeholder_spans_the_row() -> None:
    html = _snapshot()._repr_html_()
    rows = _rows(html)
    placeholder = [r for r in rows if "none yet" in r]
    assert len(placeholder) == 1
    assert "colspan='6'" in placeholder[0]
    assert "<td></td>" not in html  # no empty cells next to it


def test_status_line_has_no_stray_separators() -> None:
    for stats in ({"started": 0, "completed": 0}, {"started": 5, "completed": 4}, {}):
        html = _snapshot(stats=stats)._repr_html_()
        head = html.splitlines()[1]
        text = re.sub(r"<[^>]+>", "", head).strip()
        assert not text.endswith("·") and not text.endswith("&middot;"), head
        assert "&middot; &middot;" not in head and "&middot;  " not in head
        assert not head.rstrip().endswith("&middot;"), head
    html = _snapshot(stats={"started": 5, "completed": 4, "failed": 0})._repr_html_()
    assert "in flight 0 &middot; started 5, completed 4" in html
    assert "failed" not in html


def _map(**kw: Any) -> GroupMap:
    base: dict[str, Any] = dict(
        task_type="resize",
        group=None,
        max_partitions=8,
        members={"worker-a": [0, 1, 2, 3], "worker-b": [4, 5, 6, 7]},
        unassigned=[],
        not_consumed=[],
        revision=3,
        me="worker-b",
    )
    base.update(kw)
    return GroupMap(**base)


def _counts(html: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in _rows(html):
        cells = re.findall(r"<td>(.*?)</td>", r)
        if len(cells) == 3 and cells[1].isdigit():
            out[cells[0]] = int(cells[1])
    return out


def test_not_consumed_partitions_are_a_note_not_a_member_row() -> None:
    m = _map(not_consumed=[4, 5, 6, 7])
    html = m._repr_html_()
    counts = _counts(html)
    assert sum(counts.values()) == 8  # 8 of 8 partitions, not 12
    assert set(counts) == {"worker-a", "worker-b  (this session)"}
    assert "(assigned, not consumed yet)" not in html
    assert "note: 4 of the partitions above (4-7) are assigned but not consumed yet" in html
    # the unassigned ones are a row of their own: they are not counted elsewhere
    m = _map(members={"worker-a": [0, 1, 2]}, unassigned=[3, 4, 5, 6, 7], not_consumed=[2])
    counts = _counts(m._repr_html_())
    assert counts == {"worker-a": 3, "(unassigned)": 5}
    assert "note: 1 of the partitions above (2) is assigned" in m._repr_html_()


def test_not_consumed_note_in_the_terminal_too() -> None:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(_snapshot(maps=[_map(not_consumed=[7])]))
    text = console.export_text()
    assert "1 of the partitions above (7) is assigned but not consumed yet" in text


def test_the_bar_has_a_legend() -> None:
    html = _map(
        members={"worker-a": [0, 1, 2], "worker-b": [3, 4]}, unassigned=[5, 6, 7]
    )._repr_html_()
    legend = html[html.index("jsworker-legend") :]
    assert f"background:{_COLOURS[0]}" in legend and "worker-a: 3" in legend
    assert f"background:{_COLOURS[1]}" in legend and "worker-b (this session): 2" in legend
    assert "unassigned: 3" in legend
    # one legend entry per coloured segment of the bar
    bar = html[: html.index("jsworker-legend")]
    assert bar.count("height:10px'></div>") == 2


def _dead(seq: int, value: Any) -> DeadLetter:
    return DeadLetter(
        seq=seq,
        subject=f"dead.fixme.{seq}",
        task_type="fixme",
        run_id=f"run-{seq}",
        step_id="0",
        kind="permanent",
        error="no name",
        attempts=1,
        worker_id="w",
        timestamp="2026-01-01T00:00:00Z",
        input=value,
        metadata={},
        traceback=None,
        payload_text=None,
        raw={},
    )


def _trial(rows: list[TrialRow]) -> Trial:
    return Trial(session=None, task_type="fixme", function="fixed", rows=rows)  # type: ignore[arg-type]


def test_trial_hint_names_the_magic_and_no_dead_letters_reads_as_none() -> None:
    empty = _trial([])
    for text in (empty._repr_html_(), repr(empty), empty._summary()):
        assert "last 0" not in text and "0 dead letters" not in text, text
        assert "o dead letters of" in text or "no dead letters of" in text.lower(), text
    assert "trial.replay" not in empty._repr_html_()
    rows = [
        TrialRow(_dead(1, {"nom": "a"}), True, "hello a", None, 0.01),
        TrialRow(_dead(2, {"x": 1}), False, None, "permanent: still", 0.01),
    ]
    html = _trial(rows)._repr_html_()
    assert "on the last 2 dead letters of <code>fixme</code>: 1 pass, 1 fail" in html
    assert "Replay the 1 passing with <code>%jsworker replay</code>" in html
    assert "trial.replay" not in html and "await trial" not in html
    none_pass = _trial(rows[1:])._repr_html_()
    assert "on the last dead letter of" in none_pass and "Nothing to replay yet" in none_pass
    assert "%jsworker replay" not in none_pass


def test_replay_summary_is_a_sentence() -> None:
    rows = [
        TrialRow(_dead(1, 1), True, 2, None, 0.01),
        TrialRow(_dead(2, 2), True, 3, None, 0.01),
        TrialRow(_dead(3, 3), False, None, "boom", 0.01),
    ]
    t = _trial(rows)
    done = Replayed(
        [
            ReplayResult(rows[0].dead, "run-1", False, True, "task.fixme.run-1"),
            ReplayResult(rows[1].dead, "run-2", True, True, "task.fixme.run-2"),
        ],
        trial=t,
        dry_run=False,
    )
    assert repr(done) == (
        "Replayed 1 dead letter of fixme (runs run-1); 1 already replayed before "
        "(not submitted again); 1 still failing left alone."
    )
    assert "ReplayResult" not in repr(done) and "ReplayResult" not in done._repr_html_()
    assert [r.run_id for r in done] == ["run-1", "run-2"]  # still the list of results
    waiting = Replayed(
        [ReplayResult(rows[0].dead, "run-1", False, False, "task.fixme.run-1")],
        trial=_trial(rows[:1]),
        dry_run=False,
    )
    assert "1 wait in the queue: no worker serves task.fixme.run-1 yet" in repr(waiting)
    assert repr(Replayed([], trial=_trial([]), dry_run=False)) == (
        "Nothing replayed: no dead letters of fixme."
    )
    assert repr(Replayed([], trial=_trial(rows[2:]), dry_run=False)) == (
        "Nothing replayed: fixed passes none of the last dead letter."
    )


# ------------------------------------------------------------- submit parsing
@pytest.mark.parametrize(
    ("line", "words", "data"),
    [
        ('submit t1 {"a": 1}', ["submit", "t1"], {"a": 1}),
        ('submit t1 {"a": {"b": [1, 2]}} --wait', ["submit", "t1", "--wait"], {"a": {"b": [1, 2]}}),
        ('submit t1 [1, "two"] --key k', ["submit", "t1", "--key", "k"], [1, "two"]),
        ("submit t1 '{\"a\": 1}'", ["submit", "t1", '{"a": 1}'], ...),
        ("submit t1 42", ["submit", "t1", "42"], ...),
        ("status", ["status"], ...),
    ],
)
def test_submit_json_without_quotes(line: str, words: list[str], data: Any) -> None:
    assert _split(line) == (words, data)


def test_submit_bad_unquoted_json_says_how_to_quote() -> None:
    with pytest.raises(ConfigError, match="quote the JSON as one argument"):
        _split("submit t1 {'a': 1}")
    with pytest.raises(ConfigError, match="text after it"):
        _split('submit t1 {"a": 1}x')


# ---------------------------------------------------------------- real kernel
def kernel_env(server: EmbeddedServer) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["NATS_URL"] = server.url
    env.pop("JSWORKER_KERNEL_URL", None)
    return env


@pytest.fixture
async def kernel(server: EmbeddedServer) -> AsyncIterator[Kernel]:
    k = await Kernel(kernel_env(server)).start()
    try:
        yield k
    finally:
        await k.stop()


async def test_submit_and_replay_magics_in_a_kernel(
    kernel: Kernel, server: EmbeddedServer, unique: Callable[[str], str]
) -> None:
    t = unique("nbtext")
    await kernel.ok("%load_ext jsworker\nimport asyncio, time\nimport jsworker")
    await kernel.ok(f"%jsworker connect {server.url}")
    await kernel.ok(
        f"@session.handle({t!r})\n"
        "def strict(ctx):\n"
        "    d = ctx.json()\n"
        "    if 'name' not in d:\n"
        "        raise jsworker.PermanentError('no name')\n"
        "    return 'hi ' + d['name']\n"
    )
    # JSON typed without quotes: read up to its closing brace
    res = await kernel.ok(f'%jsworker submit {t} {{"name": "ada"}} --wait')
    assert res.text == "'hi ada'"
    res = await kernel.ok(f'%jsworker submit {t} \'{{"name": "bo"}}\' --wait')
    assert res.text == "'hi bo'"
    # a JSON string with its quotes eaten by the split: the error says how to quote
    res = await kernel.run(f'%jsworker submit {t} "ada" extra')
    assert res.error is not None and res.error["ename"] == "ConfigError"
    assert "quote the JSON as one argument" in res.error["evalue"]
    # no dead letters yet: the trial says so, and there is nothing to replay
    await kernel.ok("def fixed(ctx):\n    return 'hi ' + ctx.json().get('nom', '?')\n")
    res = await kernel.ok(f"%jsworker dead {t} fixed")
    assert f"No dead letters of <code>{t}</code>" in res.html
    assert "last 0" not in res.html + res.text
    res = await kernel.ok("%jsworker replay")
    assert res.text == f"Nothing replayed: no dead letters of {t}."
    # two dead letters, fixed, replayed: a sentence, not a list of reprs
    await kernel.ok(
        f"h1 = await session.submit({t!r}, {{'nom': 'cy'}})\n"
        f"h2 = await session.submit({t!r}, {{'nom': 'di'}})\n"
        # wait on the dead letters themselves (written after the task failed)
        "deadline = time.monotonic() + 30\n"
        f"while len(await jsworker.list_dead(session.nc, task_type={t!r})) < 2:\n"
        "    assert time.monotonic() < deadline, 'no 2 dead letters'\n"
        "    await asyncio.sleep(0.05)\n"
    )
    res = await kernel.ok(f"%jsworker dead {t} fixed")
    assert "on the last 2 dead letters" in res.html and "2 pass, 0 fail" in res.html
    assert "<code>%jsworker replay</code>" in res.html and "trial.replay" not in res.html
    await kernel.ok(f"session.handle({t!r}, fixed)")
    res = await kernel.ok("%jsworker replay")
    assert res.text.startswith(f"Replayed 2 dead letters of {t} (runs "), res.text
    assert "ReplayResult" not in res.text + res.html
    res = await kernel.ok("%jsworker replay")
    assert "2 already replayed before (not submitted again)" in res.text
    await kernel.ok("%jsworker close")
