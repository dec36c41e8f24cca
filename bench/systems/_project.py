"""What this project's asyncworker runners share (``*_asyncworker.py``).

Runs in the project venv, or a ``--baseline`` ref's venv: only API that every
asyncworker has since its first commit is used here.
"""

from __future__ import annotations

import argparse
from typing import Any

from asyncworker import App


def make_app(args: argparse.Namespace, **kwargs: Any) -> App:
    """The App of every runner: the broker of ``args``, ``prefetch_count=256``."""
    return App(
        host=args.host,
        port=args.port,
        user=args.user,
        password=args.password,
        prefetch_count=256,
        **kwargs,
    )
