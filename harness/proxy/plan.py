"""How faults turn one unit into writes: the plan, decided without I/O.

:func:`plan_unit` takes a unit and the faults that hit it and returns what
the connection then does, in order: the evidence events to log, and the ops
for the direction's :class:`~starttls_harness.proxy.sockets.Pipe` (``write``,
``hold``, ``cork``, ``eof``, ``rst``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from starttls_harness.proxy.faults import (
    ACTION_COALESCE,
    ACTION_CORRUPT,
    ACTION_DELAY,
    ACTION_DROP,
    ACTION_DUPLICATE,
    ACTION_FIN,
    ACTION_INJECT,
    ACTION_RST,
    ACTION_SPLIT,
    Fault,
)
from starttls_harness.proxy.vocabulary import (
    EV_FAULT,
    EV_INJECTED,
    UNIT_EOF,
    UNIT_RECORD,
    UNIT_RESET,
    Unit,
)

__all__ = ["Plan", "PlannedEvent", "plan_unit"]


@dataclass(frozen=True)
class PlannedEvent:
    """An evidence event of the plan (direction and index are the unit's)."""

    kind: str
    detail: str
    data: bytes = b""
    points: Tuple[str, ...] = ()
    action: str = ""


@dataclass
class Plan:
    """What relaying one unit takes: events first, then the pipe's ops."""

    events: List[PlannedEvent] = field(default_factory=list)
    ops: List[Tuple[str, Any]] = field(default_factory=list)
    #: A FIN or RST is among the ops: nothing more goes this way.
    terminated: bool = False


def plan_unit(unit: Unit, faults: Sequence[Fault]) -> Plan:
    """The events, writes (and FIN/RST) that relay ``unit`` under ``faults``."""
    plan = Plan()
    events = plan.events
    ops = plan.ops

    def fault_event(fault: Fault, text: str, data: bytes = b"") -> None:
        events.append(PlannedEvent(EV_FAULT, f"{fault}: {text}", data, (fault.at,), fault.action))

    end = unit.kind in (UNIT_EOF, UNIT_RESET)
    by_action: Dict[str, List[Fault]] = {}
    for fault in faults:
        by_action.setdefault(fault.action, []).append(fault)
    for fault in by_action.get(ACTION_DELAY, []):
        fault_event(fault, f"held for {fault.delay:g} s")
        ops.append(("hold", fault.delay))
    for action, op, what in ((ACTION_FIN, "eof", "FIN"), (ACTION_RST, "rst", "RST")):
        for fault in by_action.get(action, []):
            fault_event(fault, f"{what} sent to the receiver instead of this unit", unit.data)
            plan.terminated = True
            ops.append((op, None))
            return plan
    body: Optional[bytes] = None if end else unit.data
    end_op: Optional[str] = None
    if end:
        end_op = "eof" if unit.kind == UNIT_EOF else "rst"
    for fault in by_action.get(ACTION_CORRUPT, []):
        if body:
            body = _corrupt(body, unit.kind == UNIT_RECORD)
            fault_event(fault, "relayed corrupted", body)
        else:
            fault_event(fault, "nothing to corrupt in this unit")
    before_sep: List[bytes] = []
    before_same: List[bytes] = []
    after_same: List[bytes] = []
    after_sep: List[bytes] = []
    for fault in by_action.get(ACTION_DROP, []):
        if end:
            fault_event(fault, f"{unit.kind.upper()} not relayed")
            end_op = None
        else:
            fault_event(fault, "not relayed", unit.data)
            body = None
        if fault.data:
            after_same.append(fault.data)
            events.append(
                PlannedEvent(
                    EV_INJECTED,
                    f"{fault}: in place of the dropped unit",
                    fault.data,
                    (),
                    fault.action,
                )
            )
    for fault in by_action.get(ACTION_INJECT, []):
        same = fault.same_segment and not end
        target = (
            (before_same if fault.before else after_same)
            if same
            else (before_sep if fault.before or end else after_sep)
        )
        target.append(fault.data)
        where = ("before" if fault.before or end else "after") + (
            " the unit, same segment" if same else " the unit, separate write"
        )
        events.append(PlannedEvent(EV_INJECTED, f"{fault}: {where}", fault.data, (), fault.action))
    writes: List[bytes] = list(before_sep)
    segment = b"".join(before_same) + (body or b"") + b"".join(after_same)
    splits = by_action.get(ACTION_SPLIT, [])
    if segment:
        if splits and len(segment) > 1:
            cut = splits[0].split_at
            cut = max(1, min(len(segment) - 1, cut if cut >= 0 else len(segment) + cut))
            writes += [segment[:cut], segment[cut:]]
            fault_event(splits[0], f"written as {cut} + {len(segment) - cut} bytes")
        else:
            writes.append(segment)
            for fault in splits:
                fault_event(fault, "too short to split")
    for fault in by_action.get(ACTION_DUPLICATE, []):
        if body:
            writes.append(body)
            fault_event(fault, "written twice", body)
        else:
            fault_event(fault, f"a {unit.kind.upper()} cannot be duplicated")
    writes += after_sep
    coalesce = by_action.get(ACTION_COALESCE, [])
    for i, data in enumerate(writes):
        if coalesce and i == len(writes) - 1 and end_op is None:
            bound = coalesce[0].delay or 1.0
            fault_event(
                coalesce[0],
                f"held to share one write with the next unit (at most {bound:g} s)",
            )
            ops.append(("cork", (data, bound)))
        else:
            ops.append(("write", data))
    if end_op is not None:
        if end_op == "eof" or end_op == "rst":
            plan.terminated = True
        ops.append((end_op, None))
    return plan


def _corrupt(data: bytes, record: bool) -> bytes:
    """Flip the last byte of a record (its MAC or AEAD tag), or a line's first."""
    buf = bytearray(data)
    if record:
        buf[-1] ^= 0xFF
    else:
        buf[0] ^= 0x20 if chr(buf[0]).isalpha() else 0x01
    return bytes(buf)
