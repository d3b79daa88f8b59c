"""The node's health, judged from one monitor round: healthy, or degraded with reasons.

Pure, so every reason can be tested on a made-up view. A reason is a sentence
an operator can act on; the list is empty exactly when the node is healthy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .monitor import View
from .runtime import DEFAULT_RUNTIME, split_key
from .states import RUNNING


@dataclass
class Inputs:
    """What health looks at besides the view."""

    node: str
    runtimes: Mapping[str, dict[str, Any]]         # name -> info (available, reason, ...)
    runtime_reasons: list[str] = field(default_factory=list)
    spec_drift: list[str] = field(default_factory=list)       # service/component
    held_down: list[str] = field(default_factory=list)        # left down by restart policy
    host_paths: list[str] = field(default_factory=list)       # held down: "svc/comp: why"
    edge_reasons: list[str] = field(default_factory=list)
    edge_routes: int = 0
    monitor_error: str = ""
    state_dir: list[str] = field(default_factory=list)       # stateprobe: full, read-only
    # (service, component) of start-first replaces in flight: their slot workloads
    # (``web.next``, ``web.old``) are the replace's, no orphans
    replacing: frozenset[tuple[str, str]] = frozenset()


def compute(view: View, inp: Inputs) -> dict[str, Any]:
    used = {c.defn.runtime for s in view.records for c in s.components}
    reasons = [f"{name} runtime: {why}" for name, why in sorted(view.errors.items())
               if name == DEFAULT_RUNTIME or name in used]
    reasons.extend(inp.runtime_reasons)
    reasons.extend(inp.state_dir)
    drifted = [f"{svc}/{comp}" for svc, comp in view.drifted]
    if drifted:
        reasons.append("drifted: " + ", ".join(drifted))
    if inp.spec_drift:
        reasons.append("differs from its definition (spec drift): " + ", ".join(inp.spec_drift))
    orphans = [f"{w.service}/{w.component} ({w.runtime})" for w in view.orphans
               if not (split_key(w.component)[1]
                       and (w.service, split_key(w.component)[0]) in inp.replacing)]
    if orphans:
        reasons.append("orphans (ours, no service owns them): " + ", ".join(orphans))
    flapping = sorted(f"{s}/{c}" for s, c in view.flapping)
    if flapping:
        reasons.append("flapping: " + ", ".join(flapping))
    if inp.held_down:
        reasons.append("down, not restarted by policy: " + ", ".join(inp.held_down))
    reasons.extend(f"held down, a volume's host path fails the volume roots check: {h}"
                   for h in inp.host_paths)
    if inp.monitor_error:
        reasons.append(f"monitor: {inp.monitor_error}")
    reasons.extend(inp.edge_reasons)
    return {
        "status": "degraded" if reasons else "healthy",
        "node": inp.node,
        "version": __version__,
        "containers": sum(1 for w in view.workloads.values() if w.state == RUNNING),
        "services": len(view.records),
        "drifted": drifted,
        "spec_drift": inp.spec_drift,
        "orphans": orphans,
        "replacing": sorted(f"{s}/{c}" for s, c in inp.replacing),
        "flapping": flapping,
        "runtimes": dict(inp.runtimes),
        "edge_routes": inp.edge_routes,
        "reasons": reasons,
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(view.refreshed_at))
        if view.refreshed_at else None,
    }
