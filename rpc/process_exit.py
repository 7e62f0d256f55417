"""End a process once its work is written, skipping the interpreter's teardown.

duckdb (Feast's offline store, via ibis) is a nanobind extension: after it has been used, the
interpreter's teardown prints ~80 "nanobind: leaked instance/function/type ..." lines to stderr.
They are about duckdb's own module shutdown (upstream, harmless) but they are the last thing an
operator reads in a service's log or a newcomer in a terminal. Callers have closed what they own
(servers stopped, event log and stores closed) before calling this; logging and stdio are flushed
here, then `os._exit`, which runs no atexit handlers and no module teardown.
"""

from __future__ import annotations

import logging
import os
import sys


def exit_without_teardown(code: int = 0) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
