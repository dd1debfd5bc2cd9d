#!/bin/sh
# Entry point of the container and of the systemd unit: an optional bootstrap hand-off through a
# shared directory (public multiaddr only, never a key), then `exec unode "$@"` (default: join).
set -eu

: "${UNODE_STATE_DIR:=/var/lib/unode}"
export UNODE_STATE_DIR
[ "$#" -gt 0 ] || set -- join

peer_id() {
    unode keys show --json --state-dir "$UNODE_STATE_DIR" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["peer_id"])'
}

# Bootstrap: write "<UNODE_PUBLISH_MADDR>/p2p/<peer id>" where the others read it.
if [ -n "${UNODE_PUBLISH_MADDR:-}" ]; then
    [ -f "$UNODE_STATE_DIR/identity.key" ] ||
        unode keys init --state-dir "$UNODE_STATE_DIR" >/dev/null
    out="${UNODE_PUBLISH_FILE:-/run/unode-shared/bootstrap.maddr}"
    echo "$UNODE_PUBLISH_MADDR/p2p/$(peer_id)" >"$out.tmp"
    mv "$out.tmp" "$out"
fi

# Wait until a TCP port accepts connections: $1 like /dns4/<host>/tcp/<port>/p2p/<id>.
wait_reachable() {
    python3 - "$1" "${UNODE_WAIT_SECONDS:-120}" <<'PY'
import socket, sys, time
parts = sys.argv[1].split("/")
host, port = parts[2], int(parts[4])
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        socket.create_connection((host, port), timeout=2).close()
        break
    except OSError as err:
        if time.monotonic() > deadline:
            sys.exit(f"unode-entrypoint: {host}:{port} unreachable ({err})")
        time.sleep(1)
PY
}

# Volunteer: no UNODE_INITIAL_PEERS given, so wait for the bootstrap's published address, then
# for the bootstrap to listen (it publishes before it starts).
if [ -z "${UNODE_INITIAL_PEERS:-}" ] && [ -n "${UNODE_INITIAL_PEERS_FILE:-}" ]; then
    waited=0
    while [ ! -s "$UNODE_INITIAL_PEERS_FILE" ]; do
        if [ "$waited" -ge "${UNODE_WAIT_SECONDS:-120}" ]; then
            echo "unode-entrypoint: no $UNODE_INITIAL_PEERS_FILE after ${waited}s" >&2
            exit 2
        fi
        sleep 1
        waited=$((waited + 1))
    done
    UNODE_INITIAL_PEERS="$(cat "$UNODE_INITIAL_PEERS_FILE")"
    export UNODE_INITIAL_PEERS
    wait_reachable "$UNODE_INITIAL_PEERS"
fi

exec unode "$@"
