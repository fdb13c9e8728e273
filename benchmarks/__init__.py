"""Benchmarks of the harness: the bare-``ssl`` floor, the engine and its
asyncio adapter, the full catalogue against the reference peers, and the
proxy's added latency.

Run everything with ``python -m benchmarks`` from the repository root (see
``benchmarks/README.md`` for the options, the targets and the last results).
Nothing here is part of the test suite.
"""
