"""The examples in the modules' docstrings run as written (doctest; those marked ``+SKIP`` need data), and so does the
README's ops example."""

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


def test_the_readmes_ops_example_runs_and_gives_the_shapes_its_comments_name():
    import re

    import torch

    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Using the ops"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    claimed = [tuple(int(d) for d in dims.split(","))
               for comment in re.findall(r"#[^\n]*", code) for dims in re.findall(r"\[(\d+(?:, \d+)+)\]", comment)]
    namespace = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md: Using the ops", "exec"), namespace)
    module_out = namespace["conv"](namespace["levels"][0])
    actual = [tuple(t.shape) for t in (*namespace["levels"], namespace["out"])]
    assert claimed == actual
    # The functional form with the module's parameters is the module.
    torch.testing.assert_close(namespace["out"], module_out)


def test_the_readmes_model_example_runs_and_gives_the_shapes_its_comments_name():
    import re

    import torch

    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## The model: HSNet"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    namespace = {}
    exec(compile(code, "README.md: The model: HSNet", "exec"), namespace)
    claimed = {name: tuple(int(d) for d in dims.split(", ")) for name, dims in re.findall(
        r"^\s*(\w+) = [^\n]*#[^\n]*\[(\d+(?:, \d+)+)\]", code, flags=re.M)}
    assert set(claimed) == {"query_img", "logits", "mask", "coarse"}
    assert {name: tuple(namespace[name].shape) for name in claimed} == claimed
    assert set(namespace["labels"].unique().tolist()) <= {0, 7}
    # The one-shot logits are the coarse ones resized to the image, as the comment says.
    resized = torch.nn.functional.interpolate(namespace["coarse"], size=(96, 96), mode="bilinear", align_corners=True)
    torch.testing.assert_close(namespace["logits"], resized)


def test_the_readmes_own_backbone_example_runs_and_gives_the_shape_it_names():
    import textwrap

    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    at = readme.index("class MyBackbone")
    start = readme.rindex("```python\n", 0, at) + len("```python\n")
    code = textwrap.dedent(readme[start:readme.index("```", start)])
    namespace = {}
    exec(compile(code, "README.md: a backbone of your own", "exec"), namespace)
    assert "# [1, 2, 64, 64]" in code and tuple(namespace["logits"].shape) == (1, 2, 64, 64)
    assert not any(p.requires_grad for p in namespace["model"].backbone.parameters())
