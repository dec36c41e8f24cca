"""The public API: what the docs import exists, is in ``__all__`` and is documented."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

import asyncworker
import asyncworker.middlewares
import asyncworker.testing
import asyncworker.utils

MODULES = [asyncworker, asyncworker.middlewares, asyncworker.testing, asyncworker.utils]
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_public_name_exists_and_has_a_docstring(module: ModuleType) -> None:
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{module.__name__}.{name} has no docstring"


def test_names_the_docs_use_are_exported() -> None:
    for name in ("HandlerTimeout", "Batch", "StartupError", "JsonFormatter", "configure_logging"):
        assert name in asyncworker.__all__
    assert {"AckRequeue", "Action", "Logging", "Retry", "Timeout", "Timing"} <= set(
        asyncworker.middlewares.__all__
    )
    assert {"TestClient", "MemoryBroker", "QueueStats"} <= set(asyncworker.testing.__all__)
    assert asyncworker.HandlerTimeout.__module__ == "asyncworker._exceptions"


def test_the_docs_import_only_public_names() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pattern = re.compile(r"from (asyncworker[\w.]*) import ([\w, ()]+)")
    modules = {m.__name__: m for m in MODULES}
    for page in pages:
        text = page.read_text()
        for module_name, names in pattern.findall(text):
            assert module_name in modules, f"{page.name} imports from {module_name}"
            for name in re.findall(r"\w+", names):
                assert name in modules[module_name].__all__, f"{page.name}: {module_name}.{name}"
        assert "asyncworker._" not in text, f"{page.name} names a private module"
