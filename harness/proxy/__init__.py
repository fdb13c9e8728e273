"""The on-path fault injector: a TCP relay that follows STARTTLS and closure.

Theory of operation
===================

The proxy sits between a client and a server and relays bytes both ways.  It
is split like the engine (principle 1):

* :class:`Follower` is sans-I/O.  It is fed the bytes of each direction as
  they arrive (any chunking) and cuts them into *units*: complete plaintext
  units (cut by the dialect's framer: CRLF lines for the mail dialects),
  complete TLS records, EOF, RST.  It tracks the phase of the
  conversation -- plaintext, ``STARTTLS`` asked and answered, TLS, closure,
  plaintext again -- and tags each unit with the named protocol points
  (:class:`Point`) it marks, so that a fault can be aimed at "the client's
  close_notify" rather than at a byte offset.  Feeding the same stream in
  1-byte chunks or in one lump gives the same units.
* :class:`Proxy` / :class:`ProxyConnection` are the asyncio shell: they read
  from one socket, ask the follower for units, apply the configured
  :class:`Fault` objects to the units they match, and write each unit to the
  other socket as a separate ``transport.write`` (``TCP_NODELAY`` on both
  sockets), unless a fault declares otherwise (``coalesce``, ``split``,
  ``inject`` in the same segment).  Everything is logged as
  :class:`ProxyEvent` objects: every unit received, every fault applied,
  every byte injected, every write -- the evidence of a path scenario.

The package, by responsibility (each module imports only those above it):

=================  ===========================================================
``vocabulary``     protocol points, unit and event kinds, phases, directions
``upgrade``        each dialect's STARTTLS/STOPTLS command and answer readers
``session``        one TLS session's state; how its records are classified
``follower``       the sans-I/O follower (framer seam, phases, points)
``faults``         :class:`Fault`, the ready-made fault table, :func:`parse_fault`
``events``         :class:`ProxyEvent`, :class:`EventNotSeen`
``plan``           how faults turn a unit into writes (sans-I/O)
``sockets``        the two sockets of a connection and their write pipes
``connection``     :class:`ProxyConnection`: relay, evidence log, bounded waits
``relay``          :class:`Proxy`: listen, accept, connect upstream
``console``        :func:`run_proxy`, :func:`format_event`, :func:`parse_address`
=================  ===========================================================
"""

from __future__ import annotations

from starttls_harness.proxy.connection import Address, ProxyConnection
from starttls_harness.proxy.console import format_event, parse_address, run_proxy
from starttls_harness.proxy.events import EventNotSeen, ProxyEvent
from starttls_harness.proxy.faults import ACTIONS, FAULT_NAMES, Fault, parse_fault
from starttls_harness.proxy.follower import Follower
from starttls_harness.proxy.relay import Proxy
from starttls_harness.proxy.vocabulary import (
    C2S,
    DIRECTIONS,
    METHODS,
    POINTS,
    S2C,
    Point,
    Unit,
)

__all__ = [
    "ACTIONS",
    "C2S",
    "DIRECTIONS",
    "FAULT_NAMES",
    "METHODS",
    "POINTS",
    "S2C",
    "Address",
    "EventNotSeen",
    "Fault",
    "Follower",
    "Point",
    "Proxy",
    "ProxyConnection",
    "ProxyEvent",
    "Unit",
    "format_event",
    "parse_address",
    "parse_fault",
    "run_proxy",
]
