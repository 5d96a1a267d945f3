"""What a vLLM server's log says went wrong: its first traceback whole, before the tail that
only shows the server exiting."""

from __future__ import annotations

TRACEBACK_LINES = 150
TRACEBACK = "Traceback (most recent call last)"
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def first_traceback(lines: list[str]) -> list[str]:
    """The log's first Python traceback, chained exceptions included. vLLM's processes prefix
    their lines ("(EngineCore_0 pid=7) "): lines without the traceback's prefix are another
    process's, interleaved, and skipped."""
    start = next((i for i, ln in enumerate(lines) if TRACEBACK in ln), None)
    if start is None:
        return []
    prefix = lines[start].split(TRACEBACK)[0]
    own = [ln for ln in lines[start:] if ln.startswith(prefix)][:TRACEBACK_LINES]
    out: list[str] = []
    for i, ln in enumerate(own):
        out.append(ln)
        body = ln[len(prefix):]
        if not body.strip() or body[0].isspace() or body.startswith((TRACEBACK, *CHAINED)):
            continue
        # The exception's own line: the traceback ends here unless another is chained to it.
        after = next((x[len(prefix):] for x in own[i + 1:] if x[len(prefix):].strip()), "")
        if not after.startswith(CHAINED):
            break
    return out


def log_excerpt(lines: list[str], n: int = 40) -> str:
    """The first traceback whole (a worker's failure is the root cause, logged long before the
    server's own exit buries it), the first error lines, and the last ``n`` lines."""
    errors = [ln for ln in lines if " ERROR " in ln or ln.startswith(("Error", "RuntimeError"))]
    return "\n".join(["--- first traceback ---", *first_traceback(lines), "--- first errors ---",
                      *errors[:12], f"--- last {n} lines ---", *lines[-n:]])
