"""One XMPP session with slixmpp: STARTTLS required, certificate checked, a receipted message.

slixmpp is told to use STARTTLS only (no direct TLS, no plaintext: its
``enable_plaintext`` is off, so a stream without STARTTLS is given up); it
checks the certificate against the run's CA and the JID's domain
(``localhost``).  The session logs in as the test user, sends one chat
message to itself with a delivery receipt request (XEP-0184) and waits for
the receipt, then disconnects.  Exit 0 when the receipt came, 1 otherwise
(with one line on stderr); every wait is bounded by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Optional

import slixmpp  # type: ignore[import-untyped, import-not-found, unused-ignore]

JID = "tester@localhost"
PASSWORD = "correct horse"


class Sender(slixmpp.ClientXMPP):  # type: ignore[misc, unused-ignore]
    """Logs in, sends one receipted message, reports how it ended."""

    def __init__(self, cafile: str) -> None:
        super().__init__(JID, PASSWORD)
        self.enable_direct_tls = False
        self.enable_starttls = True
        self.enable_plaintext = False
        self.ca_certs = Path(cafile)
        self.register_plugin("xep_0184")  # message delivery receipts
        self.outcome: asyncio.Future[Optional[str]] = asyncio.get_event_loop().create_future()
        self.add_event_handler("session_start", self._start)
        self.add_event_handler("receipt_received", self._receipt)
        self.add_event_handler("failed_auth", lambda _e: self._end("authentication failed"))
        self.add_event_handler("disconnected", lambda _e: self._end("disconnected"))
        self.add_event_handler("connection_failed", lambda e: self._end(f"connection failed: {e}"))

    def _end(self, why: Optional[str]) -> None:
        if not self.outcome.done():
            self.outcome.set_result(why)

    async def _start(self, _event: object) -> None:
        message = self.make_message(mto=JID, mbody="sent by slixmpp under TLS", mtype="chat")
        message["request_receipt"] = True
        message.send()

    def _receipt(self, _message: object) -> None:
        self._end(None)


async def session(host: str, port: int, cafile: str, timeout: float) -> Optional[str]:
    client = Sender(cafile)
    client.connect(host, port)
    try:
        return await asyncio.wait_for(asyncio.shield(client.outcome), timeout)
    except asyncio.TimeoutError:
        return f"nothing decisive within {timeout:g} s"
    finally:
        client.disconnect(wait=0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--timeout", type=float, default=4.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    failure = asyncio.run(session(args.host, args.port, args.cafile, args.timeout))
    if failure is not None:
        print(f"slixmpp: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
