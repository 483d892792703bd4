"""Text another party chose, made inert for a terminal. Pure.

Task types, queue names, payloads, results, error messages and tracebacks,
worker names and host names, key names: whoever submits a task or runs a
worker chooses them, and the CLI and the console show them to an operator.
Raw, an escape sequence in such a string is obeyed by the terminal (an
OSC 8 hyperlink, a cleared screen, a retitled window, rewritten lines) and a
bidirectional override reorders what follows it. ``inert`` replaces every
such character with a visible escape, so the text shows as what it is:

    ESC (0x1b)                        -> \\x1b
    other C0 controls, DEL, C1        -> \\xNN    (\\n and \\t kept only when multiline)
    bidi controls (U+061C, U+200E/F,
    U+202A-U+202E, U+2066-U+2069)     -> \\uNNNN
    line/paragraph separators (U+2028/9) -> \\uNNNN

Everything else is unchanged, and ``inert`` of an inert string is itself
(applying it twice is harmless). Markup is the renderer's business: the CLI
and the console put inert text into ``rich.text.Text`` objects, which are
never parsed for markup, so ``[link=...]`` or ``[red]`` show literally.
Machine output (JSON, JSON lines, YAML) is not passed through here: JSON
escapes control characters itself and must stay exact.
"""

from __future__ import annotations

import re

_BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_SEPARATORS = "\u2028\u2029"
_ONE_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}{_SEPARATORS}]")
_MULTILINE = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}{_SEPARATORS}]")  # keeps \t \n


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def inert(value: object, multiline: bool = False) -> str:
    """``value`` as text a terminal shows and never obeys (see the module docstring);
    None is the empty string. ``multiline`` keeps newlines and tabs."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return (_MULTILINE if multiline else _ONE_LINE).sub(_visible, text)
