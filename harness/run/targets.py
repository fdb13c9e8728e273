"""Clients under test: the reference clients and any external command.

A :class:`ClientTarget` is something the harness can launch against its
scripted server (:mod:`starttls_harness.run.client`): ``run(host, port, cafile,
tls_version)`` starts one client session against that address, trusting the
CA in ``cafile``, and returns a :class:`ClientOutcome` -- whether the client
*reported* success.  Verdicts are mostly decided from what the client does
on the wire; the outcome decides the truncation scenario (R6: a client must
report a cut reply) and is kept as evidence everywhere else.

Two kinds:

* :class:`ReferenceClientTarget` runs :class:`clients.smtp.SMTPClient` or
  :class:`clients.imap.ImapClient` (in any of their ``BEHAVIOURS``) through a
  fixed session: connect, EHLO/CAPABILITY, STARTTLS (``require_tls=True``),
  EHLO/CAPABILITY again, login, then -- if STOPTLS is offered -- ``cycles``
  times STOPTLS + EHLO/CAPABILITY + STARTTLS + login, a mail / APPEND, and
  QUIT/LOGOUT.
* :class:`CommandClientTarget` runs an external program; ``{host}``,
  ``{hostname}``, ``{port}``, ``{cafile}``, ``{tls_version}`` and ``{cycles}``
  in its argv are replaced (``{port}`` is required: every run has a new
  port).  Its exit status decides the outcome; stdout/stderr are kept
  (bounded) and their tails are evidence.  The process is killed when the
  scenario is over.

:func:`starttls_harness.run.client_checks.check_client` is what ``starttls-harness
check-client`` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Awaitable, Callable, List, Mapping, Optional, Sequence, Tuple

from starttls_harness.dialects import dialect_named
from starttls_harness.dialects.roles import ClientOutcome, SessionPlan, failed
from starttls_harness.run.reference import reference_client_module
from starttls_harness.run.server import RunSettings
from starttls_harness.tls.aio import Timeouts
from starttls_harness.tls.certs import client_context, shared_client_context

__all__ = [
    "FOLLOW_SERVER",
    "HOSTNAME",
    "MESSAGE",
    "PASSWORD",
    "USER",
    "ClientOutcome",
    "ClientTarget",
    "CommandClientTarget",
    "MissingPortPlaceholder",
    "ReferenceClientTarget",
    "client_behaviours",
    "require_port_placeholder",
]

#: The test user the reference session logs in with (any user is accepted).
USER, PASSWORD = "tester", "correct horse"
SENDER, RECIPIENT = "client@harness.invalid", "postmaster@harness.invalid"
MESSAGE = b"Subject: starttls-harness\r\n\r\nA message from the client under test.\r\n"

#: The bounds used when a caller gives none.
DEFAULT_SETTINGS = RunSettings()

#: How much of an external client's stdout/stderr is kept as evidence.
OUTPUT_LIMIT = 64 * 1024


RunClient = Callable[[str, int, Path, str], Awaitable[ClientOutcome]]


class ClientTarget:
    """A client under test (see the module docstring).

    ``run(host, port, cafile, tls_version)`` runs one session.  A target that
    can be told how many STOPTLS cycles to make (the positive control asks
    for several) overrides :meth:`asking_for_cycles` and sets
    ``accepts_cycles``.
    """

    accepts_cycles = False

    def __init__(
        self,
        dialect: str,
        run: RunClient,
        label: str,
        *,
        tls_versions: Tuple[str, ...] = ("1.2", "1.3"),
    ) -> None:
        self.dialect = dialect_named(dialect).name
        self.run = run
        self.label = label
        self.tls_versions = tls_versions

    def asking_for_cycles(self, cycles: int) -> ClientTarget:
        """The same client asked for ``cycles`` STOPTLS cycles (default: self)."""
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.dialect} {self.label}>"


# ------------------------------------------------------- reference clients


#: TLS versions that mean "whatever the server offers" (1.2 or 1.3): the
#: reference client run by ``starttls-harness client`` without
#: ``--tls-version`` follows the scenario's version this way.
FOLLOW_SERVER = frozenset({"", "auto", "any"})


class ReferenceClientTarget(ClientTarget):
    """The project's reference client in one of its behaviours.

    ``run(..., tls_version)`` pins the client to that version; a version in
    :data:`FOLLOW_SERVER` leaves it free (1.2 or 1.3, whichever the server
    speaks), so a scenario pinned to TLS 1.2 is not lost to a client pinned
    to 1.3.  ``keylog``: append the TLS secrets there (what ``SSLKEYLOGFILE``
    means to other clients), so a proxy or a capture can decrypt.
    """

    accepts_cycles = True

    def __init__(
        self,
        dialect: str,
        behaviour: str = "strict",
        *,
        cycles: int = 1,
        timeout: float = 5.0,
        tls_versions: Tuple[str, ...] = ("1.2", "1.3"),
        keylog: Optional[Path] = None,
    ) -> None:
        if behaviour not in client_behaviours(dialect):
            choices = ", ".join(client_behaviours(dialect))
            raise ValueError(f"unknown {dialect} client behaviour {behaviour!r}; use {choices}")
        self.behaviour = behaviour
        self.cycles = cycles
        self.timeout = timeout
        self.keylog = keylog
        session = reference_client_module(dialect).reference_session
        label = f"reference {dialect} client ({behaviour})"

        async def run(host: str, port: int, cafile: Path, tls_version: str) -> ClientOutcome:
            pinned = None if tls_version in FOLLOW_SERVER else tls_version
            if keylog is None:
                context = shared_client_context(pinned, cafile)
            else:  # a context of its own: the shared ones write no key log
                context = client_context(pinned, keylog, cafile=cafile)
            plan = SessionPlan(
                host=host,
                port=port,
                tls_context=context,
                behaviour=self.behaviour,
                timeout=self.timeout,
                timeouts=self.timeouts(),
                cycles=self.cycles,
                user=USER,
                password=PASSWORD,
                sender=SENDER,
                recipient=RECIPIENT,
                message=MESSAGE,
            )
            try:
                outcome: ClientOutcome = await session(plan)
            except Exception as exc:  # the session reports, never raises
                return failed(exc)
            return outcome

        super().__init__(dialect, run, label, tls_versions=tls_versions)

    def asking_for_cycles(self, cycles: int) -> ClientTarget:
        return ReferenceClientTarget(
            self.dialect,
            self.behaviour,
            cycles=cycles,
            timeout=self.timeout,
            tls_versions=self.tls_versions,
            keylog=self.keylog,
        )

    def timeouts(self) -> Timeouts:
        return Timeouts(handshake=self.timeout, closure=self.timeout, connect=self.timeout)


def client_behaviours(dialect: str) -> List[str]:
    """The behaviour names of the reference client of ``dialect``."""
    return list(reference_client_module(dialect).BEHAVIOURS)


# ------------------------------------------------------- external commands

_PLACEHOLDERS = ("{host}", "{hostname}", "{port}", "{cafile}", "{tls_version}", "{cycles}")

#: The DNS name the scripted server's certificate is issued to (CN and SAN),
#: for clients that check names but not IP addresses: ``{hostname}``.
HOSTNAME = "localhost"

#: Words that mark the line of a client's output that carries its error.
_ERROR_WORDS = (
    "error",
    "fail",
    "refus",
    "denied",
    "invalid",
    "unexpected",
    "weird",
    "abort",
    "cannot",
    "can't",
    "could not",
    "unable",
    "timed out",
    "timeout",
    "reset",
    "injection",
    "exception",
)


class MissingPortPlaceholder(ValueError):
    """A client command without ``{port}``: it cannot reach the fake server.

    Every scenario run listens on a new port, so a command that does not take
    it would connect elsewhere (or nowhere) in every run; this is a usage
    error, raised before anything runs (the CLI reports it as one line, exit 2).
    """


def require_port_placeholder(argv: Sequence[str]) -> None:
    """Raise :class:`MissingPortPlaceholder` unless some argument has ``{port}``."""
    if not any("{port}" in a for a in argv):
        raise MissingPortPlaceholder(
            "the client command has no {port}: every run listens on a new port, "
            "so pass it to the client (e.g. --port {port})"
        )


def error_line(output: bytes) -> str:
    """The line of a client's output that carries its error (else its last line).

    Clients often end with advice ("see --help", "try again later"); the
    line that names the failure comes before it.  Searched from the end.
    """
    lines = [ln.strip() for ln in output.decode("utf-8", "replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        lowered = line.lower()
        if any(word in lowered for word in _ERROR_WORDS):
            return line
    return lines[-1] if lines else ""


class CommandClientTarget(ClientTarget):
    """An external client program; its exit status is its outcome.

    ``argv`` placeholders: ``{host}`` (the address), ``{hostname}`` (the DNS
    name of the certificate, :data:`HOSTNAME`), ``{port}`` (required:
    :class:`MissingPortPlaceholder`), ``{cafile}``, ``{tls_version}`` and
    ``{cycles}`` (plain text replacement, so braces elsewhere -- in a Python
    one-liner, say -- are left alone).  ``timeout``
    bounds one run; the process is killed (with its process group) when the
    run ends or is cancelled.
    """

    def __init__(
        self,
        dialect: str,
        argv: Sequence[str],
        *,
        label: Optional[str] = None,
        timeout: float = 30.0,
        env: Optional[Mapping[str, str]] = None,
        cycles: int = 1,
        tls_versions: Tuple[str, ...] = ("1.2", "1.3"),
    ) -> None:
        if not argv:
            raise ValueError("the client command is empty")
        require_port_placeholder(argv)
        self.argv = list(argv)
        self.timeout = timeout
        self.env = dict(env) if env is not None else None
        self.cycles = cycles
        self.accepts_cycles = any("{cycles}" in a for a in self.argv)
        super().__init__(
            dialect, self._run, label or " ".join(self.argv), tls_versions=tls_versions
        )

    def asking_for_cycles(self, cycles: int) -> ClientTarget:
        if not self.accepts_cycles:
            return self
        return CommandClientTarget(
            self.dialect,
            self.argv,
            label=self.label,
            timeout=self.timeout,
            env=self.env,
            cycles=cycles,
            tls_versions=self.tls_versions,
        )

    def expand(self, host: str, port: int, cafile: Path, tls_version: str) -> List[str]:
        values = dict(
            zip(
                _PLACEHOLDERS,
                (host, HOSTNAME, str(port), str(cafile), tls_version, str(self.cycles)),
            )
        )
        out = []
        for arg in self.argv:
            for key, value in values.items():
                arg = arg.replace(key, value)
            out.append(arg)
        return out

    async def _run(self, host: str, port: int, cafile: Path, tls_version: str) -> ClientOutcome:
        argv = self.expand(host, port, cafile, tls_version)
        env = None
        if self.env is not None:
            env = {**os.environ, **self.env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            return ClientOutcome(False, f"cannot start {argv[0]!r}: {exc}")
        assert proc.stdout is not None and proc.stderr is not None
        out, err = bytearray(), bytearray()
        readers = [
            asyncio.ensure_future(_drain(proc.stdout, out)),
            asyncio.ensure_future(_drain(proc.stderr, err)),
        ]
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), self.timeout)
            except asyncio.TimeoutError:
                timed_out = True
            _kill(proc)
            # The pipes end with the process group; bounded in case a
            # grandchild escaped the group and holds them open.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*readers), 2.0)
        finally:
            _kill(proc)
            for reader in readers:
                reader.cancel()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(proc.wait(), 2.0)
        status = proc.returncode
        if timed_out:
            detail = f"killed after {self.timeout:g} s"
        else:
            detail = f"exit status {status}"
            said = error_line(bytes(err)) or error_line(bytes(out))
            if said:
                detail += f": {said[:300]}"
        return ClientOutcome(
            ok=(status == 0 and not timed_out),
            detail=detail,
            exit_status=status,
            stdout=bytes(out),
            stderr=bytes(err),
        )


async def _drain(stream: asyncio.StreamReader, sink: bytearray) -> None:
    """Read a pipe to its end, keeping the first OUTPUT_LIMIT bytes."""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        room = OUTPUT_LIMIT - len(sink)
        if room > 0:
            sink += chunk[:room]


def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the process we started and its process group (start_new_session)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
