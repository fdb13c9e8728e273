"""starttls-harness: test STARTTLS upgrades and the return to plaintext.

The package is layered:

* :mod:`starttls_harness.tls.engine` -- the sans-I/O STARTTLS/closure engine (bytes in,
  bytes and events out) built on ``ssl.SSLObject`` and two ``MemoryBIO``.
* :mod:`starttls_harness.tls.states` -- the one transition table the engine obeys.
* :mod:`starttls_harness.tls.aio` -- the asyncio adapter (a transport that can switch TLS
  on and off any number of times on one TCP connection).
* :mod:`starttls_harness.tls.certs` -- throwaway CAs and certificates (trustme).
"""

__version__ = "0.1.0"
