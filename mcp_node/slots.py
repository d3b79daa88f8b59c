"""A start-first replace's slot keys, alone in a leaf module: the runtimes name their
workloads by them and the network plan numbers them, and neither may import the other.

A start-first replace (issue 19) runs the new workload beside the current one under
the component's key with a slot: ``web.next``; once new connections go to it, it is
promoted (``Runtime.promote``) and the replaced one drains as ``web.old``. Names cannot
hold a dot, so no component's key is another's slot key. A slot key is in no registry
record: left over by a crash, it is an orphan reconcile removes.
"""

from __future__ import annotations

NEXT = "next"
OLD = "old"


def side_key(component: str, slot: str) -> str:
    return f"{component}.{slot}" if slot else component


def split_key(key: str) -> tuple[str, str]:
    """(component, slot) of a workload key; slot "" for the component's own workload."""
    component, _, slot = key.partition(".")
    return component, slot


def slot_of(name: str) -> str:
    """The slot a workload's name (or VM dir name) ends in, "" for none."""
    slot = name.rpartition(".")[2] if "." in name else ""
    return slot if slot in (NEXT, OLD) else ""
