"""Entry point of the ``specserve`` console script and ``python -m specserve``."""

from __future__ import annotations

import argparse
import os
import sys

from specserve import __version__
from specserve.cli import generate, serve
from specserve.errors import SpecserveError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 2, like argparse, without usage spam
        self.exit(2, f"specserve: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specserve", description="Low-latency LLM serving with speculative token trees.")
    parser.add_argument("--version", action="version", version=f"specserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    generate.add_parser(subparsers)
    serve.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SpecserveError as exc:
        print(f"specserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug, not the user's fault: still one line unless asked for more
        if os.environ.get("SPECSERVE_DEBUG"):
            raise
        print(
            f"specserve: internal error: {type(exc).__name__}: {exc} "
            "(set SPECSERVE_DEBUG=1 for the traceback and please report it)",
            file=sys.stderr,
        )
        return 1
