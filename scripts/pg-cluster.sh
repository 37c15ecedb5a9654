#!/usr/bin/env bash
# A 3-node PostgreSQL cluster on loopback for pcx's fleet tests and benchmarks: a primary (n0)
# and two synchronous standbys (n1, n2) by streaming replication, from Debian's `postgresql`
# package. A commit is acknowledged once its WAL is flushed on the primary and on one standby
# (synchronous_standby_names = 'ANY 1 (...)', synchronous_commit = on).
#
#   scripts/pg-cluster.sh start           # initialise (first time) and start all three; prints PIDs
#   scripts/pg-cluster.sh status          # each node: role, port, pid or down
#   scripts/pg-cluster.sh url             # a libpq connection string naming all three hosts
#   scripts/pg-cluster.sh kill NODE       # SIGKILL a node's postmaster by PID (a crash)
#   scripts/pg-cluster.sh stop-node NODE | start-node NODE
#   scripts/pg-cluster.sh promote NODE    # make a standby the primary; the other follows it
#   scripts/pg-cluster.sh stop            # stop all three (fast), by PID as a last resort
#   scripts/pg-cluster.sh destroy         # stop, and remove the cluster's directory
#
# Where: $PCX_PG_DIR (default <repo>/target/pg-cluster); ports $PCX_PG_BASE_PORT (default
# 55432) and the two after it. Auth: trust, on 127.0.0.1 only, user postgres, database postgres.
# PostgreSQL refuses to run as root: as root, every server command runs as the `postgres` user.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${PCX_PG_DIR:-$repo/target/pg-cluster}"
base="${PCX_PG_BASE_PORT:-55432}"
bin="${PCX_PG_BIN:-/usr/lib/postgresql/15/bin}"
nodes=(n0 n1 n2)
wait_s=60

die() { echo "pg-cluster: $*" >&2; exit 1; }

need_pg() {
    [ -x "$bin/postgres" ] || die "no PostgreSQL server in $bin: install Debian's package (apt-get install -y postgresql)"
}

port_of() {
    case "$1" in
        n0) echo "$base" ;;
        n1) echo $((base + 1)) ;;
        n2) echo $((base + 2)) ;;
        *) die "unknown node '$1' (n0, n1 or n2)" ;;
    esac
}

# Runs a server command as the user the server runs as.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

pid_of() {
    local f="$dir/$1/postmaster.pid"
    [ -f "$f" ] || return 1
    local pid
    pid="$(head -1 "$f")"
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

psql_node() {
    local node="$1"; shift
    psql -X -q -At "host=127.0.0.1 port=$(port_of "$node") user=postgres dbname=postgres connect_timeout=5" "$@"
}

role_of() {
    local r
    r="$(psql_node "$1" -c "SELECT pg_is_in_recovery()" 2>/dev/null)" || { echo down; return; }
    if [ "$r" = t ]; then echo standby; else echo primary; fi
}

wait_ready() {
    local node="$1" i
    for ((i = 0; i < wait_s * 10; i++)); do
        if psql_node "$node" -c "SELECT 1" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "$node did not accept connections in ${wait_s}s: see $dir/$node.log"
}

start_node() {
    local node="$1"
    if pid_of "$node" >/dev/null; then return 0; fi
    if [ -f "$dir/$node.retired" ]; then
        echo "pg-cluster: $node is retired (a standby was promoted while it was down); not started" >&2
        return 0
    fi
    as_pg "$bin/pg_ctl" -D "$dir/$node" -l "$dir/$node.log" -t "$wait_s" -w start >/dev/null \
        || die "$node did not start: see $dir/$node.log"
    wait_ready "$node"
}

stop_node() {
    local node="$1" pid i
    pid="$(pid_of "$node")" || return 0
    as_pg "$bin/pg_ctl" -D "$dir/$node" -m fast -t "$wait_s" -w stop >/dev/null 2>&1 || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

conf_primary() {
    local node="$1" standbys="$2"
    cat >>"$dir/$node/postgresql.auto.conf" <<EOF
synchronous_standby_names = 'ANY 1 ($standbys)'
EOF
}

init() {
    need_pg
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
        runuser -u postgres -- test -w "$dir" \
            || die "the postgres user cannot reach $dir (a parent directory is closed to it): set PCX_PG_DIR to a directory under one it can traverse, such as /tmp"
    fi
    as_pg "$bin/initdb" -D "$dir/n0" -A trust -U postgres --no-instructions >"$dir/initdb.log" 2>&1 \
        || die "initdb failed: see $dir/initdb.log"
    cat >>"$dir/n0/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $(port_of n0)
unix_socket_directories = '$dir'
fsync = on
synchronous_commit = on
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '256MB'
hot_standby = on
max_connections = 200
shared_buffers = '128MB'
EOF
    echo "host replication postgres 127.0.0.1/32 trust" >>"$dir/n0/pg_hba.conf"
    start_node n0
    local node
    for node in n1 n2; do
        as_pg "$bin/pg_basebackup" -h 127.0.0.1 -p "$(port_of n0)" -U postgres -D "$dir/$node" \
            -R -X stream -c fast >"$dir/$node.basebackup.log" 2>&1 \
            || die "pg_basebackup for $node failed: see $dir/$node.basebackup.log"
        cat >>"$dir/$node/postgresql.auto.conf" <<EOF
port = $(port_of "$node")
primary_conninfo = 'host=127.0.0.1 port=$(port_of n0) user=postgres application_name=$node'
EOF
    done
    conf_primary n0 "n1, n2"
    as_pg "$bin/pg_ctl" -D "$dir/n0" -w reload >/dev/null
    start_node n1
    start_node n2
}

wait_streaming() {
    local primary="$1" want="$2" i n
    for ((i = 0; i < wait_s * 10; i++)); do
        n="$(psql_node "$primary" -c "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')" 2>/dev/null || echo 0)"
        if [ "$n" -ge "$want" ]; then return 0; fi
        sleep 0.1
    done
    die "the standbys of $primary are not streaming synchronously after ${wait_s}s: see $dir/*.log"
}

status() {
    local node pid
    for node in "${nodes[@]}"; do
        if [ -f "$dir/$node.retired" ]; then
            echo "$node retired port=$(port_of "$node")"
        elif pid="$(pid_of "$node")"; then
            echo "$node $(role_of "$node") port=$(port_of "$node") pid=$pid"
        else
            echo "$node down port=$(port_of "$node")"
        fi
    done
}

primary_node() {
    local node
    for node in "${nodes[@]}"; do
        if pid_of "$node" >/dev/null && [ "$(role_of "$node")" = primary ]; then echo "$node"; return 0; fi
    done
    return 1
}

case "${1:-}" in
    start)
        need_pg
        if [ ! -d "$dir/n0" ]; then
            init
        else
            for node in "${nodes[@]}"; do [ -d "$dir/$node" ] && start_node "$node"; done
        fi
        p="$(primary_node)" || die "no primary is running: see $dir/*.log"
        live=0
        for node in "${nodes[@]}"; do [ -f "$dir/$node.retired" ] || live=$((live + 1)); done
        wait_streaming "$p" $((live - 1))
        status
        ;;
    stop)
        for node in "${nodes[@]}"; do stop_node "$node"; done
        status
        ;;
    status) status ;;
    destroy)
        for node in "${nodes[@]}"; do stop_node "$node"; done
        rm -rf "$dir"
        ;;
    url)
        echo "host=127.0.0.1,127.0.0.1,127.0.0.1 port=$(port_of n0),$(port_of n1),$(port_of n2) user=postgres dbname=postgres target_session_attrs=read-write connect_timeout=5"
        ;;
    kill)
        node="${2:?kill NODE}"
        port_of "$node" >/dev/null
        pid="$(pid_of "$node")" || die "$node is not running"
        kill -9 "$pid"
        echo "$node killed pid=$pid"
        ;;
    stop-node) stop_node "${2:?stop-node NODE}"; status ;;
    start-node) start_node "${2:?start-node NODE}"; status ;;
    promote)
        node="${2:?promote NODE}"
        port_of "$node" >/dev/null
        [ "$(role_of "$node")" = standby ] || die "$node is not a running standby"
        as_pg "$bin/pg_ctl" -D "$dir/$node" -w -t "$wait_s" promote >/dev/null || die "promoting $node failed: see $dir/$node.log"
        for ((i = 0; i < wait_s * 10; i++)); do
            [ "$(role_of "$node")" = primary ] && break
            sleep 0.1
        done
        # The other standby follows the new primary; the new primary waits for it. A node
        # that is down (the old primary) is retired: starting it again would make a second
        # primary on an older timeline.
        others=()
        for other in "${nodes[@]}"; do
            [ "$other" = "$node" ] && continue
            others+=("$other")
            if [ "$(role_of "$other")" = down ]; then
                touch "$dir/$other.retired"
                continue
            fi
            if pid_of "$other" >/dev/null && [ "$(role_of "$other")" = standby ]; then
                psql_node "$other" -c "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=$(port_of "$node") user=postgres application_name=$other'" \
                    || die "re-pointing $other failed"
                stop_node "$other"
                start_node "$other"
            fi
        done
        psql_node "$node" -c "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (${others[0]}, ${others[1]})'" >/dev/null
        psql_node "$node" -c "SELECT pg_reload_conf()" >/dev/null
        status
        ;;
    *)
        sed -n '2,18p' "$0" >&2
        exit 2
        ;;
esac
