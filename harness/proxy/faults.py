"""Faults: what the proxy does to the units it relays, and their command-line form.

A :class:`Fault` names a direction, a protocol point, an action and its
parameters; it applies once, at the ``nth`` unit of that direction that marks
that point.  :func:`parse_fault` reads the command-line form, and
:data:`FAULT_NAMES` lists the ready-made names with one line each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

from starttls_harness.proxy.vocabulary import C2S, DIRECTIONS, POINTS, S2C, Point

__all__ = ["ACTIONS", "FAULT_NAMES", "Fault", "escape_bytes", "parse_fault"]

ACTION_INJECT = "inject"
ACTION_DROP = "drop"
ACTION_DELAY = "delay"
ACTION_DUPLICATE = "duplicate"
ACTION_FIN = "fin"
ACTION_RST = "rst"
ACTION_SPLIT = "split"
ACTION_COALESCE = "coalesce"
ACTION_CORRUPT = "corrupt"

#: Every fault action with what it does to the unit it hits.
ACTIONS: Dict[str, str] = {
    ACTION_INJECT: "write data before/after the unit, in its segment or as a separate write",
    ACTION_DROP: "do not relay the unit (data, if given, is written in its place)",
    ACTION_DELAY: "hold this direction for `delay` seconds before the unit",
    ACTION_DUPLICATE: "write the unit twice (two writes)",
    ACTION_FIN: "send FIN to the receiver instead of the unit; relay nothing more this way",
    ACTION_RST: "send RST to the receiver instead of the unit; close the sender",
    ACTION_SPLIT: "write the unit in two writes, cut after `split_at` bytes",
    ACTION_COALESCE: "write the unit in one write together with the next unit",
    ACTION_CORRUPT: "flip bits: a record's last byte (its MAC/tag), a line's first byte",
}


@dataclass(frozen=True)
class Fault:
    """One fault: at the ``nth`` unit of ``direction`` that marks point ``at``,
    do ``action``.

    ``data`` is what ``inject`` writes (and what replaces a dropped unit);
    ``same_segment`` puts injected bytes in the unit's own write;
    ``before`` injects ahead of the unit instead of after it; ``delay`` is
    the hold of ``delay`` (and the bound of ``coalesce``'s wait for a next
    unit; 0 means 1 s); ``split_at`` the cut of ``split`` (negative counts
    from the end).  ``name`` is the ready-made name it came from, if any.
    """

    direction: str
    at: str
    action: str
    data: bytes = b""
    same_segment: bool = True
    delay: float = 0.0
    split_at: int = 1
    nth: int = 1
    before: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"fault direction must be c2s or s2c, not {self.direction!r}")
        if self.at not in POINTS:
            raise ValueError(
                f"unknown protocol point {self.at!r}; valid points: {', '.join(POINTS)}"
            )
        if self.action not in ACTIONS:
            raise ValueError(
                f"unknown fault action {self.action!r}; valid actions: {', '.join(ACTIONS)}"
            )
        if self.nth < 1:
            raise ValueError("nth counts from 1")
        if self.delay < 0:
            raise ValueError("delay must not be negative")
        if self.action == ACTION_INJECT and not self.data:
            raise ValueError("an inject fault needs data")

    def __str__(self) -> str:
        text = f"{self.action}@{self.at}:{self.direction}"
        if self.nth != 1:
            text += f":nth={self.nth}"
        if self.action in (ACTION_DELAY, ACTION_COALESCE) and self.delay:
            text += f":delay={self.delay:g}"
        if self.action == ACTION_SPLIT:
            text += f":split_at={self.split_at}"
        if self.before:
            text += ":before=yes"
        if self.action == ACTION_INJECT and not self.same_segment:
            text += ":same_segment=no"
        if self.data:
            text += f":data={escape_bytes(self.data)}"
        return text


@dataclass(frozen=True)
class _Preset:
    description: str
    action: str
    at: Union[str, Mapping[str, str]]
    direction: Optional[str] = None  # fixed or default direction
    fixed: bool = False
    data: Mapping[str, bytes] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


_INJECT_DATA = {C2S: b"NOOP\r\n", S2C: b"220 injected\r\n"}
_TWO_WAY = None  # direction required

_PRESETS: Dict[str, _Preset] = {
    "drop-close-notify": _Preset(
        "drop the close_notify (data=... is written in its place)",
        ACTION_DROP,
        Point.CLOSE_NOTIFY.value,
    ),
    "delay-close-notify": _Preset(
        "hold the close_notify for delay= seconds (default 0.2)",
        ACTION_DELAY,
        Point.CLOSE_NOTIFY.value,
        options={"delay": 0.2},
    ),
    "duplicate-close-notify": _Preset(
        "send the close_notify record twice", ACTION_DUPLICATE, Point.CLOSE_NOTIFY.value
    ),
    "split-close-notify": _Preset(
        "send the close_notify record in two writes", ACTION_SPLIT, Point.CLOSE_NOTIFY.value
    ),
    "coalesce-close-notify": _Preset(
        "send the close_notify and the next unit in one write",
        ACTION_COALESCE,
        Point.CLOSE_NOTIFY.value,
    ),
    "inject-after-close": _Preset(
        "inject plaintext (data=) in the same segment right after the close_notify",
        ACTION_INJECT,
        Point.CLOSE_NOTIFY.value,
        C2S,
        data=_INJECT_DATA,
    ),
    "inject-after-starttls": _Preset(
        "c2s: plaintext in the STARTTLS segment; s2c: an extra line after the STARTTLS answer",
        ACTION_INJECT,
        {C2S: Point.STARTTLS_COMMAND.value, S2C: Point.STARTTLS_REPLY.value},
        C2S,
        data={C2S: b"NOOP\r\n", S2C: b"250 injected\r\n"},
    ),
    "inject-in-tls": _Preset(
        "plaintext (data=) as a separate segment before the first application record",
        ACTION_INJECT,
        Point.HANDSHAKE_DONE.value,
        data=_INJECT_DATA,
        options={"same_segment": False, "before": True},
    ),
    "truncate": _Preset(
        "FIN to the receiver instead of the first application record (TLS up, no close_notify)",
        ACTION_FIN,
        Point.HANDSHAKE_DONE.value,
    ),
    "reset": _Preset(
        "RST to the receiver instead of the first application record",
        ACTION_RST,
        Point.HANDSHAKE_DONE.value,
    ),
    "corrupt": _Preset(
        "flip the last byte (MAC/tag) of the first application record",
        ACTION_CORRUPT,
        Point.HANDSHAKE_DONE.value,
    ),
    "duplicate-record": _Preset(
        "send the first application record twice (a replay)",
        ACTION_DUPLICATE,
        Point.HANDSHAKE_DONE.value,
    ),
    "drop-fin": _Preset("do not relay the sender's FIN", ACTION_DROP, Point.EOF.value),
    "delay-fin": _Preset(
        "hold the sender's FIN for delay= seconds (default 0.2)",
        ACTION_DELAY,
        Point.EOF.value,
        options={"delay": 0.2},
    ),
    "split-client-hello": _Preset(
        "send the ClientHello record in two writes (split_at=, default 1)",
        ACTION_SPLIT,
        Point.CLIENT_HELLO.value,
        C2S,
        fixed=True,
    ),
    "split-starttls": _Preset(
        "send the STARTTLS command line in two writes",
        ACTION_SPLIT,
        Point.STARTTLS_COMMAND.value,
        C2S,
        fixed=True,
        options={"split_at": 4},
    ),
    "coalesce-starttls-reply": _Preset(
        "send the STARTTLS answer together with the server's next unit",
        ACTION_COALESCE,
        Point.STARTTLS_REPLY.value,
        S2C,
        fixed=True,
    ),
}


def _fault_names() -> Dict[str, str]:
    names: Dict[str, str] = {}
    for name, preset in _PRESETS.items():
        if preset.fixed:
            names[name] = f"{preset.description} ({preset.direction})"
            continue
        default = f"; default {preset.direction}" if preset.direction else "; needs :c2s or :s2c"
        names[name] = preset.description + default
        for direction in DIRECTIONS:
            names[f"{name}-{direction}"] = f"{name} in direction {direction}"
    return names


#: Ready-made fault names (with -c2s/-s2c forms) and what each does.  Any
#: ``ACTION@POINT`` (see :data:`ACTIONS`, :data:`POINTS`) is accepted too.
FAULT_NAMES: Dict[str, str] = _fault_names()

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _unescape(text: str) -> bytes:
    """``\\r``, ``\\n``, ``\\t``, ``\\\\`` and ``\\xNN`` in a command-line value."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\" or i + 1 == len(text):
            out += ch.encode("utf-8")
            i += 1
            continue
        nxt = text[i + 1]
        simple = {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\", "0": b"\0"}
        if nxt in simple:
            out += simple[nxt]
            i += 2
        elif nxt == "x" and i + 4 <= len(text):
            try:
                out.append(int(text[i + 2 : i + 4], 16))
            except ValueError:
                raise ValueError(f"bad \\x escape in {text!r}") from None
            i += 4
        else:
            raise ValueError(f"unknown escape \\{nxt} in {text!r}")
    return bytes(out)


def escape_bytes(data: bytes) -> str:
    """``data`` in the escaped form :func:`parse_fault` reads (and logs print)."""
    out = []
    for byte in data:
        ch = chr(byte)
        if ch == "\r":
            out.append("\\r")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\\":
            out.append("\\\\")
        elif 32 <= byte < 127:
            out.append(ch)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def _valid_names_message() -> str:
    return (
        "valid fault names: "
        + ", ".join(FAULT_NAMES)
        + "; or ACTION@POINT with ACTION in "
        + ", ".join(ACTIONS)
        + " and POINT in "
        + ", ".join(POINTS)
    )


def parse_fault(text: str) -> Fault:
    """Read a fault from its command-line form.

    ``NAME[:c2s|:s2c][:key=value]...`` where NAME is one of
    :data:`FAULT_NAMES` (``drop-close-notify-c2s``, ``truncate:s2c``...) or
    ``ACTION@POINT`` (``delay@close-notify:s2c:delay=0.5``).  Keys: ``data``
    (escapes ``\\r \\n \\t \\\\ \\xNN``; always last, it takes the rest of
    the text, colons included), ``at``, ``nth``, ``delay``, ``split_at``,
    ``same_segment``, ``before``.  Raises ValueError naming what is valid.
    """
    text = text.strip()
    data: Optional[bytes] = None
    marker = text.find(":data=")
    if marker >= 0:
        data = _unescape(text[marker + len(":data=") :])
        text = text[:marker]
    head, *options = text.split(":")
    direction: Optional[str] = None
    values: Dict[str, str] = {}
    for option in options:
        if option in DIRECTIONS:
            if direction is not None and direction != option:
                raise ValueError(f"fault {head!r} given two directions")
            direction = option
        elif "=" in option:
            key, value = option.split("=", 1)
            values[key.strip().replace("-", "_")] = value.strip()
        elif option:
            raise ValueError(
                f"bad fault option {option!r} in {text!r}: expected c2s, s2c or key=value"
            )
    base = head
    for suffix in DIRECTIONS:
        if head.endswith("-" + suffix) and head[: -len(suffix) - 1] in _PRESETS:
            if direction is not None and direction != suffix:
                raise ValueError(f"fault {head!r} given two directions")
            base, direction = head[: -len(suffix) - 1], suffix
    kwargs: Dict[str, Any] = {}
    if "@" in base:
        action, _, at = base.partition("@")
        if action not in ACTIONS or at not in POINTS:
            raise ValueError(f"unknown fault {head!r}; {_valid_names_message()}")
        if direction is None:
            raise ValueError(f"fault {head!r} needs a direction: add :c2s or :s2c")
        name = ""
    else:
        preset = _PRESETS.get(base)
        if preset is None:
            raise ValueError(f"unknown fault {head!r}; {_valid_names_message()}")
        if preset.fixed and direction not in (None, preset.direction):
            raise ValueError(f"fault {base!r} only exists for {preset.direction}")
        direction = direction or preset.direction
        if direction is None:
            raise ValueError(
                f"fault {base!r} needs a direction: add :c2s or :s2c "
                f"(or use {base}-c2s / {base}-s2c)"
            )
        action = preset.action
        at = preset.at if isinstance(preset.at, str) else preset.at[direction]
        kwargs.update(preset.options)
        if data is None and direction in preset.data:
            data = preset.data[direction]
        name = base if preset.fixed else f"{base}-{direction}"
    for key, value in values.items():
        try:
            if key == "at":
                at = value
            elif key in ("nth", "split_at"):
                kwargs[key] = int(value)
            elif key == "delay":
                kwargs[key] = float(value)
            elif key in ("same_segment", "before"):
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError(f"{key} takes yes or no, not {value!r}")
                kwargs[key] = value.lower() in _TRUE
            else:
                raise ValueError(
                    f"unknown fault option {key!r}; options: data, at, nth, delay, split_at, "
                    "same_segment, before"
                )
        except ValueError as exc:
            raise ValueError(f"fault {head!r}: {exc}") from None
    return Fault(direction, at, action, data or b"", name=name, **kwargs)


# ---------------------------------------------------------------- the shell
