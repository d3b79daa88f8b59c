"""Service definitions (design §2): parse TOML or JSON, validate every rule.

Validation happens before anything touches the registry, a runtime or a
path, so a rejected definition changes nothing. Every error names the field.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from . import grammar, safetext
from .errors import ValidationError
from .grammar import (
    MAX_LIST as MAX_LIST,
)
from .grammar import (
    MAX_STR,
    NAME_RE,
    check_env,
    check_image,
    check_seconds,
    check_text,
    parse_volumes,
)
from .grammar import (
    check_name as check_name,
)
from .problems import Problems
from .runtimenames import DEFAULT_RUNTIME, OWN_KEYS, RUNTIME_NAMES, TRAITS
from .servicetables import UPDATE_ORDERS as UPDATE_ORDERS
from .servicetables import NetworkDef as NetworkDef
from .servicetables import UpdateDef as UpdateDef
from .servicetables import network_of, update_of

ROUTE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
IMAGE_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
HOSTNAME_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
RESTART_POLICIES = ("", "no", "always", "on-failure", "unless-stopped")
ROUTE_MODES = ("l4", "l7")
FAILOVER_MODES = ("", "fence", "overlap")   # fleet mode (issue 18); "" is "fence"
PULL_POLICIES = ("missing", "always")
# Bounded work per deploy: 8,000 routes once held the registry's writer for 34 s.
MAX_COMPONENTS = 64
MAX_ROUTES = 32            # per component
# Below this no VM builder's guest boots (QEMU failed with a 502 for memory_mb = 1).
MAX_MEMORY_MB = 1 << 20


@dataclass(frozen=True)
class RouteDef:
    name: str
    port: int
    mode: str = "l7"
    hostname: str = ""
    public_hostname: str = ""        # fleet mode: served by every edge node


@dataclass(frozen=True)
class ComponentDef:
    name: str
    image: str
    runtime: str = DEFAULT_RUNTIME
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    volumes: tuple[str, ...] = ()
    restart: str = ""
    memory_mb: int | None = None
    vcpus: int = 1
    binary: str = ""
    image_sha256: str = ""
    routes: tuple[RouteDef, ...] = ()
    check: str = ""                  # readiness: "" (tcp with routes), tcp, none, http:/path
    check_interval_s: float = 10.0   # checked this often while it runs; 0: once per run
    check_timeout_s: float = 2.0
    check_failures: int = 3          # failures in a row before it is unhealthy
    pull: str = "missing"            # "always": the tag is resolved again at every deploy
    # What ``image`` resolved to when deployed ("sha256:<image id>"; the agent sets it, so a
    # version in history or a revert runs exactly that image, whatever the tag means now).
    image_digest: str = ""
    # Secrets it is given as /run/secrets/<name> (issue 20); env values ``secret:NAME``
    # name more. ``secret_versions``: the version of each it uses, set by the agent at
    # deploy (a version in history or a revert gets exactly that value back).
    secrets: tuple[str, ...] = ()
    secret_versions: tuple[tuple[str, int], ...] = ()

    @property
    def used_secrets(self) -> tuple[str, ...]:
        """Every secret it uses: its files, then those its env values name."""
        return tuple(dict.fromkeys((*self.secrets, *grammar.secret_refs(self.env))))

    @property
    def version(self) -> str:
        """The image tag, as `ps` shows it (``latest`` when none is given)."""
        ref = self.image.rsplit("/", 1)[-1]
        if "@" in ref:
            return ref.split("@", 1)[1][:19]
        return ref.split(":", 1)[1] if ":" in ref else "latest"


# Defaults are left out of the JSON form, so a definition from before these keys keeps
# its digest (and its workloads are not replaced by an upgrade).
COMPONENT_DEFAULTS = {k: getattr(ComponentDef("x", "x"), k)
                      for k in ("check_interval_s", "check_timeout_s", "check_failures",
                                "pull", "image_digest")}


@dataclass(frozen=True)
class ServiceDef:
    name: str
    components: tuple[ComponentDef, ...]
    active: bool = True
    runtime: str = DEFAULT_RUNTIME
    node: str = ""                   # fleet mode: "NAME" pinned, "pool:NAME", "" any
    failover: str = ""               # fleet mode: "" fenced (never two copies), "overlap"
    update: UpdateDef = UpdateDef()
    network: NetworkDef = NetworkDef()

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (lists, not tuples): what ``from_dict`` and the API accept."""
        def plain(value: Any) -> Any:
            if isinstance(value, tuple | list):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items() if v is not None}
            return value

        out: dict[str, Any] = plain(asdict(self))
        if not self.node:   # the fleet keys only where set: single-node output is unchanged
            del out["node"]
        if not self.failover:
            del out["failover"]
        if self.update == UpdateDef():
            del out["update"]
        if self.network == NetworkDef():
            del out["network"]
        for c in out["components"]:
            for k, default in COMPONENT_DEFAULTS.items():
                if c[k] == default:
                    del c[k]
            for r in c["routes"]:
                if not r["public_hostname"]:
                    del r["public_hostname"]
            for k in ("secrets", "secret_versions"):   # only where used (digests hold)
                if not c[k]:
                    del c[k]
            if "secret_versions" in c:
                c["secret_versions"] = dict(c["secret_versions"])
        return out

    def local_part(self) -> ServiceDef:
        """What one node runs: without the fleet's keys (its registry keeps no
        placement, and a move between nodes must not change a workload's spec)."""
        return replace(self, node="", failover="", components=tuple(
            replace(c, routes=tuple(replace(r, public_hostname="") for r in c.routes))
            for c in self.components))


def check_hostname(value: object, field_name: str) -> str:
    """A DNS name: ≤ 253 chars, labels of [a-z0-9-] ≤ 63, no wildcards."""
    if not isinstance(value, str):
        raise ValidationError("must be a string", field_name)
    # ASCII first: str.lower() maps the Kelvin sign to "k"; one trailing dot, not "a..".
    name = value.lower()[:-1] if value.endswith(".") else value.lower()
    if not value.isascii() or not name or len(name) > 253:
        raise ValidationError(f"{value[:80]!r} is not a valid DNS name", field_name)
    for label in name.split("."):
        if not HOSTNAME_LABEL_RE.fullmatch(label):
            raise ValidationError(f"{value[:80]!r} is not a valid DNS name", field_name)
    return name


def _str(value: object, field_name: str, *, allow_empty: bool = False) -> str:
    return check_text(value, field_name, max_len=MAX_STR, allow_empty=allow_empty)


def check_int(value: object, field_name: str) -> int:
    """An integer; JSON has one number type, so 80.0 is the integer 80 (as JSON Schema's
    "integer" has it, which the OpenAPI document states), while 80.5 and true are not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError("must be an integer", field_name)
    return value


def _str_list(value: object, field_name: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValidationError("must be a list of strings", field_name)
    if len(value) > MAX_LIST:
        raise ValidationError(f"at most {MAX_LIST} entries", field_name)
    return tuple(_str(v, f"{field_name}[{i}]", allow_empty=True) for i, v in enumerate(value))


ROUTE_KEYS = ("name", "port", "mode", "hostname", "public_hostname")


def _route(data: object, where: str, single: bool) -> RouteDef:
    if not isinstance(data, dict):
        raise ValidationError("must be a table", where.rstrip("."))
    p = Problems()
    p.keys(data, ROUTE_KEYS, where)
    route = p.take(lambda: _route_values(data, where, single))
    p.done()
    assert route is not None   # else done raised
    return route


def _route_values(data: dict[str, Any], where: str, single: bool) -> RouteDef:
    name = data.get("name", "")
    if not isinstance(name, str):  # before the truthiness test: [] or 0 is no "unnamed"
        raise ValidationError("must be a string", where + "name")
    if name or not single:
        name = _str(name, where + "name")
        if not ROUTE_NAME_RE.fullmatch(name):
            raise ValidationError(f"{name[:80]!r} is not a valid route name", where + "name")
    port = check_int(data.get("port"), where + "port")
    if not 1 <= port <= 65535:
        raise ValidationError("must be 1-65535", where + "port")
    mode = data.get("mode", "l7")
    if mode not in ROUTE_MODES:
        raise ValidationError(f"must be one of {', '.join(ROUTE_MODES)}", where + "mode")
    hostname = data.get("hostname", "")
    if not isinstance(hostname, str):
        raise ValidationError("must be a string", where + "hostname")
    if hostname:
        hostname = check_hostname(hostname, where + "hostname")
    public = data.get("public_hostname", "")
    if not isinstance(public, str):
        raise ValidationError("must be a string", where + "public_hostname")
    if public:
        public = check_hostname(public, where + "public_hostname")
    return RouteDef(name=name, port=port, mode=mode, hostname=hostname, public_hostname=public)


COMPONENT_KEYS = (
    "name", "image", "cmd", "env", "volumes", "restart", "runtime", "memory_mb",
    "vcpus", "binary", "image_sha256", "routes", "check", "check_interval_s",
    "check_timeout_s", "check_failures", "pull", "image_digest", "secrets", "secret_versions",
)
SERVICE_KEYS = ("name", "active", "runtime", "components", "node", "failover", "update",
                "network")


def _checks(data: dict[str, Any], where: str) -> dict[str, Any]:
    """check_interval_s (0, once per run, or 0.1-86400), check_timeout_s, check_failures,
    pull."""
    d = COMPONENT_DEFAULTS
    interval = check_seconds(data.get("check_interval_s", d["check_interval_s"]),
                             where + "check_interval_s", 0, 86400)
    if 0 < interval < 0.1:
        raise ValidationError(f"must be 0 (once per run) or 0.1-86400 (is {interval:g})",
                              where + "check_interval_s")
    failures = check_int(data.get("check_failures", d["check_failures"]),
                         where + "check_failures")
    if not 1 <= failures <= 100:
        raise ValidationError(f"must be 1-100 (is {failures})", where + "check_failures")
    pull = data.get("pull", d["pull"])
    if pull not in PULL_POLICIES:
        raise ValidationError(f"{str(pull)[:40]!r} is not missing or always", where + "pull")
    digest = data.get("image_digest", "")
    if digest != "" and not (isinstance(digest, str) and IMAGE_DIGEST_RE.fullmatch(digest)):
        raise ValidationError(f"{str(digest)[:80]!r} is not sha256:<64 lowercase hex>",
                              where + "image_digest")
    return {"check_interval_s": interval,
            "check_timeout_s": check_seconds(data.get("check_timeout_s", d["check_timeout_s"]),
                                             where + "check_timeout_s", 0.1, 60),
            "check_failures": failures, "pull": pull, "image_digest": digest}


def _secrets(data: dict[str, Any], where: str) -> dict[str, Any]:
    """``secrets`` (names, each once) and ``secret_versions`` ({name: version >= 1}, as
    the agent records it; a client may send it back, as status shows it)."""
    names = _str_list(data.get("secrets", []), where + "secrets")
    for j, n in enumerate(names):
        grammar.check_secret_name(n, f"{where}secrets[{j}]")
        if n in names[:j]:
            raise ValidationError(f"{n!r} is named twice", f"{where}secrets[{j}]")
    raw = data.get("secret_versions", {})
    if not isinstance(raw, dict) or len(raw) > MAX_LIST:
        raise ValidationError("must be a table of secret name = version",
                              where + "secret_versions")
    versions = []
    for n, v in sorted(raw.items()):
        grammar.check_secret_name(n, f"{where}secret_versions")
        if check_int(v, f"{where}secret_versions.{n}") < 1:
            raise ValidationError("must be >= 1", f"{where}secret_versions.{n}")
        versions.append((n, int(v)))
    return {"secrets": names, "secret_versions": tuple(versions)}


CHECK_PATH_RE = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,255}")


def _check(data: dict[str, Any], routes: tuple[RouteDef, ...], where: str) -> str:
    """``tcp`` | ``none`` | ``http:/path``; tcp and http need a route to probe."""
    check = _str(data.get("check", ""), where + "check", allow_empty=True)
    if check in ("", "none"):
        return check
    if check != "tcp" and not (check.startswith("http:") and CHECK_PATH_RE.fullmatch(check[5:])):
        raise ValidationError(f"{check[:80]!r} is not tcp, none or http:/path",
                              where + "check")
    if not routes:
        raise ValidationError(f"{check!r} needs a route to probe", where + "check")
    return check


def _component(data: object, i: int, default_runtime: str) -> ComponentDef:
    """One component; every independent check runs (what depends on a bad value is
    skipped), so all of its errors come at once."""
    where = f"components[{i}]."
    if not isinstance(data, dict):
        raise ValidationError("must be a table", f"components[{i}]")
    p = Problems()
    p.keys(data, COMPONENT_KEYS, where)
    name = p.take(lambda: check_name(data.get("name"), where + "name"), "")
    image = p.take(lambda: check_image(data.get("image"), where + "image"), "")
    runtime = data.get("runtime", default_runtime)
    if runtime not in RUNTIME_NAMES:
        p.add(ValidationError(f"must be one of {', '.join(RUNTIME_NAMES)}", where + "runtime"))
    env = p.take(lambda: _env(data, where), ())
    volumes = p.take(lambda: _volumes(data, where), ())
    restart = data.get("restart", "")
    if restart not in RESTART_POLICIES:
        p.add(ValidationError(
            f"must be one of {', '.join(p for p in RESTART_POLICIES if p)}", where + "restart"))
    cmd = p.take(lambda: _str_list(data.get("cmd", []), where + "cmd"), ())
    routes = p.take(lambda: _routes(data, where))
    picked: dict[str, Any] = {}
    if runtime in RUNTIME_NAMES:   # memory and the VM keys are judged by the runtime
        picked.update(p.take(lambda: _vm_keys(data, where, runtime), {}))
    if routes is not None:         # a check needs a route to probe
        picked["check"] = p.take(lambda: _check(data, routes, where), "")
    picked.update(p.take(lambda: _checks(data, where), {}))
    picked.update(p.take(lambda: _secrets(data, where), {}))
    p.done()   # nothing below runs with a fallback: any error was raised here
    assert routes is not None
    return ComponentDef(name=name, image=image, runtime=runtime, cmd=cmd, env=env,
                        volumes=volumes, restart=restart, routes=routes, **picked)


def _env(data: dict[str, Any], where: str) -> tuple[str, ...]:
    env = _str_list(data.get("env", []), where + "env")
    check_env(env, where + "env")
    return env


def _volumes(data: dict[str, Any], where: str) -> tuple[str, ...]:
    volumes = _str_list(data.get("volumes", []), where + "volumes")
    parse_volumes(volumes, where + "volumes")
    return volumes


def _vm_keys(data: dict[str, Any], where: str, runtime: str) -> dict[str, Any]:
    """memory_mb (as the runtime needs it), vcpus, binary, image_sha256; a key the
    runtime does not act on is refused rather than silently ignored."""
    memory_mb: int | None = None
    if "memory_mb" in data:  # absent means unset; null is not a number (TOML has no null)
        memory_mb = check_int(data["memory_mb"], where + "memory_mb")
    traits = TRAITS[runtime]
    if traits.memory_required and (memory_mb is None or memory_mb <= 0):
        raise ValidationError(f"must be > 0 for a {runtime} component", where + "memory_mb")
    if memory_mb is not None and memory_mb < traits.min_memory_mb:
        raise ValidationError(f"must be at least {traits.min_memory_mb} for a {runtime} "
                              f"component (is {memory_mb})", where + "memory_mb")
    if memory_mb is not None and not 0 <= memory_mb <= MAX_MEMORY_MB:
        raise ValidationError(f"must be 0-{MAX_MEMORY_MB}", where + "memory_mb")
    vcpus = check_int(data.get("vcpus", 1), where + "vcpus")
    if not 1 <= vcpus <= 64:
        raise ValidationError("must be 1-64", where + "vcpus")
    binary = _str(data.get("binary", ""), where + "binary", allow_empty=True)
    if binary and (not binary.startswith("/") or ".." in Path(binary).parts):
        raise ValidationError("must be an absolute path without '..'", where + "binary")
    sha = _str(data.get("image_sha256", ""), where + "image_sha256", allow_empty=True).lower()
    if sha and not SHA256_RE.fullmatch(sha):
        raise ValidationError("must be 64 hex digits", where + "image_sha256")
    # Keys only some runtimes act on would be silently ignored by the others: refuse a
    # value that asks for something (the defaults ask for nothing, so definitions
    # round-trip).
    for key, value, default in (("vcpus", vcpus, 1), ("binary", binary, ""),
                                ("image_sha256", sha, "")):
        if value != default and key not in traits.own_keys:
            kinds = "/".join(f"{TRAITS[r].kind}s" for r in OWN_KEYS.get(key, ()))
            raise ValidationError(f"has no effect on a {runtime} component ({kinds} only)",
                                  where + key)
    return {"memory_mb": memory_mb, "vcpus": vcpus, "binary": binary, "image_sha256": sha}


def _routes(data: dict[str, Any], where: str) -> tuple[RouteDef, ...]:
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        raise ValidationError("must be a list of tables", where + "routes")
    if len(raw_routes) > MAX_ROUTES:
        raise ValidationError(f"at most {MAX_ROUTES} routes per component (has "
                              f"{len(raw_routes)})", where + "routes")
    p, single = Problems(), len(raw_routes) == 1
    got = [p.take(partial(_route, r, f"{where}routes[{j}].", single))
           for j, r in enumerate(raw_routes)]
    p.done()
    routes = tuple(r for r in got if r is not None)
    names = [r.name for r in routes]
    if len(set(names)) != len(names):
        raise ValidationError("duplicate route name", where + "routes")
    env_keys: set[str] = set()
    for j, r in enumerate(routes):
        key = route_env_key(r.name)
        if key in env_keys:
            raise ValidationError(f"{r.name!r} maps to ${key} like an earlier route",
                                  f"{where}routes[{j}].name")
        env_keys.add(key)
    return routes


def from_dict(data: object) -> ServiceDef:
    """Validate a decoded definition (TOML or JSON) into a ServiceDef; every error of
    it at once (ValidationErrors when more than one)."""
    if not isinstance(data, dict):
        raise ValidationError("a service definition must be an object")
    p = Problems()
    p.keys(data, SERVICE_KEYS, "")
    name = p.take(lambda: check_name(data.get("name"), "name"), "")
    active = data.get("active", True)
    if not isinstance(active, bool):
        p.add(ValidationError("must be a boolean", "active"))
    runtime = data.get("runtime", DEFAULT_RUNTIME)
    if runtime not in RUNTIME_NAMES:
        p.add(ValidationError(f"must be one of {', '.join(RUNTIME_NAMES)}", "runtime"))
        runtime = DEFAULT_RUNTIME
    raw = data.get("components")
    comps: list[ComponentDef] = []
    if not isinstance(raw, list) or not raw:
        p.add(ValidationError("at least one component is required", "components"))
    elif len(raw) > MAX_COMPONENTS:
        p.add(ValidationError(f"at most {MAX_COMPONENTS} components (has {len(raw)})",
                              "components"))
    else:
        seen: set[str] = set()
        for i, c in enumerate(raw):
            comp = p.take(partial(_component, c, i, runtime))
            if comp is None:
                continue
            if comp.name in seen:
                p.add(ValidationError(f"duplicate component name {comp.name!r}",
                                      f"components[{i}].name"))
            seen.add(comp.name)
            comps.append(comp)
    node = p.take(lambda: _node(data.get("node", "")), "")
    failover = data.get("failover", "")
    if failover not in FAILOVER_MODES:
        p.add(ValidationError(f"{str(failover)[:40]!r} is not a failover mode (\"\" fenced, "
                              "the default: never two copies; \"overlap\": a brief second "
                              "copy while a lost node's is stopped)", "failover"))
    update = p.take(lambda: update_of(data.get("update")), UpdateDef())
    network = p.take(lambda: network_of(data.get("network"), name), NetworkDef())
    p.done()
    return ServiceDef(name=name, components=tuple(comps), active=active, runtime=runtime,
                      node=node, failover="" if failover == "fence" else failover,
                      update=update, network=network)


def _node(node: object) -> str:
    if not isinstance(node, str):
        raise ValidationError("must be a string", "node")
    if node:
        target = node[5:] if node.startswith("pool:") else node
        if not NAME_RE.fullmatch(target):
            raise ValidationError(f"{node[:80]!r} is not NAME or pool:NAME "
                                  "([a-z0-9][a-z0-9-]{0,62})", "node")
    return node


def loads_toml(text: str, where: str | None = None) -> ServiceDef:
    """A TOML definition; ``where`` (its file, ``stdin``) is named by a too-deep error."""
    return from_dict(safetext.loads_toml(text, where))


def loads_text(text: str, where: str, as_json: bool) -> ServiceDef:
    """JSON (the same fields, read as the HTTP API reads a body: a key given twice is
    refused) or TOML, from the file or stream ``where``."""
    return from_dict(safetext.loads_json(text, where)) if as_json else loads_toml(text, where)


def load_file(path: Path) -> ServiceDef:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot read {path}: {exc}") from exc
    return loads_text(text, str(path), path.suffix == ".json")


def check_route_zone(defn: ServiceDef, zone: str) -> None:
    """Every route's hostname (default ``<service>.<zone>``) lies inside the internal
    zone, checked at every deploy: with ``proxy.serve_routes`` off too, so turning it
    on later cannot find routes that were never checked."""
    zone = zone.lower().rstrip(".")
    for i, c in enumerate(defn.components):
        for j, r in enumerate(c.routes):
            host = (r.hostname or f"{defn.name}.{zone}").lower().rstrip(".")
            if not zone or not host.endswith("." + zone):
                raise ValidationError(f"{host} is not inside the internal zone {zone}",
                                      f"components[{i}].routes[{j}].hostname")


def route_env(component: ComponentDef, host_ports: dict[str, int]) -> tuple[str, ...]:
    """``$PORT`` for a single unnamed route, ``$PORT_<NAME>`` for named ones."""
    return tuple(f"{route_env_key(r.name)}={host_ports[r.name]}" for r in component.routes)


def route_env_key(route_name: str) -> str:
    return f"PORT_{route_name.upper().replace('-', '_')}" if route_name else "PORT"


def check_volume_roots(defn: ServiceDef, roots: Sequence[str]) -> None:
    """Every volume's host path under one of ``roots`` (the agent's config, which
    ``from_dict`` does not have); run before anything changes, naming
    ``components[i].volumes[j]``."""
    for i, c in enumerate(defn.components):
        grammar.check_volume_roots(parse_volumes(c.volumes), roots, f"components[{i}].volumes")
