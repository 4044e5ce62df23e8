"""Fixtures shared with tests/flows: a small registered champion to aim bad inputs at."""

from tests.flows.conftest import small_champion  # noqa: F401 - a fixture, used by name
