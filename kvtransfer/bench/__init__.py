"""``kvtransfer bench``: transfers between two processes (or two network namespaces), byte-
verified, kvtransfer and its peers side by side in one run, with the machine's limits."""

from .cli import main

__all__ = ["main"]
