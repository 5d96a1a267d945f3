"""The ``kvtransfer`` command: ``bench`` (transfer benchmarks, peers side by side), ``doctor``
(what this host's fabrics offer and what kvtransfer would pick), ``demo``."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "bench": ("kvtransfer.bench", "transfer benchmarks: kvtransfer and its peers, side by side"),
    "doctor": ("kvtransfer.doctor", "libfabric providers, verbs devices, what kvtransfer picks"),
    "demo": ("kvtransfer.demo", "a prefill process writes 512 MiB into a decode endpoint"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvtransfer", description=__doc__)
    parser.add_argument("command", choices=sorted(COMMANDS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in sorted(COMMANDS.items())))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
