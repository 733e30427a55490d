"""pytest wiring for the chart tests: Helm's Go library (see helm_lib.py), loaded once."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helm_lib  # noqa: E402


@pytest.fixture(scope="session")
def helm() -> helm_lib.Helm:
    # No skip on failure: a missing or unloadable library fails every test that needs it.
    return helm_lib.load()
