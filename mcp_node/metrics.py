"""``GET /metrics``: the agent in Prometheus text format (prometheus-client).

Request counts and latencies are counted as requests finish; everything about
the node (components by state, restarts, health, certificate expiry) is read
from the agent when scraped, so a scrape always shows the current view and
costs nothing between scrapes. The registry is this agent's own, not the
library's global one, so two agents in one process (tests) never mix.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator
from datetime import datetime
from http import HTTPStatus
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .httpapi import ROUTES
from .states import UNHEALTHY

if TYPE_CHECKING:
    from .operations import Operations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEPLOY_ROUTE = ("POST", "/v1/services")

# Label values come from closed sets, so no request can add a series: a method, route
# or status outside them (a malformed request line, a made-up method, a path no route
# matches) is counted as ``other``. Without this, 3,000 junk requests grew /metrics to
# 24 MB (issue 16).
OTHER = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT",
                     "TRACE"})
ROUTE_NAMES = frozenset(r.template for r in ROUTES)
STATUSES = frozenset(str(s.value) for s in HTTPStatus)


def label_of(value: str, known: frozenset[str]) -> str:
    return value if value in known else OTHER


class Metrics:
    def __init__(self, agent: Operations) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("mcp_http_requests", "API requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("mcp_http_request_duration_seconds", "API request latency",
                                 ["route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1,
                                          2.5, 5, 10, 30))
        self.deploys = Histogram("mcp_deploy_duration_seconds", "Successful deploys, end to end",
                                 registry=self.registry,
                                 buckets=(.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.registry.register(NodeCollector(agent))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """One answered request; ``route`` is the matched template. Each label is one of
        a closed set (else ``other``), whatever the client sent."""
        method, route = label_of(method, METHODS), label_of(route, ROUTE_NAMES)
        self.requests.labels(method, route, label_of(str(status), STATUSES)).inc()
        self.latency.labels(route).observe(seconds)
        if (method, route) == DEPLOY_ROUTE and status == 200:
            self.deploys.observe(seconds)


class NodeCollector(Collector):
    """The node's state, read from the agent at scrape time."""

    def __init__(self, agent: Operations) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        rows = self.agent.ps()
        by_state = GaugeMetricFamily("mcp_components", "Components by runtime and state",
                                     labels=["runtime", "state"])
        for (runtime, state), n in sorted(Tally((r["runtime"], r["state"]) for r in rows).items()):
            by_state.add_metric([runtime, state], n)
        yield by_state
        restarts = GaugeMetricFamily("mcp_component_restarts",
                                     "Restarts by the agent since the backoff last reset",
                                     labels=["service", "component"])
        for (svc, comp), n in sorted(self.agent.restart_counts().items()):
            restarts.add_metric([svc, comp], n)
        yield restarts
        # Labels: the components the registry has (a closed set, like the restarts').
        failures = CounterMetricFamily("mcp_check_failures",
                                       "Failed checks of runs that had passed their check",
                                       labels=["service", "component"])
        for (svc, comp), n in sorted(self.agent.check_failures().items()):
            failures.add_metric([svc, comp], n)
        yield failures
        rollouts = CounterMetricFamily("mcp_rollouts", "Rollouts by outcome since the agent "
                                       "started", labels=["outcome"])
        for outcome, n in self.agent.rollout_counts().items():
            rollouts.add_metric([outcome], n)
        yield rollouts
        yield GaugeMetricFamily("mcp_components_unhealthy",
                                "Components whose check failed check_failures times in a row",
                                value=sum(r["state"] == UNHEALTHY for r in rows))
        health = self.agent.health()
        yield GaugeMetricFamily("mcp_node_healthy", "1 when health is healthy, else 0",
                                value=1 if health["status"] == "healthy" else 0)
        yield GaugeMetricFamily("mcp_agent_uptime_seconds", "Seconds since the agent started",
                                value=health.get("uptime_s", 0))
        rounds, cpu_s, listing_s = self.agent.monitor_cost()   # after health(): may run one
        yield CounterMetricFamily("mcp_monitor_rounds", "Monitor rounds since the agent "
                                  "started", value=rounds)
        yield CounterMetricFamily("mcp_monitor_round_cpu_seconds", "CPU the monitor's "
                                  "thread spent in its rounds (the checker's probes apart)",
                                  value=cpu_s)
        yield CounterMetricFamily("mcp_monitor_listing_cpu_seconds", "Of the rounds' CPU, "
                                  "the runtimes' listings (read and parsed)", value=listing_s)
        expiry = GaugeMetricFamily("mcp_edge_certificate_expiry_timestamp_seconds",
                                   "Edge route certificate expiry (unix time)",
                                   labels=["hostname"])
        for hostname, expires in sorted(self.agent.certificate_expiries().items()):
            expiry.add_metric([hostname], parse_rfc3339(expires))
        yield expiry


def parse_rfc3339(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def render(metrics: Metrics) -> bytes:
    data: bytes = generate_latest(metrics.registry)
    return data

