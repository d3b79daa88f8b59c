#!/usr/bin/env python3
"""api_throughput: GET /v1/health with 16 concurrent keep-alive clients for 10 s.

Starts a real ``mcp-agent`` (subprocess, own state dir, free loopback port)
and, as the baseline measured in the same run, a Caddy serving a static
``respond`` of the same size on another free loopback port. Load comes from
``wrk`` when installed (Debian ``wrk``), else from a Python multi-process
keep-alive client. Prints req/s and p99 for both and the ratios.

Targets (issue 2): >= 3,000 req/s and p99 <= 10 ms for the agent.

    .venv/bin/python bench/api_throughput.py [--duration 10] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, headers: dict[str, str], deadline_s: float = 30.0) -> bytes:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=2) as r:
                return bytes(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {deadline_s}s") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- load generators ---------------------------------------------------------------


def parse_wrk_latency(text: str) -> float:
    """p99 in ms from ``wrk --latency`` output."""
    m = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not m:
        raise RuntimeError(f"no p99 in wrk output:\n{text}")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def run_wrk(url: str, headers: dict[str, str], conns: int, duration: int) -> dict[str, float]:
    argv = ["wrk", "-t", "2", "-c", str(conns), "-d", f"{duration}s", "--latency"]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p99_ms": parse_wrk_latency(out),
            "non2xx": float(errors.group(1)) if errors else 0.0}


def _py_worker(host: str, port: int, request: bytes, conns: int, duration: float,
               q: mp.Queue) -> None:  # type: ignore[type-arg]
    lats: list[float] = []
    bad = 0
    lock = threading.Lock()
    end = time.monotonic() + duration

    def one() -> None:
        nonlocal bad
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        mine = []
        while time.monotonic() < end:
            t0 = time.perf_counter()
            s.sendall(request)
            status = f.readline()
            length = 0
            while True:
                h = f.readline()
                if h in (b"\r\n", b""):
                    break
                if h.lower().startswith(b"content-length:"):
                    length = int(h.split(b":")[1])
            f.read(length)
            mine.append(time.perf_counter() - t0)
            if b" 200 " not in status:
                bad += 1
        s.close()
        with lock:
            lats.extend(mine)

    threads = [threading.Thread(target=one) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put((lats, bad))


def run_python(url: str, headers: dict[str, str], conns: int, duration: int) -> dict[str, float]:
    m = re.match(r"http://([\d.]+):(\d+)(/.*)", url)
    assert m
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    hdr = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{hdr}\r\n".encode()
    procs_n = 2
    q: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=_py_worker, args=(host, port, request, conns // procs_n,
                                                 duration, q)) for _ in range(procs_n)]
    for p in procs:
        p.start()
    lats: list[float] = []
    bad = 0
    for _ in procs:
        part, b = q.get(timeout=duration + 60)
        lats += part
        bad += b
    for p in procs:
        p.join()
    lats.sort()
    return {"rps": len(lats) / duration, "p99_ms": lats[int(len(lats) * 0.99)] * 1000,
            "non2xx": float(bad)}


# -- targets ------------------------------------------------------------------------


def start_agent(work: Path) -> tuple[subprocess.Popen[bytes], str, dict[str, str], int]:
    port = free_port()
    env = dict(os.environ, XDG_STATE_HOME=str(work / "xdg-state"),
               XDG_CONFIG_HOME=str(work / "xdg-config"))
    env.setdefault("CONTAINERS_CONF", str(TOP / "scripts" / "containers.conf"))
    exe = shutil.which("mcp-agent", path=str(TOP / ".venv" / "bin")) or "mcp-agent"
    log = open(work / "agent.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([exe, "--state-dir", str(work / "state"),
                             "--listen", f"127.0.0.1:{port}"],
                            stdout=log, stderr=log, env=env)
    token_file = work / "state" / "token"
    deadline = time.monotonic() + 30
    while not token_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"agent did not start; log:\n{(work / 'agent.log').read_text()}")
        time.sleep(0.1)
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    url = f"http://127.0.0.1:{port}/v1/health"
    body = wait_http(url, headers)
    return proc, url, headers, len(body)


def start_caddy(work: Path, body_len: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    body = json.dumps({"status": "healthy", "pad": "x" * max(0, body_len - 32)})
    cfg = {
        "admin": {"disabled": True},
        "logging": {"logs": {"default": {"level": "ERROR"}}},
        "apps": {"http": {"servers": {"bench": {
            "listen": [f"127.0.0.1:{port}"],
            "automatic_https": {"disable": True},
            "routes": [{"handle": [{
                "handler": "static_response", "status_code": 200, "body": body,
                "headers": {"Content-Type": ["application/json"]},
            }]}],
        }}}},
    }
    (work / "caddy.json").write_text(json.dumps(cfg))
    env = dict(os.environ, XDG_DATA_HOME=str(work / "caddy-data"),
               XDG_CONFIG_HOME=str(work / "caddy-config"), HOME=str(work))
    log = open(work / "caddy.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["caddy", "run", "--config", str(work / "caddy.json")],
                            stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}/v1/health"
    try:
        wait_http(url, {})
    except RuntimeError:
        stop(proc)
        raise
    return proc, url


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--python-client", action="store_true", help="do not use wrk")
    args = ap.parse_args()
    use_wrk = shutil.which("wrk") is not None and not args.python_client
    load = run_wrk if use_wrk else run_python
    if shutil.which("caddy") is None:
        print("caddy not installed (scripts/setup.sh)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="mcp-bench-api-") as tmp:
        work = Path(tmp)
        agent, agent_url, headers, body_len = start_agent(work)
        try:
            caddy, caddy_url = start_caddy(work, body_len)
            try:
                base = load(caddy_url, {}, args.connections, args.duration)
            finally:
                stop(caddy)
            res = load(agent_url, headers, args.connections, args.duration)
        finally:
            stop(agent)
    client = "wrk -t2" if use_wrk else "python (2 procs)"
    print(f"api_throughput: GET /v1/health, {args.connections} keep-alive connections, "
          f"{args.duration}s each, client {client}, response {body_len} bytes")
    print(f"  caddy respond : {base['rps']:9.0f} req/s   p99 {base['p99_ms']:7.2f} ms")
    print(f"  mcp-agent     : {res['rps']:9.0f} req/s   p99 {res['p99_ms']:7.2f} ms"
          f"   non-2xx {res['non2xx']:.0f}")
    print(f"  ratio agent/caddy: throughput {res['rps'] / base['rps']:.3f}x, "
          f"p99 {res['p99_ms'] / base['p99_ms']:.2f}x")
    ok = res["rps"] >= 3000 and res["p99_ms"] <= 10 and res["non2xx"] == 0
    print(f"  targets (>= 3000 req/s, p99 <= 10 ms, no errors): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
