#!/bin/sh
# Installs the binlink gateway as a systemd service. Idempotent: run it again to upgrade.
#   DESTDIR   stage into this root instead of / (packaging, tests); no users, no systemctl then
#   INSTALL_VENV=0  skip creating /opt/binlink/venv (tests; the venv is what takes time)
# Never overwrites an existing /etc/binlink/gateway.toml or devices.toml.
set -eu
SRC=$(cd "$(dirname "$0")/../.." && pwd)
DESTDIR=${DESTDIR:-}
INSTALL_VENV=${INSTALL_VENV:-1}
PYTHON=${PYTHON:-python3}
ROOT=${DESTDIR%/}
say() { echo "==> $*"; }

say "installing into ${ROOT:-/}"
if [ -z "$ROOT" ] && [ "$(id -u)" = 0 ] && ! id binlink >/dev/null 2>&1; then
    say "creating system user binlink (groups: dialout)"
    useradd --system --home-dir /var/lib/binlink --shell /usr/sbin/nologin --groups dialout binlink
fi

install -d -m 0755 "$ROOT/opt/binlink" "$ROOT/opt/binlink/docs" "$ROOT/etc/systemd/system"
install -d -m 0750 "$ROOT/etc/binlink" "$ROOT/var/lib/binlink"
if [ -z "$ROOT" ] && id binlink >/dev/null 2>&1; then
    chown root:binlink "$ROOT/etc/binlink"
    chown binlink:binlink "$ROOT/var/lib/binlink"
fi

if [ "$INSTALL_VENV" = 1 ]; then
    say "installing binlink into $ROOT/opt/binlink/venv"
    [ -x "$ROOT/opt/binlink/venv/bin/python" ] || "$PYTHON" -m venv "$ROOT/opt/binlink/venv"
    "$ROOT/opt/binlink/venv/bin/pip" install --quiet --upgrade "$SRC"
fi

say "unit $ROOT/etc/systemd/system/binlink-gateway.service"
install -m 0644 "$SRC/gateway/systemd/binlink-gateway.service" "$ROOT/etc/systemd/system/binlink-gateway.service"
# the collection list: installed, not enabled (one planner per site: systemctl enable --now binlink-planner)
install -m 0644 "$SRC/gateway/systemd/binlink-planner.service" "$ROOT/etc/systemd/system/binlink-planner.service"
install -m 0644 "$SRC/docs/gateway.md" "$ROOT/opt/binlink/docs/gateway.md"

if [ -e "$ROOT/etc/binlink/gateway.toml" ]; then
    say "keeping existing $ROOT/etc/binlink/gateway.toml"
else
    say "sample config $ROOT/etc/binlink/gateway.toml (edit it: sources, broker)"
    install -m 0640 "$SRC/gateway/examples/gateway.toml" "$ROOT/etc/binlink/gateway.toml"
fi
if [ -e "$ROOT/etc/binlink/devices.toml" ]; then
    say "keeping existing $ROOT/etc/binlink/devices.toml"
else
    say "empty device registry $ROOT/etc/binlink/devices.toml (make flash adds bins)"
    printf '# binlink device registry: holds device keys, keep it mode 0640\n' > "$ROOT/etc/binlink/devices.toml"
    chmod 0640 "$ROOT/etc/binlink/devices.toml"
fi
if [ -z "$ROOT" ] && id binlink >/dev/null 2>&1; then
    chgrp binlink "$ROOT/etc/binlink/gateway.toml" "$ROOT/etc/binlink/devices.toml"
fi

if [ -z "$ROOT" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    say "systemctl daemon-reload; enable binlink-gateway"
    systemctl daemon-reload
    systemctl enable binlink-gateway.service
    say "start it with: systemctl restart binlink-gateway; follow it with: journalctl -fu binlink-gateway"
fi
say "done"
