"""docs/PROTOCOL.md is a contract: every table row, error code, limit and hex frame is tested.

Three kinds of checks, all driven by the page itself (tests/protodoc.py parses it):

* the tables against the code's declarations: the field tables are generated
  from them (tq.protocol.docgen; tests/test_protocol_docgen.py fails when the
  page is stale), a hand-written one (``nack``) is compared with
  ``tq.protocol.messages.FIELDS``, the task spec table's defaults with
  ``TaskSpec``, the error codes of section 8 against ``tq.core.errors``, the
  limits of section 9 against the settings' defaults and the broker's
  constants;
* the same rows against a live broker over TLS: a required field left out or
  nil, any field of a wrong type, an optional field sent as nil (must equal
  absent), each task spec default and range, each error code provoked, each
  hex frame of section 10 sent as bytes and its answer compared;
* one focused test per behavioural statement the page makes about a corner
  the broker once got wrong or the page once described wrongly.

A new row in a field table or in the error table is checked as soon as it
is written; a new limit row that names a broker setting in backticks is
compared with that setting's default, any other needs a line in
``LIMIT_CHECKS`` (the test says so).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from protodoc import ANY, Raw, Section, Table, connect, frame, hex_bytes, load_doc, matches
from protodoc import session as raw_session

from tq import __version__
from tq.broker import server as broker_server
from tq.broker.service import MAX_CLAIM, MAX_LIST, MAX_WAIT
from tq.config import Settings
from tq.core import errors
from tq.core.limits import BULK_DEFAULT, BULK_MAX
from tq.core.task import MAX_NAME_LENGTH, MAX_PAYLOAD_BYTES, Outcome, TaskSpec
from tq.protocol import docgen, encode_frame
from tq.protocol.messages import FIELDS, MAX_REQUEST_ID
from tq.store import schema
from tq.testing import RunningBroker, running_broker

DOC = load_doc()


# -- reading the field tables ------------------------------------------------------------

DOC_TYPES: dict[str, tuple[type, ...] | None] = {
    "int": (int,),
    "str": (str,),
    "number": (int, float),
    "bool": (bool,),
    "map": (dict,),
    "int or str": (int, str),
    "number or str": (int, float, str),
    "any": None,
}


def doc_type(text: str) -> tuple[type, ...] | None:
    text = text.removesuffix(" or nil")  # an answer's field that may be nil
    if text.startswith("array"):
        return (list,)
    if text.startswith("map") or text.endswith(" map"):  # "map of str", "task-spec map"
        return (dict,)
    return DOC_TYPES[text]


@dataclasses.dataclass(frozen=True)
class Row:
    message: str
    field: str
    types: tuple[type, ...] | None
    required: bool
    default: str | None  # the table's default cell, when it has that column
    cells: tuple[str, ...]
    rule: str  # the range cell of a generated table, else the last cell

    @property
    def id(self) -> str:
        return f"{self.message}.{self.field}"


def table_rows(table: Table, messages: list[str]) -> list[Row]:
    """The rows of a field table, one per (message, field); combined rows are split."""
    out = []
    type_col, req_col = table.column("type"), table.column("req")
    default_col = table.header.index("default") if "default" in table.header else None
    rule_col = table.header.index("range") if "range" in table.header else -1
    for row in table.rows:
        names = ticked_names(row[0])
        types = row[type_col].split(", ") if len(names) > 1 else [row[type_col]]
        assert len(types) == len(names), f"row {row[0]}: one type per field"
        req = row[req_col]
        only = re.fullmatch(r"yes \(`(\w+)`\)", req)  # required for one message of the section
        for name, type_text in zip(names, types, strict=True):
            for message in messages:
                if only and only.group(1) != message:
                    continue
                out.append(
                    Row(
                        message,
                        name,
                        doc_type(type_text.strip("` ")),
                        req == "yes" or only is not None,
                        None if default_col is None else row[default_col],
                        tuple(row),
                        row[rule_col],
                    )
                )
    return out


def ticked_names(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def request_table(section: Section) -> Table | None:
    for table in section.tables:
        if table.header[0] == "field" and not table.before.startswith(("Task spec", "Outcome")):
            return table
    return None


def nested_table(section_name: str, before: str) -> Table:
    section = next(s for s in DOC.messages() if section_name in s.names)
    return next(t for t in section.tables if t.before.startswith(before))


MESSAGE_SECTIONS = {name: s for s in DOC.messages() for name in s.names}
ROWS = [
    row
    for section in DOC.messages()
    if (table := request_table(section)) is not None
    for row in table_rows(table, [n for n in section.names if n in FIELDS])
]
WORKER_ONLY = {n for s in DOC.messages() if "worker session only" in s.title for n in s.names}


def test_every_message_type_has_a_section() -> None:
    assert set(MESSAGE_SECTIONS) == set(FIELDS)


# tables generated from the declarations (tests/test_protocol_docgen.py keeps them current)
GENERATED = {name for key in docgen.tables() for name in key.split()}


def test_every_field_table_is_generated() -> None:
    # every request's, the nack's and the event's tables come from the declarations
    # (tests/test_protocol_docgen.py keeps them current): none is left written by hand
    assert set(FIELDS) <= GENERATED


def test_task_spec_table_matches_taskspec() -> None:
    rows = table_rows(nested_table("submit", "Task spec"), ["spec"])
    fields = {f.name: f for f in dataclasses.fields(TaskSpec)}
    assert {r.field for r in rows} == set(fields)
    for row in rows:
        assert row.required == (fields[row.field].default is dataclasses.MISSING), row.id
        if not row.required:
            assert parse_value(row.default) == fields[row.field].default, row.id


def test_outcome_table_matches_outcome() -> None:
    rows = table_rows(nested_table("result", "Outcome"), ["outcome"])
    assert {r.field for r in rows} == {f.name for f in dataclasses.fields(Outcome)}
    status = next(r for r in rows if r.field == "status")
    assert ticked_names(status.rule) == [f'"{s}"' for s in Outcome.STATUSES]
    states = next(t for t in MESSAGE_SECTIONS["result"].tables if t.header[0] == "status")
    assert [ticked_names(r[0])[0] for r in states.rows] == list(Outcome.STATUSES)


def parse_value(cell: str | None) -> Any:
    """A default cell as a python value: `"x"`, 100, 300.0, nil."""
    text = (cell or "").strip().strip("`")
    if text.startswith("nil"):
        return None
    return json.loads(text)


# -- the field tables, live ----------------------------------------------------------------


def example_request(message: str) -> dict[str, Any]:
    """A valid request of this type: its section's JSON example, the admin key filled in."""
    section = MESSAGE_SECTIONS[message]
    for _, block in section.blocks:
        for line in block:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("t") in section.names:
                return {**msg, "t": message}
    raise AssertionError(f"section {section.title} has no JSON example request")


async def answer_to(broker: RunningBroker, msg: dict[str, Any]) -> dict[str, Any] | None:
    """``msg``'s answer on a fresh connection (as the first message if it is a hello)."""
    if msg["t"] == "hello":
        raw = await connect(broker)
        if isinstance(msg.get("key"), str):
            msg = {**msg, "key": broker.key}
    else:
        kind = "worker" if msg["t"] in WORKER_ONLY else "client"
        raw = await raw_session(broker, kind=kind)
    try:
        return await raw.ask(msg)
    finally:
        await raw.aclose()


@pytest.mark.trio
async def test_field_rows_live(tmp_path: Path) -> None:
    """Each row of each request table: required fields missing or nil, wrong types, nil = absent."""
    failures: list[str] = []
    async with running_broker(tmp_path) as broker:
        for row in ROWS:
            if row.message not in MESSAGE_SECTIONS or row.message in ("ack", "nack", "event"):
                continue
            base = example_request(row.message)
            if row.message == "hello":
                base["key"] = broker.key
            probes: list[tuple[str, dict[str, Any]]] = [("bin", {**base, row.field: b"\x00"})]
            if row.required:
                without = {k: v for k, v in base.items() if k != row.field}
                probes += [("missing", without), ("nil", {**base, row.field: None})]
            for what, msg in probes:
                got = await answer_to(broker, msg)
                if not (
                    got and got.get("code") == "invalid" and f"'{row.field}'" in got["message"]
                ):
                    failures.append(f"{row.id} {what}: {got}")
            if not row.required:
                without = {k: v for k, v in base.items() if k != row.field}
                absent = await answer_to(broker, without)
                nil = await answer_to(broker, {**base, row.field: None})
                same = (
                    absent
                    and nil
                    and (absent["t"], absent.get("code"))
                    == (
                        nil["t"],
                        nil.get("code"),
                    )
                )
                if not same:
                    failures.append(f"{row.id} nil is not absent: {nil} vs {absent}")
            failures += await _required_for(broker, row, base)
    assert not failures, "\n".join(failures)


# rows whose "left out" answer is `invalid` but does not name the field (the cap's name
# is checked with a queue name's rules, and its error says "task queue")
VAGUE = {"cap.name"}


async def _required_for(broker: RunningBroker, row: Row, base: dict[str, Any]) -> list[str]:
    """A "for `X`, `Y`" row: left out of an X (and a Y) request (the message's required
    str field = X)."""
    if not row.cells[2].startswith("for "):
        return []
    (kind,) = [n for n, f in FIELDS[row.message].items() if f.required and f.types == (str,)]
    msg = {k: v for k, v in base.items() if k != row.field}
    failures = []
    for value in ticked_names(row.cells[2]):
        got = await answer_to(broker, {**msg, kind: value})
        named = row.id in VAGUE or (got is not None and row.field in got["message"])
        if not (got and got.get("code") == "invalid" and named):
            failures.append(f"{row.id} left out of a {kind} {value!r} request: {got}")
    return failures


# spec fields a task map does not show (tq workflow show and tq explain show dependencies;
# a delay shows as the task's run_at)
NOT_ON_THE_TASK = {
    "depends_on",
    "on_dependency_failure",
    "input",
    "result_key",
    "delay",
    "unique_for",
    "unique_key",
}


# spec fields valid only with another one (its range is probed with that one set)
COMPANIONS = {"unique_key": {"unique_for": 60.0}}


@pytest.mark.trio
async def test_task_spec_rows_live(tmp_path: Path) -> None:
    """Each task spec row: its default (also when sent as nil), its type, its range."""
    rows = table_rows(nested_table("submit", "Task spec"), ["spec"])
    failures: list[str] = []
    async with running_broker(tmp_path) as broker:
        raw = await raw_session(broker)
        rid = iter(range(2, 10**6))

        async def submit(spec: dict[str, Any]) -> dict[str, Any]:
            answer = await raw.ask({"t": "submit", "id": next(rid), "tasks": [spec]})
            assert answer is not None
            return answer

        async def task_of(spec: dict[str, Any]) -> dict[str, Any]:
            answer = await submit(spec)
            assert answer["t"] == "ack", answer
            got = await raw.ask(
                {"t": "query", "id": next(rid), "q": "get", "task": answer["tasks"][0]["id"]}
            )
            assert got is not None
            return dict(got["task"])

        for row in rows:
            base = {"type": "doc-check"}
            if not row.required and row.field not in NOT_ON_THE_TASK:
                default = parse_value(row.default)
                for spec in (base, {**base, row.field: None}):
                    task = await task_of(spec)
                    if not matches(default, task[row.field]):
                        failures.append(f"{row.id}: default {task[row.field]!r} for {spec}")
            if row.types is not None:
                answer = await submit({**base, row.field: b"\x00"})
                if answer.get("code") != "invalid" or row.field not in answer["message"]:
                    failures.append(f"{row.id}: a bin value got {answer}")
            for value, ok in range_probes(row.rule):
                spec = {**base, **COMPANIONS.get(row.field, {}), row.field: value}
                answer = await submit(spec)
                if (answer["t"] == "ack") != ok:
                    failures.append(
                        f"{row.id}: {value!r} should be {'accepted' if ok else 'refused'}"
                    )
        await raw.aclose()
    assert not failures, "\n".join(failures)


def range_probes(rule: str) -> list[tuple[Any, bool]]:
    """Values at and beyond the bounds a rule cell states ("1..200 chars", "0..255", ...)."""
    number = r"(\d+(?: \d{3})*(?:\.\d+)?(?:e\d+)?)"  # 1 000 000, 0.001, 1e300
    match = re.match(rf"{number}\.\.{number}( chars)?", rule)
    if not match:
        return []
    lo_text, hi_text = (m.replace(" ", "") for m in match.group(1, 2))
    if match.group(3) == " chars":
        lo, hi = int(lo_text), int(hi_text)
        return [("x" * lo, True), ("x" * hi, True), ("x" * (hi + 1), False)] + (
            [("x" * (lo - 1), False)] if lo > 0 else []
        )
    if "." in lo_text + hi_text or "e" in lo_text + hi_text:
        lo_f, hi_f = float(lo_text), float(hi_text)
        return [(lo_f, True), (hi_f, True), (lo_f / 2 if lo_f else -1.0, False), (hi_f * 10, False)]
    lo_i, hi_i = int(lo_text), int(hi_text)
    return [(lo_i, True), (hi_i, True), (lo_i - 1, False), (hi_i + 1, False)]


def test_range_probes_read_the_rules() -> None:
    assert range_probes("1..200 chars, no whitespace")[2] == ("x" * 201, False)
    assert range_probes("0..1 000 000")[3] == (1_000_001, False)
    assert range_probes("0.001..1e300 s; enforced")[2] == (0.0005, False)
    assert range_probes("msgpack-encoded size") == []


# -- section 8: error codes ----------------------------------------------------------------

ERROR_TABLE = DOC.section("8.").tables[0]
DOC_CODES = [ticked_names(row[0])[0] for row in ERROR_TABLE.rows]


def reserved_codes() -> set[str]:
    """The codes of the "Reserved codes ..." paragraph (client-side or never sent)."""
    text = DOC.section("8.").text
    return set(ticked_names(text[text.index("Reserved codes") : text.index("Treat any unknown")]))


def test_error_codes_are_the_codes_of_the_exceptions() -> None:
    known = {cls.code for cls in errors._KNOWN if cls is not errors.RemoteError}
    assert set(DOC_CODES) | reserved_codes() == known
    assert len(DOC_CODES) == len(set(DOC_CODES))


Provoker = Callable[[Path, pytest.MonkeyPatch], Awaitable[dict[str, Any] | None]]
PROVOKERS: dict[str, Provoker] = {}


def provokes(code: str) -> Callable[[Provoker], Provoker]:
    def register(fn: Provoker) -> Provoker:
        PROVOKERS[code] = fn
        return fn

    return register


async def _on_session(tmp_path: Path, data: bytes, **settings: Any) -> dict[str, Any] | None:
    async with running_broker(tmp_path, **settings) as broker:
        raw = await raw_session(broker)
        await raw.send(data)
        answer = await raw.read()
        await raw.aclose()
        return answer


@provokes("protocol")
async def _protocol(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    return await _on_session(tmp_path, b"\x00\x00\x00\x01\xc1")


@provokes("frame_too_large")
async def _frame_too_large(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    return await _on_session(tmp_path, struct.pack(">I", Settings().max_frame + 1))


@provokes("unknown_message")
async def _unknown(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    return await _on_session(tmp_path, frame({"t": "frobnicate", "id": 5}))


@provokes("invalid")
async def _invalid(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    return await _on_session(tmp_path, frame({"t": "claim", "id": 5, "n": 1, "queues": []}))


@provokes("payload_too_large")
async def _payload(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    msg = {"t": "submit", "id": 5, "tasks": [{"type": "x", "payload": "x" * 200}]}
    return await _on_session(tmp_path, frame(msg), max_payload=100)


@provokes("not_found")
async def _not_found(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    return await _on_session(tmp_path, frame({"t": "query", "id": 5, "q": "get", "task": "nope"}))


@provokes("invalid_transition")
async def _transition(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    async with running_broker(tmp_path) as broker:
        raw = await raw_session(broker)
        ack = await raw.ask({"t": "submit", "id": 2, "tasks": [{"type": "x"}]})
        assert ack is not None
        task = ack["tasks"][0]["id"]
        await raw.ask({"t": "cancel", "id": 3, "task": task})
        answer = await raw.ask({"t": "cancel", "id": 4, "task": task})
        await raw.aclose()
        return answer


@provokes("store")
async def _store(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    """A real SQLite "database or disk is full": the file may not grow by a page."""
    insert = schema.insert_prepared

    def full_disk(conn: Any, *args: Any) -> Any:
        pages = conn.execute("PRAGMA page_count").fetchall()[0][0]
        conn.execute(f"PRAGMA max_page_count = {pages}").fetchall()
        return insert(conn, *args)

    mp.setattr(schema, "insert_prepared", full_disk)
    msg = {"t": "submit", "id": 5, "tasks": [{"type": "x", "payload": "x" * 200_000}]}
    return await _on_session(tmp_path, frame(msg))


@provokes("unavailable")
async def _unavailable(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    async with running_broker(tmp_path, max_connections=1) as broker:
        first = await raw_session(broker)
        second = await connect(broker)
        answer = await second.read()
        assert await second.read() is None, "closed after the NACK"
        await second.aclose()
        await first.aclose()
        return answer


@provokes("unauthorized")
async def _unauthorized(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    async with running_broker(tmp_path) as broker:
        raw = await connect(broker)
        bad = "tq_000000000000_" + "A" * 43
        answer = await raw.ask({"t": "hello", "id": 1, "v": 1, "kind": "client", "key": bad})
        assert await raw.read() is None, "closed after the NACK"
        await raw.aclose()
        return answer


async def _key(raw: Raw, role: str, **fields: Any) -> str:
    answer = await raw.ask({"t": "keys", "id": 90, "op": "create", "role": role, **fields})
    assert answer is not None and answer["t"] == "ack", answer
    return str(answer["key"])


@provokes("forbidden")
async def _forbidden(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    async with running_broker(tmp_path) as broker:
        admin = await raw_session(broker)
        reader = await raw_session(broker, key=await _key(admin, "reader"))
        answer = await reader.ask({"t": "submit", "id": 2, "tasks": [{"type": "x"}]})
        await reader.aclose()
        await admin.aclose()
        return answer


@provokes("rate_limited")
async def _rate_limited(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    async with running_broker(tmp_path, submit_rate=0.001, submit_burst=2) as broker:
        admin = await raw_session(broker)
        producer = await raw_session(broker, key=await _key(admin, "producer"))
        tasks = [{"type": "x"}, {"type": "x"}]
        first = await producer.ask({"t": "submit", "id": 2, "tasks": tasks})
        assert first is not None and first["t"] == "ack"
        answer = await producer.ask({"t": "submit", "id": 3, "tasks": tasks[:1]})
        assert answer is not None and answer["retry_after"] > 0
        await producer.aclose()
        await admin.aclose()
        return answer


@provokes("timeout")
async def _timeout(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    async with running_broker(tmp_path, hello_timeout=0.2) as broker:
        raw = await connect(broker)  # says nothing
        answer = await raw.read()
        assert await raw.read() is None, "closed after the NACK"
        await raw.aclose()
        return answer


@provokes("tls")
async def _tls(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    from tq.client.aio import open_stream

    async with running_broker(tmp_path) as broker:
        plain = Raw(await open_stream(broker.info.address, ca=None, insecure=True))
        await plain.send(frame({"t": "hello", "id": 1, "v": 1, "kind": "client"}))
        answer = await plain.read()
        await plain.aclose()
        return answer


@provokes("error")
async def _internal(tmp_path: Path, mp: pytest.MonkeyPatch) -> dict[str, Any] | None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    mp.setattr(broker_server.BrokerService, "stats", broken)
    return await _on_session(tmp_path, frame({"t": "query", "id": 5, "q": "stats"}))


CONNECTION_LEVEL = {"protocol", "frame_too_large", "timeout", "tls", "unavailable"}


@pytest.mark.trio
@pytest.mark.parametrize("code", DOC_CODES)
async def test_error_code_live(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provoke = PROVOKERS.get(code)
    assert provoke is not None, f"section 8 documents {code!r}: add a provoker for it here"
    answer = await provoke(tmp_path, monkeypatch)
    assert answer is not None and answer["t"] == "nack" and answer["code"] == code, answer
    assert isinstance(answer["message"], str) and answer["message"]
    if code in CONNECTION_LEVEL:
        assert answer["id"] == 0, answer
    else:
        assert answer["id"] != 0, answer
    row = ERROR_TABLE.rows[DOC_CODES.index(code)]
    assert ("id 0" in row[1]) == (code in CONNECTION_LEVEL | {"unauthorized"}), row


# -- section 9: limits ---------------------------------------------------------------------

LIMITS = {row[0]: row[1] for row in DOC.section("9.").tables[0].rows}
SETTINGS_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}


def quantity(text: str) -> float:
    """'16 MiB' -> 16777216, '10 s' -> 10, '5000 tasks/s' -> 5000."""
    match = re.match(r"([\d.]+)\s*(KiB|MiB)?", text.strip())
    assert match, text
    scale = {"KiB": 1024, "MiB": 1024 * 1024, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


LIMIT_CHECKS: dict[str, Callable[[str], bool]] = {
    "task payload / result": lambda v: f"{MAX_PAYLOAD_BYTES:,}".replace(",", " ") in v,
    "tasks per `submit`": lambda v: v.startswith(
        f"1..{_const('tq.core.task', 'MAX_SUBMIT'):,}".replace(",", " ")
    ),
    "`claim` `n`": lambda v: v == f"1..{MAX_CLAIM}",
    "`claim` `wait`, `wait` `timeout`": lambda v: v.startswith(f"≤ {MAX_WAIT:g} s"),
    "`query list` `limit`": lambda v: v == f"1..{MAX_LIST} (default 100)",
    "`purge` / `retry_many` `limit`": lambda v: v == f"1..{BULK_MAX} (default {BULK_DEFAULT})",
    "`type`, `queue`, `idempotency_key`": lambda v: v == f"1..{MAX_NAME_LENGTH} characters",
    "`priority`": lambda v: v == "0..255",
    "request `id`": lambda v: MAX_REQUEST_ID == 2**63 - 1 and v.startswith("0..2^63-1"),
    "frames before an accepted `hello`": lambda v: quantity(v) == broker_server.HELLO_MAX_FRAME,
    # rows of the frame and payload bounds (constants looked up when the row is there)
    "frames from a `reader` key": lambda v: (
        quantity(v) == _const("tq.broker.server", "SMALL_ROLE_MAX_FRAME")
    ),
    "maps and arrays in one frame": lambda v: v.startswith(
        f"{_const('tq.protocol.frames', 'CONTAINER_BASE'):,} + one per ".replace(",", " ")
        + f"{_const('tq.protocol.frames', 'BYTES_PER_CONTAINER')} bytes"
    ),
    "nesting of a payload or result": lambda v: v.startswith(
        f"{_const('tq.core.values', 'MAX_DEPTH')} levels"
    ),
    "numbers": lambda v: v.startswith("finite") and _refuses_nan(),
}


def _refuses_nan() -> bool:
    """Every number is checked by tq.core.values: NaN and infinities are refused."""
    from tq.core.values import number

    for bad in (float("nan"), float("inf")):
        try:
            number(bad, "x")
        except errors.InvalidRequest:
            continue
        return False
    return True


def _const(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", list(LIMITS))
def test_limit_row_matches_the_code(name: str) -> None:
    value = LIMITS[name]
    head, _, tail = value.partition("(")
    settings = [s for s in ticked_names(tail) if s in SETTINGS_DEFAULTS]
    if name in LIMIT_CHECKS:
        assert LIMIT_CHECKS[name](value), f"{name}: {value}"
    elif settings:
        amounts = [quantity(m.group(0)) for m in re.finditer(r"[\d.]+\s*(KiB|MiB)?", head)]
        assert amounts, f"{name}: no value before the setting's name"
        for setting, amount in zip(settings, amounts, strict=False):
            assert float(SETTINGS_DEFAULTS[setting]) == amount, f"{name}: {setting}"
    else:
        raise AssertionError(f"limit {name!r}: name its setting in backticks or add a check")


@pytest.mark.trio
async def test_limits_live(tmp_path: Path) -> None:
    async with running_broker(tmp_path) as broker:
        worker = await raw_session(broker, kind="worker")
        for n, ok in ((0, False), (MAX_CLAIM, True), (MAX_CLAIM + 1, False)):
            got = await worker.ask({"t": "claim", "id": 2, "n": n, "queues": ["default"]})
            assert got is not None and (got["t"] == "ack") == ok, (n, got)
        for limit, ok in ((0, False), (MAX_LIST, True), (MAX_LIST + 1, False)):
            got = await worker.ask({"t": "query", "id": 3, "q": "list", "limit": limit})
            assert got is not None and (got["t"] == "ack") == ok, (limit, got)
        for limit, ok in ((BULK_MAX, True), (BULK_MAX + 1, False)):
            got = await worker.ask({"t": "retry_many", "id": 4, "state": "dead", "limit": limit})
            assert got is not None and (got["t"] == "ack") == ok, (limit, got)
        got = await worker.ask({"t": "submit", "id": 5, "tasks": []})
        assert got is not None and got["code"] == "invalid"
        await worker.aclose()
        # before hello: frames are capped
        raw = await connect(broker)
        await raw.send(struct.pack(">I", broker_server.HELLO_MAX_FRAME + 1))
        got = await raw.read()
        assert got is not None and got["code"] == "frame_too_large" and got["id"] == 0
        assert await raw.read() is None
        await raw.aclose()


# -- section 10: hex frames ----------------------------------------------------------------


def test_hex_hello_is_the_json_it_shows() -> None:
    section = DOC.section("10.")
    data = hex_bytes("\n".join(section.blocks[0][1]))
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4
    quoted = re.search(r"`(\{\"t\":\"hello\"[^`]*)`", section.text)
    assert quoted is not None, "section 10 quotes the hello it encodes"
    shown = json.loads(quoted.group(1))
    assert msgpack.unpackb(data[4:], raw=False) == shown
    assert encode_frame(shown) == data, "the reference encoder sends exactly these bytes"
    assert f"is {length} body bytes, so the frame is {length + 4} bytes" in section.text


def documented_answers(text: str) -> list[dict[str, Any]]:
    return [json.loads(m) for m in re.findall(r"`(\{\"t\":\"(?:ack|nack)\"[^`]*)`", text)]


@pytest.mark.trio
async def test_hex_hello_answers_live(tmp_path: Path) -> None:
    section = DOC.section("10.")
    data = hex_bytes("\n".join(section.blocks[0][1]))
    ack, nack = documented_answers(section.text.split("More frames")[0])
    async with running_broker(tmp_path / "open", auth=False, lease_ttl=30.0) as broker:
        raw = await connect(broker)
        await raw.send(data)
        got = await raw.read()
        assert matches({**ack, "server": f"tq/{__version__}"}, got), got
        await raw.aclose()
    async with running_broker(tmp_path / "keys") as broker:
        raw = await connect(broker)
        await raw.send(data)
        assert matches(nack, await raw.read())
        assert await raw.read() is None
        await raw.aclose()


HEX_ROWS = DOC.section("10.").tables[0].rows


@pytest.mark.trio
@pytest.mark.parametrize("row", HEX_ROWS, ids=[r[1][:40] for r in HEX_ROWS])
async def test_hex_frame_live(row: list[str], tmp_path: Path) -> None:
    data = hex_bytes(row[0].strip("`"))
    shown = re.match(r"`(\{.*?\})`", row[1])
    if shown and len(data) > 4:  # the frame is the JSON it says it is
        assert data == frame(json.loads(shown.group(1)))
    (answer,) = documented_answers(row[2])
    async with running_broker(tmp_path) as broker:
        raw = await raw_session(broker)
        await raw.send(data)
        got = await raw.read()
        assert matches(answer, got), got
        if row[3] == "closed":
            assert await raw.read() is None
        else:
            assert row[3] == "open"
            still = await raw.ask({"t": "query", "id": 99, "q": "health"})
            assert still is not None and still["t"] == "ack"
        await raw.aclose()


def test_matches_treats_the_ellipsis_as_any_value() -> None:
    assert matches({"a": ANY, "b": [1, 2.0]}, {"a": {"x": 1}, "b": [1, 2]})
    assert not matches({"a": 1}, {"a": 1, "b": 2})
    assert not matches({"a": 1}, {"a": True})
