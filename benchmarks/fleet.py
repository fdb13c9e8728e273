"""``python -m benchmarks.fleet [DELAY]``: wall time of ``check`` over 1 vs 4 targets.

Four reference servers (two SMTP, two IMAP, ``starttls-harness serve``), each
behind a relay that delays every chunk by DELAY seconds one way (default
0.025: a 50 ms round trip, a server across a WAN).  It times ``check`` on one
target, on all four side by side (``--parallel 4``, the default) and on all
four one after the other (``--parallel 1``).  With DELAY 0 the run is bound by
the harness's CPU (TLS handshakes in one Python process) instead.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from typing import List, Tuple

CLI = [sys.executable, "-m", "starttls_harness"]


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy one direction, each chunk ``delay`` seconds late, order and FIN kept."""
    queue: asyncio.Queue[Tuple[float, bytes]] = asyncio.Queue()

    async def feed() -> None:
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + delay, data))
            if not data:
                return

    async def drain() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))  # the simulated latency
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)

    try:
        await asyncio.gather(feed(), drain())
    except OSError:
        writer.close()


async def _relay(port: int, delay: float) -> Tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _pump(reader, up_writer, delay), _pump(up_reader, writer, delay), return_exceptions=True
        )
        writer.close()
        up_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


async def _check(*args: str) -> Tuple[float, str]:
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *CLI, "check", *args, "-q", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    lines = out.decode().strip().splitlines()
    return time.monotonic() - t0, lines[-1] if lines else f"exit {proc.returncode}"


async def main(delay: float) -> None:
    procs: List[asyncio.subprocess.Process] = []
    relays: List[asyncio.AbstractServer] = []
    urls: List[str] = []
    try:
        for dialect in ("smtp", "smtp", "imap", "imap"):
            proc = await asyncio.create_subprocess_exec(
                *CLI, "serve", dialect, stdout=asyncio.subprocess.PIPE
            )
            procs.append(proc)
            assert proc.stdout is not None
            text = ""
            while "Ctrl-C" not in text:
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                if not line:
                    raise RuntimeError(f"serve {dialect} exited: {text}")
                text += line.decode()
            found = re.search(r"127\.0\.0\.1:(\d+)", text)
            assert found, text
            relay, port = await _relay(int(found.group(1)), delay)
            relays.append(relay)
            urls.append(f"{dialect}://127.0.0.1:{port}")
        print(f"one-way delay {delay * 1000:.0f} ms")
        for label, args in (
            ("1 target (smtp)", [urls[0]]),
            ("1 target (imap)", [urls[2]]),
            ("4 targets, --parallel 4", urls),
            ("4 targets, --parallel 1", [*urls, "--parallel", "1"]),
        ):
            took, tail = await _check(*args)
            print(f"  {label:<26} {took:6.2f} s wall   ({tail})")
    finally:
        for relay in relays:
            relay.close()
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGINT)
                await proc.wait()


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 0.025))
