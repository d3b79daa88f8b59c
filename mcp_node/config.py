"""Agent configuration (design §8): embedded defaults, overridden by TOML.

The agent must run with no file at all, so every key has a default here;
unknown sections or keys in a file are errors naming them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ValidationError
from .safetext import loads_toml
from .statedir import default_state_dir


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:9444"
    tls_cert: str = ""
    tls_key: str = ""
    tokens_file: str = ""
    max_body: int = 1 << 20
    max_tail: int = 10_000              # logs ?tail= above it is a 400 (podman holds the tail)
    max_log_bytes: int = 4 << 20        # a logs answer's cap in bytes (the newest are kept)
    header_timeout_s: float = 10.0      # a request line and headers must arrive within it
    body_timeout_s: float = 30.0        # a request body must arrive within it, else 408
    idle_timeout_s: float = 120.0       # an authenticated keep-alive connection may idle so long
    max_connections: int = 1024         # open connections, authenticated or not
    max_unauthenticated: int = 256      # connections with no valid token yet; oldest dropped
    max_unauthenticated_per_peer: int = 64  # the same, per peer address
    max_connections_per_token: int = 64  # one token's open connections; its oldest idle dropped
    max_streams_per_token: int = 16     # one token's follow streams (logs -f, events follow)
    reserved_for_operators: int = 64    # of max_connections, never given to reader tokens
    intake_nice: int = 10               # the intake thread this much nicer: a flood slows itself


@dataclass(frozen=True)
class StateConfig:
    dir: str = ""


@dataclass(frozen=True)
class PodmanConfig:
    socket: str = ""
    containers_conf: str = ""
    volume_roots: tuple[str, ...] = ()   # host paths volumes may use; empty: <state>/volumes, /srv


@dataclass(frozen=True)
class QemuConfig:
    binary: str = "qemu-system-x86_64"
    accel: str = "auto"
    machine: str = "q35"
    kernel: str = ""
    ops: str = "ops"
    nanos_dir: str = ""
    reserve_memory_mb: int = 512
    reserve_vcpus: int = 0
    console_max_bytes: int = 4 << 20


@dataclass(frozen=True)
class ProxyConfig:
    backend: str = "caddy"
    admin: str = "http://127.0.0.1:2019"
    https_port: int = 443
    serve_routes: bool = False           # component routes on the node proxy (noderoutes)
    l4: str = "haproxy"                  # L4 proxy for mode "l4" routes; "" refuses them
    l4_binary: str = "haproxy"
    low_ports: tuple[int, ...] = ()      # route ports below 1024 allowed on this node


@dataclass(frozen=True)
class AcmeConfig:
    directory: str = ""
    ca_bundle: str = ""
    eab_kid: str = ""
    eab_hmac_key: str = ""
    http01_port: int = 80
    renew_before_days: int = 30


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = ()
    timeout_s: float = 3.0
    update_server: str = ""              # RFC 2136 target "host:port"; empty: no registration
    tsig_name: str = ""
    tsig_secret_file: str = ""           # base64 secret; must be mode 0600
    tsig_algorithm: str = "hmac-sha256"


@dataclass(frozen=True)
class NodeConfig:
    advertise: str = "127.0.0.1"         # address the node proxy listens on (a Tailnet one)


@dataclass(frozen=True)
class EdgeConfig:
    allowed_domains: tuple[str, ...] = ("example.net",)
    internal_zone: str = "svc.mcp.example.net"
    backend_ca: str = ""


@dataclass(frozen=True)
class MonitorConfig:
    interval_s: float = 5.0
    flap_changes: int = 3
    flap_window_s: float = 600.0
    edge_interval_s: float = 3600.0   # edge reconcile: lost routes, certificate renewals
    restart_backoff_max_s: float = 60.0   # cap of the restart backoff (1 s, 2 s, 4 s, ...)
    restart_reset_s: float = 60.0         # running this long resets the backoff


@dataclass(frozen=True)
class HistoryConfig:
    """What is kept of services no longer deployed (a deployed one keeps 20 versions)."""

    keep_undeployed_days: float = 30.0   # history of a service undeployed longer ago goes
    max_undeployed_services: int = 100   # beyond the most recently undeployed, history goes
    event_keep_days: float = 30.0        # events older than this go (each round)
    max_events_per_service: int = 10000  # beyond a service's newest this many, events go


@dataclass(frozen=True)
class ImagesConfig:
    """Images kept on the node for rollback (issue 19): those of each service's last
    ``keep_versions`` versions; older ones the agent recorded are removed."""

    keep_versions: int = 3


@dataclass(frozen=True)
class RegistryConfig:
    """One ``[registries."HOST[:PORT]"]`` table (issue 20): the login every pull from that
    registry uses (an auth file, or a user and a password file) and the CA its
    certificate chains to. The files are read at each pull (mcp_node.registries)."""

    host: str = ""
    auth_file: str = ""         # containers-auth.json (as podman and skopeo write it), 0600
    username: str = ""          # or a user...
    password_file: str = ""     # ...with its password alone in a file, 0600
    ca_file: str = ""           # PEM bundle the registry's certificate chains to


@dataclass(frozen=True)
class RegistriesConfig:
    hosts: tuple[RegistryConfig, ...] = ()

    def get(self, host: str) -> RegistryConfig | None:
        return next((r for r in self.hosts if r.host == host), None)


@dataclass(frozen=True)
class SecretsConfig:
    """The secret store (issue 20)."""

    key_file: str = ""                  # default <state>/secrets.key (0600, made on first use)
    fleet_key_file: str = ""            # fleet mode: the key every node is given
    runtime_dir: str = ""               # a tmpfs for secret files; default /run or /dev/shm


@dataclass(frozen=True)
class ClusterConfig:
    """Fleet mode on etcd (issue 12); ``etcd`` empty: a single node, no etcd."""

    etcd: tuple[str, ...] = ()          # endpoints, e.g. ["http://127.0.0.1:23791"]
    node: str = ""                      # default: the host name's first label
    roles: tuple[str, ...] = ("compute",)   # compute | edge
    pool: str = ""
    ca_cert: str = ""                   # TLS to etcd: CA bundle, client cert and key
    cert_file: str = ""
    key_file: str = ""
    lease_ttl_s: int = 10               # the node record lives this long without keepalives
    grace_s: float = 30.0               # after the lease expired, before work is re-placed
    memory_mb: int = 0                  # offered to placements; 0: the host's memory
    vcpus: int = 0                      # 0: the host's CPUs
    deploy_wait_s: float = 120.0        # a fleet deploy waits so long for the node's answer
    timeout_s: float = 2.0              # one etcd request; beyond it etcd counts as lost

    @property
    def enabled(self) -> bool:
        return bool(self.etcd)


@dataclass(frozen=True)
class NetworkConfig:
    """How services' workloads are networked (issue 23): ``user`` = QEMU user-mode and
    podman's default network, reachable through host ports only; ``bridge`` = one L2
    segment per service (a /24 of ``cidr``), VMs on TAPs, names served per service."""

    mode: str = "user"
    cidr: str = "10.89.0.0/16"


@dataclass(frozen=True)
class AgentConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    state: StateConfig = field(default_factory=StateConfig)
    podman: PodmanConfig = field(default_factory=PodmanConfig)
    qemu: QemuConfig = field(default_factory=QemuConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    registries: RegistriesConfig = field(default_factory=RegistriesConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    @property
    def state_dir(self) -> Path:
        return Path(self.state.dir).expanduser() if self.state.dir else default_state_dir()


# Numeric keys and their sensible range: a zero interval spins the monitor, ``inf``
# stops it for good, a tiny one burns the CPU; a non-positive body limit refuses all.
RANGES: dict[str, tuple[float, float]] = {
    "monitor.interval_s": (0.05, 86400),
    "monitor.edge_interval_s": (1, 30 * 86400),
    "monitor.flap_window_s": (1, 30 * 86400),
    "monitor.flap_changes": (0, 1_000_000),
    "monitor.restart_backoff_max_s": (1, 86400),
    "monitor.restart_reset_s": (1, 86400),
    "server.max_body": (1, 1 << 30),
    "server.max_tail": (0, 10_000_000),
    "server.max_log_bytes": (4096, 1 << 30),
    "server.header_timeout_s": (0.1, 3600),
    "server.body_timeout_s": (0.1, 3600),
    "server.idle_timeout_s": (0.1, 86400),
    "server.max_connections": (1, 1_000_000),
    "server.max_unauthenticated": (1, 1_000_000),
    "server.max_unauthenticated_per_peer": (1, 1_000_000),
    "server.max_connections_per_token": (1, 1_000_000),
    "server.max_streams_per_token": (0, 1_000_000),
    "server.reserved_for_operators": (0, 1_000_000),
    "server.intake_nice": (0, 19),
    "dns.timeout_s": (0.1, 60),
    "cluster.lease_ttl_s": (2, 3600),
    "cluster.grace_s": (0, 86400),
    "cluster.memory_mb": (0, 1 << 30),
    "cluster.vcpus": (0, 65536),
    "cluster.deploy_wait_s": (1, 86400),
    "cluster.timeout_s": (0.2, 60),
    "history.keep_undeployed_days": (0, 36500),
    "history.max_undeployed_services": (0, 1_000_000),
    "history.event_keep_days": (1, 36500),   # and >= monitor.flap_window_s
    "history.max_events_per_service": (100, 10_000_000),
    "images.keep_versions": (1, 20),   # history keeps 20 versions
}


INT_LISTS = {"proxy.low_ports"}


def _coerce(section: str, key: str, default: Any, value: Any) -> Any:
    where = f"{section}.{key}"
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):
            raise ValidationError(f"must be a finite number (is {value})", where)
    elif isinstance(default, tuple) and where in INT_LISTS:
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValidationError(f"wrong type ({type(value).__name__})", where)
    return value


def parse(data: dict[str, Any]) -> tuple[AgentConfig, list[ValidationError]]:
    """The config with every valid value applied, and every error found (not only the
    first): ``mcp-agent check-config`` lists them all, ``from_dict`` raises the first."""
    errors: list[ValidationError] = []
    cfg = AgentConfig()
    updates: dict[str, Any] = {}
    sections = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    for section, values in data.items():
        if section not in sections:
            errors.append(ValidationError(
                f"unknown section (known: {', '.join(sections)})", section))
            continue
        if not isinstance(values, dict):
            errors.append(ValidationError("must be a table", section))
            continue
        if section == "registries":
            updates[section] = RegistriesConfig(tuple(_registries(values, errors)))
            continue
        current = sections[section]
        known = [f.name for f in fields(current)]
        changes = {}
        for key, value in values.items():
            if key not in known:
                errors.append(ValidationError(f"unknown key (known: {', '.join(known)})",
                                              f"{section}.{key}"))
                continue
            try:
                changes[key] = _coerce(section, key, getattr(current, key), value)
            except ValidationError as exc:
                errors.append(exc)
        updates[section] = replace(current, **changes)
    cfg = replace(cfg, **updates)
    checks: list[tuple[bool, str, str]] = [
        (cfg.qemu.accel in ("auto", "kvm", "tcg"), "must be auto, kvm or tcg", "qemu.accel"),
        (cfg.qemu.machine in ("q35", "microvm"), "must be q35 or microvm", "qemu.machine"),
        (bool(cfg.server.tls_cert) == bool(cfg.server.tls_key),
         "tls_cert and tls_key must be set together", "server.tls_cert"),
        (cfg.server.reserved_for_operators < cfg.server.max_connections,
         f"must be below server.max_connections ({cfg.server.max_connections}): reader "
         "tokens need some room", "server.reserved_for_operators"),
        (cfg.history.event_keep_days * 86400 >= cfg.monitor.flap_window_s,
         f"must keep the flap window (monitor.flap_window_s = {cfg.monitor.flap_window_s:g} "
         "s): flapping is judged from the events in it", "history.event_keep_days"),
    ]
    for key, (low, high) in RANGES.items():
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        checks.append((low <= value <= high, f"must be {low:g}-{high:g} (is {value:g})", key))
    checks.extend((root.startswith("/") and "\x00" not in root,
                   f"{root[:80]!r} is not an absolute path", "podman.volume_roots")
                  for root in cfg.podman.volume_roots)
    checks.extend(_cluster_checks(cfg.cluster))
    checks.extend(_route_checks(cfg))
    checks.extend(_network_checks(cfg.network))
    errors.extend(ValidationError(msg, key) for ok, msg, key in checks if not ok)
    return cfg, errors


REGISTRY_HOST = (r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
                 r"(?::[0-9]{1,5})?")
REGISTRY_KEYS = ("auth_file", "username", "password_file", "ca_file")


def registry_key(host: str, key: str = "") -> str:
    """How an error names a key of one registry's table: ``registries."HOST".key``."""
    return f'registries."{host}"' + (f".{key}" if key else "")


def _registries(values: dict[str, Any], errors: list[ValidationError]) -> list[RegistryConfig]:
    """``[registries."HOST[:PORT]"]`` tables: a host (no scheme, no path) each, known keys,
    one way to log in (an auth file, or a user with a password file), absolute paths."""
    import re

    out = []
    for host, table in values.items():
        where = registry_key(host[:80])
        if not re.fullmatch(REGISTRY_HOST, host):
            errors.append(ValidationError(
                "is not a registry HOST or HOST:PORT (no scheme, no path)", where))
            continue
        if not isinstance(table, dict):
            errors.append(ValidationError("must be a table", where))
            continue
        entry: dict[str, str] = {}
        for key, value in table.items():
            if key not in REGISTRY_KEYS:
                errors.append(ValidationError(
                    f"unknown key (known: {', '.join(REGISTRY_KEYS)})", registry_key(host, key)))
            elif not isinstance(value, str) or "\x00" in value:
                errors.append(ValidationError(f"wrong type ({type(value).__name__})",
                                              registry_key(host, key)))
            else:
                entry[key] = value
        reg = RegistryConfig(host=host, **entry)
        checks = [
            (any(entry.values()), "set auth_file, or username and password_file, or ca_file",
             where),
            (not (reg.auth_file and (reg.username or reg.password_file)),
             "auth_file and username/password_file are two ways to log in: set one",
             registry_key(host, "auth_file")),
            (bool(reg.username) == bool(reg.password_file),
             "username and password_file must be set together",
             registry_key(host, "password_file" if reg.username else "username")),
            *((not v or v.startswith("/"), f"{v[:80]!r} is not an absolute path",
               registry_key(host, k)) for k, v in entry.items() if k != "username"),
        ]
        errors.extend(ValidationError(msg, key) for ok, msg, key in checks if not ok)
        out.append(reg)
    return out


def _cluster_checks(c: ClusterConfig) -> list[tuple[bool, str, str]]:
    import re

    name = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
    return [
        *((r in ("compute", "edge"), f"{r[:40]!r} is not compute or edge", "cluster.roles")
          for r in c.roles),
        *((e.startswith(("http://", "https://")) and "\x00" not in e,
           f"{e[:80]!r} is not an http:// or https:// URL", "cluster.etcd") for e in c.etcd),
        (not c.node or bool(name.fullmatch(c.node)),
         f"{c.node[:80]!r} is not a node name ([a-z0-9][a-z0-9-]{{0,62}})", "cluster.node"),
        (not c.pool or bool(name.fullmatch(c.pool)),
         f"{c.pool[:80]!r} is not a pool name ([a-z0-9][a-z0-9-]{{0,62}})", "cluster.pool"),
        (bool(c.cert_file) == bool(c.key_file), "cert_file and key_file must be set together",
         "cluster.cert_file"),
    ]


def _route_checks(cfg: AgentConfig) -> list[tuple[bool, str, str]]:
    """Node-proxy keys (issue 11): an address, known names, ports below 1024 only."""
    import ipaddress

    try:
        ipaddress.ip_address(cfg.node.advertise)
        address_ok = True
    except ValueError:
        address_ok = False
    algs = ("hmac-sha256", "hmac-sha512", "hmac-sha384", "hmac-sha224", "hmac-sha1",
            "hmac-md5")
    d = cfg.dns
    return [
        (address_ok, f"{cfg.node.advertise[:80]!r} is not an IP address", "node.advertise"),
        (cfg.proxy.l4 in ("haproxy", ""), "must be haproxy or empty", "proxy.l4"),
        *((0 < p < 1024, f"{p} is not a port below 1024", "proxy.low_ports")
          for p in cfg.proxy.low_ports),
        (d.tsig_algorithm.lower() in algs, f"{d.tsig_algorithm[:40]!r} is not one of "
         f"{', '.join(algs)}", "dns.tsig_algorithm"),
        (not d.update_server or bool(d.tsig_name and d.tsig_secret_file),
         "needs dns.tsig_name and dns.tsig_secret_file", "dns.update_server"),
    ]


def _network_checks(n: NetworkConfig) -> list[tuple[bool, str, str]]:
    """A mode the agent knows, and a private IPv4 range with room for /24s."""
    from .netplan import cidr_problem

    problem = cidr_problem(n.cidr)
    return [
        (n.mode in ("user", "bridge"), f"{n.mode[:40]!r} is not user or bridge",
         "network.mode"),
        (not problem, problem, "network.cidr"),
    ]


def from_dict(data: dict[str, Any]) -> AgentConfig:
    cfg, errors = parse(data)
    if errors:
        raise errors[0]
    return cfg


def read(path: Path) -> dict[str, Any]:
    try:
        return loads_toml(path.read_text(encoding="utf-8"), None)   # deep: one error
    except (OSError, ValidationError, UnicodeDecodeError) as exc:
        raise ValidationError(f"cannot load config {path}: {exc}") from exc


def load(path: Path | None) -> AgentConfig:
    """Load ``path`` (or ``$MCP_AGENT_CONFIG``); no file means embedded defaults."""
    if path is None and os.environ.get("MCP_AGENT_CONFIG"):
        path = Path(os.environ["MCP_AGENT_CONFIG"])
    if path is None:
        return AgentConfig()
    return from_dict(read(path))
