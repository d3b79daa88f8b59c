"""Fixtures for edge_env tests (imported by conftest)."""
