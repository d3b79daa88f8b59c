"""Fixtures for qemu_env tests (imported by conftest)."""
