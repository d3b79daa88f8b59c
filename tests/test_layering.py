"""The shape of the package (issue 17): no import cycle, TYPE_CHECKING and lazy
imports included, and runtime names spelled only by the runtimes themselves."""

from __future__ import annotations

import ast
from pathlib import Path

from mcp_node.runtime import RUNTIME_NAMES, RUNTIMES, TRAITS, load_runtime

PKG = Path(__file__).resolve().parent.parent / "mcp_node"

# Where a runtime's name may be spelled: the runtime interface and each runtime's modules.
RUNTIME_MODULES = {"runtime", "runtimenames", "podman", "podmanargs", "podman_service",
                   "podman_logs", "qemu", "qemuargs", "vmstate", "vmpull", "vmimage",
                   "builders", "ops", "nanos", "initramfs", "kvmprobe", "cpio"}


def imports_of(path: Path) -> set[str]:
    """Every mcp_node module ``path`` imports, wherever the import stands."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                out.update([node.module.split(".")[0]] if node.module
                           else [a.name for a in node.names])
            elif node.module and node.module.startswith("mcp_node"):
                parts = node.module.split(".")
                out.update(parts[1:2] or [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names
                       if a.name.startswith("mcp_node."))
    return out


def graph() -> dict[str, set[str]]:
    mods = {p.stem: p for p in PKG.glob("*.py")}
    return {m: {d for d in imports_of(p) if d in mods and d != m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycles_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    assert cycles(graph()) == []


def test_single_node_modules_know_no_fleet() -> None:
    """The single node's agent and what it is made of import no fleet module."""
    g = graph()
    seen, todo = set(), ["agent"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(g[m])
    assert not {m for m in seen if m.startswith("fleet") or m == "cluster"}, sorted(seen)


def test_runtime_names_spelled_only_by_the_runtimes() -> None:
    spelled = []
    for path in sorted(PKG.glob("*.py")):
        if path.stem in RUNTIME_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in RUNTIME_NAMES:
                spelled.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert spelled == []


def test_runtime_table_is_built_from_the_implementations() -> None:
    assert list(RUNTIMES) == list(TRAITS) == list(RUNTIME_NAMES)
    for name in RUNTIMES:
        impl = load_runtime(name)
        assert impl.name == name and impl.traits is TRAITS[name]
