"""Helpers the tests share (fixtures are in conftest.py, helpers here)."""
