"""Whole lines to stdout from several threads: launch's own lines ("splitserve ready on ...", which
tools parse) and its openai-server child's forwarded output must not cut into each other. `print`
writes the text and the newline as two writes, so another thread's line could land between them."""

from __future__ import annotations

import sys
import threading

_lock = threading.Lock()


def print_line(line: str) -> None:
    """Writes `line` and a newline as one piece, then flushes; OSError/ValueError (stdout closed) pass
    through to the caller."""
    with _lock:
        sys.stdout.write(line if line.endswith("\n") else line + "\n")
        sys.stdout.flush()
