"""Fixtures for server_env tests (imported by conftest)."""
