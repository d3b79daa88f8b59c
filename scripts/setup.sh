#!/usr/bin/env bash
# Install everything mcp_node and its tests need on a fresh Debian 12 node, as root.
# Idempotent: packages already present are not fetched again.
set -euo pipefail
. "$(dirname "$0")/env.sh"

debs=(podman runc qemu-system-x86 qemu-utils caddy pebble dnsmasq-base nftables haproxy bind9 bind9-utils busybox-static
      iproute2 cpio gcc libc6-dev curl procps python3-venv wrk
      systemd   # systemd-analyze: the unit file is verified by the tests
      etcd-server   # fleet mode's store; tests run their own members, never a system one
      docker-registry   # a private registry for the registry tests, run by each test
      strace)  # records every connect() of a fuzzed agent: tests stay on the machine
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  # No package may start its service here (etcd-server would start a system etcd on
  # 2379): policy-rc.d answers 101 ("not allowed") for the install, and is removed after.
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
# etcd-server enables its unit: never start a system etcd at boot either.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

# A Linux kernel and its modules for the initramfs VM builder, unpacked
# without installing (no initramfs triggers, /boot left alone).
if [ ! -f "$MCP_KERNEL" ]; then
  mkdir -p "$MCP_BUILD_DIR/kernel"
  tmp=$(mktemp -d)
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then apt-get update -qq; pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'); fi
  (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null && dpkg -x ./*.deb root)
  cp "$tmp"/root/boot/vmlinuz-* "$MCP_KERNEL"
  rm -rf "$MCP_KERNEL_MODULES"; mv "$tmp"/root/lib/modules/* "$MCP_KERNEL_MODULES"
  rm -rf "$tmp"
fi

# Python: a venv of the project's own, so the system's packages are left alone.
if [ ! -x "$top/.venv/bin/python" ]; then python3 -m venv "$top/.venv"; fi
"$top/.venv/bin/pip" install -q --disable-pip-version-check -e "$top[test]"
# Byte-compile the package, as pip does for an installed (not editable) one: with
# PYTHONDONTWRITEBYTECODE set (it is on these machines) every `mcp` run would
# otherwise compile each module it imports again, about half of its start-up.
"$top/.venv/bin/python" -m compileall -q "$top/mcp_node"
echo "setup: ok"
