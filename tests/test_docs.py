"""The examples in the modules' docstrings run as written (doctest; those marked ``+SKIP`` need data)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hypertriton"
MODULES = sorted(
    ".".join(("hypertriton",) + path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py") if ">>> " in path.read_text(encoding="utf-8"))


def test_the_modules_with_examples_are_found():
    assert {"hypertriton.metrics", "hypertriton.modules", "hypertriton.model"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run_as_written(name):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(importlib.import_module(name), optionflags=flags, report=False)
    assert result.failed == 0, (f"{name}: {result.failed} of {result.attempted} examples fail "
                                "(doctest.testmod on the module shows them)")
