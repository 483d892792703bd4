"""docs/PROTOCOL.md as data, and raw sessions with a live broker (for test_protocol_doc.py).

``Doc`` reads the page once: its sections (``##`` and ``###`` headings), the
markdown tables in each (with the line just before each table, which names
nested tables such as "Task spec"), and its fenced code blocks. Nothing here
knows what a table means; the tests decide that, row by row, so a row added
to the page is checked without a change here.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import trio

from tq.client.aio import open_stream
from tq.protocol import Connection
from tq.testing import RunningBroker

DOC_PATH = Path(__file__).parent.parent / "docs" / "PROTOCOL.md"
ANY = "…"  # in a documented answer: any value


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    before: str  # the last non-empty line before the table

    def column(self, name: str) -> int:
        return self.header.index(name)


@dataclass
class Section:
    title: str
    level: int
    lines: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    blocks: list[tuple[str, list[str]]] = field(default_factory=list)  # (language, lines)

    @property
    def names(self) -> list[str]:
        """The backticked names in the heading (``cancel`` / ``retry`` -> both)."""
        return ticked(self.title)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


class Doc:
    def __init__(self, text: str) -> None:
        self.sections: list[Section] = []
        current = Section("(preamble)", 1)
        self.sections.append(current)
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            heading = re.match(r"^(#{2,3}) (.*)$", line)
            if heading:
                current = Section(heading.group(2).strip(), len(heading.group(1)))
                self.sections.append(current)
                i += 1
                continue
            if line.startswith("```"):
                lang, body = line[3:].strip(), []
                i += 1
                while not lines[i].startswith("```"):
                    body.append(lines[i])
                    i += 1
                current.blocks.append((lang, body))
                current.lines += ["```" + lang, *body, "```"]
                i += 1
                continue
            if line.startswith("|"):
                before = next(  # the text before it, past a generated table's marker
                    (p for p in reversed(current.lines) if p.strip() and not p.startswith("<!--")),
                    "",
                )
                rows = []
                while i < len(lines) and lines[i].startswith("|"):
                    rows.append(cells(lines[i]))
                    current.lines.append(lines[i])
                    i += 1
                body = [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
                current.tables.append(Table(rows[0], body, before))
                continue
            current.lines.append(line)
            i += 1

    def section(self, prefix: str) -> Section:
        """The first section whose title starts with ``prefix`` (e.g. "8. Errors")."""
        for section in self.sections:
            if section.title.startswith(prefix):
                return section
        raise KeyError(f"docs/PROTOCOL.md has no section {prefix!r}")

    def messages(self) -> list[Section]:
        """The ``###`` sections of "5. Messages"."""
        out, inside = [], False
        for section in self.sections:
            if section.level == 2:
                inside = section.title.startswith("5.")
            elif inside:
                out.append(section)
        return out


def load_doc() -> Doc:
    return Doc(DOC_PATH.read_text(encoding="utf-8"))


def json_lines(block: list[str]) -> list[dict[str, Any]]:
    """The lines of a code block that are complete JSON maps (examples with ``…`` are not)."""
    out = []
    for line in block:
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


def hex_bytes(text: str) -> bytes:
    """Leading two-digit hex tokens of each line (the rest of a line is a comment)."""
    out = bytearray()
    for line in text.splitlines():
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            out.append(int(token, 16))
    return bytes(out)


def matches(documented: Any, actual: Any) -> bool:
    """``actual`` as documented: equal, with ``…`` matching any value."""
    if documented == ANY:
        return True
    if isinstance(documented, dict):
        return (
            isinstance(actual, dict)
            and documented.keys() == actual.keys()
            and all(matches(documented[k], actual[k]) for k in documented)
        )
    if isinstance(documented, list):
        return (
            isinstance(actual, list)
            and len(documented) == len(actual)
            and all(matches(d, a) for d, a in zip(documented, actual, strict=True))
        )
    if isinstance(documented, float) or isinstance(actual, float):
        return (
            isinstance(actual, int | float)
            and not isinstance(actual, bool)
            and float(documented) == float(actual)
        )
    return type(documented) is type(actual) and bool(documented == actual)


# -- raw sessions ---------------------------------------------------------------------


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class Raw:
    """One connection to a live broker, speaking bytes."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection()
        self.closed = False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def ask(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        await self.send(frame(msg))
        return await self.read()

    async def read(self, timeout: float = 15) -> dict[str, Any] | None:
        """The next message, or None once the broker closed the connection."""
        with trio.fail_after(timeout):
            while (msg := self.conn.next_message()) is None:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.closed = True
                    return None
                self.conn.receive_data(bytes(data))
        return msg

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self.stream.aclose()


async def connect(broker: RunningBroker) -> Raw:
    stream = await open_stream(broker.info.address, ca=broker.info.ca_file, insecure=False)
    return Raw(stream)


async def session(
    broker: RunningBroker, kind: str = "client", key: str | None = None, **hello: Any
) -> Raw:
    """A raw connection whose hello was accepted (the admin key unless ``key``)."""
    raw = await connect(broker)
    msg = {"t": "hello", "id": 1, "v": 1, "kind": kind, **hello}
    chosen = key or broker.key
    if chosen is not None:
        msg["key"] = chosen
    answer = await raw.ask(msg)
    assert answer is not None and answer["t"] == "ack", answer
    return raw


# -- examples with ellipses -------------------------------------------------------------


def loose_json(line: str) -> Any:
    """An example line as data; ``{…Task…}`` and a ``…`` among map entries become markers."""
    text = re.sub(r"\{…\w*…\}", f'"{ANY}"', line)
    text = text.replace("{…,", f'{{"{ANY}":"{ANY}",').replace(",…}", f',"{ANY}":"{ANY}"}}')
    return json.loads(text)


EXACT = frozenset({"t", "state", "code", "topic", "role", "kind", "accepted", "created"})
EXACT_ALSO = frozenset({"timed_out", "priority", "from", "to"})
FREE = frozenset({"queues", "detail", "payload", "result"})  # keyed by data: only the type


def like(documented: Any, actual: Any, key: str = "") -> bool:
    """``actual`` has the documented shape: the same keys (``…``: and maybe more), the same
    types (nil is allowed either way, an empty list matches any list), and the same value
    for the keys that name a kind or state (``EXACT``); maps keyed by data (``FREE``:
    queue names, states, payloads) only by type."""
    if documented == ANY or documented is None or actual is None:
        return True
    if key in FREE:
        return type(documented) is type(actual)
    if key in EXACT | EXACT_ALSO:
        return bool(documented == actual) and type(documented) is type(actual)
    if isinstance(documented, dict):
        if not isinstance(actual, dict):
            return False
        keys = set(documented) - {ANY}
        if ANY not in documented and keys != set(actual):
            return False
        return all(k in actual and like(documented[k], actual[k], k) for k in keys)
    if isinstance(documented, list):
        return isinstance(actual, list) and (  # each element is like one of those shown
            not documented or all(any(like(d, a, key) for d in documented) for a in actual)
        )
    if isinstance(documented, bool) or isinstance(actual, bool):
        return type(documented) is type(actual)
    if isinstance(documented, float):
        return isinstance(actual, int | float)
    return type(documented) is type(actual)
