"""Command-line parsers whose usage errors are one line (``hipro: error: ...
(see PROG --help)``, exit status 2), for `hipro` and the benchmark entry
points alike: argparse's default prints the whole usage block above the error,
which buries the one line that names the culprit.

This module sits below every layer and imports nothing of the package.
"""
from __future__ import annotations

import argparse


class OneLineUsageParser(argparse.ArgumentParser):
    """argparse.ArgumentParser with one-line usage errors (its subparsers, of
    the parent's class by argparse's default, too)."""

    def error(self, message: str):
        hint = f" (see {self.prog} --help)"
        self.exit(2, f"hipro: error: {' '.join(message.split())}{hint}\n")
