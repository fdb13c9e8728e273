"""The ``starttls-harness`` command (``main``); see :mod:`.app` for the parser.

Modules: ``app`` (parser, ``main``), ``common`` (exit codes, option checks),
``output`` (progress, pipes), ``checks`` (``check``, ``check-client``),
``tools`` (``serve``, ``client``, ``proxy``, ``behaviours``, ``scenarios``,
``states``).
"""

from starttls_harness.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
