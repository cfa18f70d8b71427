"""Runs every docstring example in the jaxkd package."""

import doctest
import importlib
import pkgutil

import pytest

import jaxkd


def _modules():
  names = ["jaxkd"]
  for info in pkgutil.walk_packages(jaxkd.__path__, prefix="jaxkd."):
    names.append(info.name)
  return sorted(names)


@pytest.mark.parametrize("module_name", _modules())
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  result = doctest.testmod(
      module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False
  )
  assert result.failed == 0, f"{result.failed} example(s) failed in {module_name}"
