"""The rayssl error behind Ray's wrapping of it (a failed training worker, a Ray Data task)."""

from __future__ import annotations

import re


def find_cause(err: BaseException | None, cls: type[BaseException], line: str,
               depth: int = 0) -> BaseException | None:
    """The ``cls`` error behind ``err``: by type in its causes and Ray Train's worker failures,
    else rebuilt from its one line, matched by the regex ``line`` (group 1), in their text."""
    if err is None or depth > 8:
        return None
    if isinstance(err, cls):
        return err
    inner = [err.__cause__, err.__context__, getattr(err, "cause", None)]
    failures = getattr(err, "worker_failures", None)
    inner += list(failures.values()) if isinstance(failures, dict) else []
    for e in inner:
        if isinstance(e, BaseException) and e is not err and (found := find_cause(e, cls, line, depth + 1)):
            return found
    match = re.search(line, str(err))
    return cls(match.group(1)) if match else None
