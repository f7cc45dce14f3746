#!/bin/sh
# The system packages `make test` needs (real Mosquitto, Redis, OpenSSL in the tests; venv support). Missing ones
# are installed with apt-get when we are root on Debian/Ubuntu; otherwise one line names the command.
set -eu
missing=""
for pair in mosquitto:mosquitto mosquitto_passwd:mosquitto redis-server:redis-server openssl:openssl; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
        case " $missing " in *" $pkg "*) ;; *) missing="$missing $pkg" ;; esac
    fi
done
# creating the virtual environment needs ensurepip (Debian: python3-venv), unless it exists already
if [ ! -x "${VENV:-.venv}/bin/python" ] && ! "${PYTHON:-python3}" -c "import ensurepip" >/dev/null 2>&1; then
    missing="$missing python3-venv"
fi
[ -z "$missing" ] && exit 0
if [ "$(id -u 2>/dev/null)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing system packages for the tests: apt-get update && apt-get install -y$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q $missing
else
    echo "error: the tests need$missing; run: sudo apt-get install -y$missing" >&2
    exit 2
fi
