#!/usr/bin/env bash
# The main job on embedded defaults: set up, start mcp-agent with no config,
# deploy the sample service, show `mcp ps` and its URL. The agent keeps running.
set -euo pipefail
. "$(dirname "$0")/env.sh"
bash "$top/scripts/setup.sh"
bash "$top/scripts/build_test_image.sh" v1 >/dev/null

state=${XDG_STATE_HOME:-$HOME/.local/state}/mcp
mkdir -p "$state"
if ! curl -fsS -o /dev/null -H "Authorization: Bearer $(cat "$state/token" 2>/dev/null)" \
     http://127.0.0.1:9444/v1/health 2>/dev/null; then
  nohup mcp-agent >>"$state/agent.log" 2>&1 &
  echo $! >"$state/agent.pid"
  for _ in $(seq 1 100); do
    [ -s "$state/token" ] && curl -fsS -o /dev/null -H "Authorization: Bearer $(cat "$state/token")" \
      http://127.0.0.1:9444/v1/health 2>/dev/null && break
    sleep 0.2
  done
fi
echo "agent: http://127.0.0.1:9444 (pid $(cat "$state/agent.pid" 2>/dev/null || echo '?'), log $state/agent.log)"
mcp deploy "$top/examples/hello.toml" >/dev/null
mcp ps
port=$(mcp --json ps | python3 -c 'import json,sys; print([r for r in json.load(sys.stdin) if r["service"]=="hello"][0]["routes"][0]["host_port"])')
echo "hello: http://127.0.0.1:$port/"
curl -fsS "http://127.0.0.1:$port/"
echo "stop the agent with: kill \$(cat $state/agent.pid)   (the service keeps running; mcp undeploy hello removes it)"
