"""Fixtures for podman_env tests (imported by conftest)."""
