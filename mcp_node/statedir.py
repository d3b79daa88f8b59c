"""Where the agent keeps its state by default, alone in a leaf module: ``mcp`` looks for
the agent's token there on every call without a token file, and importing the agent's
configuration (config.py) for it cost the call ~10 ms."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mcp"
