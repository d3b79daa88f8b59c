"""footprint: agent RSS after start and after 100 deploys (target <= 45 MB), and
`mcp --version` cold start vs `python3 -c 'import click'` (target <= 2x).

The 100 deploys are deploy+undeploy cycles of one container (so the node does
not fill up), followed by 10 services left running while RSS is read.
Run: .venv/bin/python bench/footprint.py [DEPLOYS]
"""

from __future__ import annotations

import subprocess
import sys
import uuid

from common import BIN, bed, hello_image, median, rss_kb, timed


def cold(argv: list[str], rounds: int = 15) -> float:
    subprocess.run(argv, check=True, capture_output=True)  # warm the page cache
    return median([timed(lambda: subprocess.run(argv, check=True, capture_output=True))
                   for _ in range(rounds)])


def main() -> None:
    deploys = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    image = hello_image()
    mcp_t = cold([str(BIN / "mcp"), "--version"])
    click_t = cold([str(BIN / "python"), "-c", "import click"])
    with bed() as b:
        client = b.start_agent()
        assert b.proc is not None
        client.get("/v1/services")
        start_kb = rss_kb(b.proc.pid)
        kept = []
        for i in range(deploys):
            svc = f"fp{uuid.uuid4().hex[:6]}"
            client.post("/v1/services", {"name": svc, "components": [
                {"name": "web", "image": image, "routes": [{"port": 8080}]}]})
            if i >= deploys - 10:
                kept.append(svc)
            else:
                client.delete(f"/v1/services/{svc}")
        client.get("/v1/services")
        client.get("/v1/health")
        after_kb = rss_kb(b.proc.pid)
    print(f"footprint deploys={deploys}")
    print(f"  agent RSS after start:      {start_kb / 1024:6.1f} MB")
    print(f"  agent RSS after {deploys} deploys: {after_kb / 1024:6.1f} MB (target <= 45 MB;"
          f" {after_kb / start_kb:.2f}x of start)")
    print(f"  mcp --version cold start:   {mcp_t * 1000:6.1f} ms")
    print(f"  python -c 'import click':   {click_t * 1000:6.1f} ms")
    print(f"  ratio = {mcp_t / click_t:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
