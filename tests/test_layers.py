"""The layers of tcm_kernels: base <- kernels (reference, triton) <- ops <- modules (nn, experimental) <- package.

Static (AST) check of every import, function-level ones included; the graph is printed by
``python -m tests.import_graph``.
"""

import ast

import pytest

from tests import import_graph as ig


def test_every_module_has_a_layer():
    for name in ig.graph():
        ig.layer_of(name)


def test_no_upward_or_sibling_import():
    assert ig.violations(ig.graph()) == []


def test_no_import_cycle():
    assert ig.cycles(ig.graph()) == []


def test_checks_catch_a_function_level_upward_import():
    """The walker sees an import inside a function, resolves relative names, and flags it."""
    source = "def f():\n    from ..ops.submconv import submanifold_conv\n"
    node = ast.parse(source).body[0].body[0]
    targets = ig._resolve("tcm_kernels.triton.submconv", False, node, ig.modules())
    assert targets == ["tcm_kernels.ops.submconv"]
    edges = {"tcm_kernels.triton.submconv": set(targets), "tcm_kernels.ops.submconv": set()}
    assert ig.violations(edges) == ["tcm_kernels.triton.submconv (kernels) -> tcm_kernels.ops.submconv (ops): "
                                    "upward import"]


@pytest.mark.parametrize("edges, expected", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_cycle_finder(edges, expected):
    assert ig.cycles(edges) == expected


def test_sibling_kernel_packages_are_flagged():
    edges = {"tcm_kernels.triton.sample_mask": {"tcm_kernels.reference.sample_mask"},
             "tcm_kernels.reference.sample_mask": set()}
    assert len(ig.violations(edges)) == 1


@pytest.mark.parametrize("name, home", [("transposed_kernel", "tcm_kernels._core.geometry"),
                                        ("space_to_depth", "tcm_kernels._core.geometry"),
                                        ("is_patch_aligned", "tcm_kernels.experimental"),
                                        ("prefer_patch_path", "tcm_kernels.experimental"),
                                        ("submanifold_conv_compact", "tcm_kernels")])
def test_moved_names_still_resolve_with_a_warning(name, home):
    import importlib

    from tcm_kernels.ops import submconv

    with pytest.warns(DeprecationWarning, match=f"use {home}.{name}"):
        moved = getattr(submconv, name)
    assert moved is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError):
        submconv.no_such_name  # noqa: B018
