#!/bin/sh
# Installs the binlink gateway as a systemd service. Idempotent: run it again to upgrade.
#   DESTDIR   stage into this root instead of / (packaging, tests); no user is created, systemctl is not
#             called. The venv is built in the stage and then relocated to its final path
#             (/opt/binlink/venv: scripts' #! lines, pyvenv.cfg and the compiled files name that path),
#             so the stage can be packaged or copied to / as it is.
#   INSTALL_VENV=0  skip creating /opt/binlink/venv (tests; the venv is what takes time)
#   BINDIR    where the `binlink` command is linked for administrators (default /usr/local/bin)
#   SERVICE_USER  the service's user (default binlink; the units name binlink)
# Never overwrites an existing /etc/binlink/gateway.toml or devices.toml, a unit edited locally, or
# a drop-in (/etc/systemd/system/<unit>.d/*.conf: the place for local changes, docs/gateway.md).
set -eu
SRC=$(cd "$(dirname "$0")/../.." && pwd)
DESTDIR=${DESTDIR:-}
INSTALL_VENV=${INSTALL_VENV:-1}
PYTHON=${PYTHON:-python3}
BINDIR=${BINDIR:-/usr/local/bin}
SERVICE_USER=${SERVICE_USER:-binlink}
ROOT=${DESTDIR%/}
VENV=/opt/binlink/venv
say() { echo "==> $*"; }

say "installing into ${ROOT:-/}"
if [ -z "$ROOT" ] && [ "$(id -u)" = 0 ] && ! id "$SERVICE_USER" >/dev/null 2>&1; then
    say "creating system user $SERVICE_USER (groups: dialout)"
    useradd --system --home-dir /var/lib/binlink --shell /usr/sbin/nologin --groups dialout "$SERVICE_USER"
fi
OWNED=0  # root with the service user present: the files get their owners (a stage too)
if [ "$(id -u)" = 0 ] && id "$SERVICE_USER" >/dev/null 2>&1; then OWNED=1; fi

install -d -m 0755 "$ROOT/opt/binlink" "$ROOT/opt/binlink/docs" "$ROOT/opt/binlink/share/systemd" \
    "$ROOT/etc/systemd/system" "$ROOT$BINDIR"
install -d -m 0750 "$ROOT/etc/binlink" "$ROOT/var/lib/binlink"
if [ "$OWNED" = 1 ]; then
    chown "root:$SERVICE_USER" "$ROOT/etc/binlink"
    chown "$SERVICE_USER:$SERVICE_USER" "$ROOT/var/lib/binlink"
fi

if [ "$INSTALL_VENV" = 1 ]; then
    say "installing binlink into $ROOT$VENV"
    [ -x "$ROOT$VENV/bin/python" ] || "$PYTHON" -m venv "$ROOT$VENV"
    "$ROOT$VENV/bin/python" -m pip install --quiet --upgrade "$SRC"  # not bin/pip: a relocated stage's scripts name /opt
    if [ -n "$ROOT" ]; then
        say "relocating the venv to its final path $VENV"
        grep -rlI --null -F "$ROOT$VENV" "$ROOT$VENV/bin" "$ROOT$VENV/pyvenv.cfg" 2>/dev/null \
            | xargs -0 -r sed -i "s#$ROOT$VENV#$VENV#g"
        # compiled files name their source: compiled again as they will be found at run time
        "$ROOT$VENV/bin/python" -m compileall -q -f -s "$ROOT" -p / "$ROOT$VENV/lib" >/dev/null || true
    fi
fi
say "command $ROOT$BINDIR/binlink -> $VENV/bin/binlink (administrators: sudo binlink registry ...)"
ln -sfn "$VENV/bin/binlink" "$ROOT$BINDIR/binlink"

# A unit is replaced only while it is the one binlink installed last time (a pristine copy is kept
# in /opt/binlink/share/systemd); one edited locally is kept, the new one written beside it.
install_unit() {
    unit=$1
    dst="$ROOT/etc/systemd/system/$unit"
    last="$ROOT/opt/binlink/share/systemd/$unit"
    if [ -e "$dst" ] && ! cmp -s "$dst" "$last" && ! cmp -s "$dst" "$SRC/gateway/systemd/$unit"; then
        say "KEEPING $dst: it was edited here. The new unit is $dst.binlink-new: merge it, then move your" \
            "changes to a drop-in (systemctl edit ${unit%.service}) and delete $dst so upgrades reach it"
        install -m 0644 "$SRC/gateway/systemd/$unit" "$dst.binlink-new"
    else
        say "unit $dst"
        install -m 0644 "$SRC/gateway/systemd/$unit" "$dst"
    fi
    install -m 0644 "$SRC/gateway/systemd/$unit" "$last"
    if [ -d "$dst.d" ]; then
        say "drop-ins kept: $(ls "$dst.d" | tr '\n' ' ')"
    fi
}
install_unit binlink-gateway.service
# the collection list: installed, not enabled (one planner per site: systemctl enable --now binlink-planner)
install_unit binlink-planner.service
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
    say "empty device registry $ROOT/etc/binlink/devices.toml (sudo binlink registry add / import adds bins)"
    printf '# binlink device registry: holds device keys, keep it mode 0640\n' > "$ROOT/etc/binlink/devices.toml"
    chmod 0640 "$ROOT/etc/binlink/devices.toml"
    if [ "$OWNED" = 1 ]; then chown "root:$SERVICE_USER" "$ROOT/etc/binlink/devices.toml"; fi
fi
if [ "$OWNED" = 1 ]; then
    chgrp "$SERVICE_USER" "$ROOT/etc/binlink/gateway.toml"
fi

if [ -z "$ROOT" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    say "systemctl daemon-reload; enable binlink-gateway"
    systemctl daemon-reload
    systemctl enable binlink-gateway.service
    say "start it with: systemctl restart binlink-gateway; follow it with: journalctl -fu binlink-gateway"
fi
say "done"
