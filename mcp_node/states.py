"""Component states: a leaf module that imports nothing from the project.

The values are the strings stored in SQL and shown in JSON; a ``StrEnum``
compares equal to them, so rows and replies keep their shape.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"   # exists, not running (exited, created, powered off)
    MISSING = "missing"   # the runtime has no such workload
    UNKNOWN = "unknown"   # the runtime could not be asked
    BACKOFF = "backoff"   # exited; the agent restarts it after a growing delay
    STARTING = "starting" # running, its readiness check not passed yet
    UNHEALTHY = "unhealthy"  # running, its check failed check_failures times in a row


RUNNING = State.RUNNING
STOPPED = State.STOPPED
MISSING = State.MISSING
UNKNOWN = State.UNKNOWN
BACKOFF = State.BACKOFF
STARTING = State.STARTING
UNHEALTHY = State.UNHEALTHY
