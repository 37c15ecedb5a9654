#!/usr/bin/env bash
# A 3-node PostgreSQL cluster on loopback for pcx's fleet tests and benchmarks: a primary (n0)
# and two synchronous standbys (n1, n2) by streaming replication, from Debian's `postgresql`
# package (PostgreSQL 15; this script installs nothing). A commit is acknowledged once its WAL
# is flushed on the primary and on one standby (synchronous_commit = on, fsync = on,
# synchronous_standby_names = 'ANY 1 (n1, n2)').
#
#   scripts/pg-cluster.sh start             # initialise (first time) and start all; prints status
#   scripts/pg-cluster.sh status            # one line a node: NODE ROLE port=P [pid=PID]
#   scripts/pg-cluster.sh url               # a libpq connection string naming all three hosts
#   scripts/pg-cluster.sh stop              # fast-stop every node (SIGKILL by PID as a last resort)
#   scripts/pg-cluster.sh kill NODE         # SIGKILL a node's postmaster by PID (a crash)
#   scripts/pg-cluster.sh stop-node NODE    # fast-stop one node
#   scripts/pg-cluster.sh start-node NODE   # start one node
#   scripts/pg-cluster.sh promote NODE      # a standby becomes the primary; the other follows it
#   scripts/pg-cluster.sh destroy           # stop, and remove the cluster's directory
#
# NODE is n0, n1 or n2. ROLE is primary, standby, down (not running), retired (the primary a
# promotion replaced; never started again: `destroy` and `start` to rebuild) or unreachable
# (running, not answering yet). `start` and `status` print, e.g.
#   n0 primary port=55432 pid=1234
#   n1 standby port=55433 pid=1240
#   n2 down port=55434
#
# Environment: PCX_PG_DIR, the cluster's directory (default <repo>/target/pg-cluster; node N
# in PCX_PG_DIR/N, logging to PCX_PG_DIR/N.log); PCX_PG_BASE_PORT (default 55432: nodes on it
# and the two ports after it; read when the cluster is created, which keeps its ports, so later
# calls need only PCX_PG_DIR); PCX_PG_BIN (default /usr/lib/postgresql/15/bin).
# Auth: trust, TCP on 127.0.0.1 only (Unix sockets in the cluster's directory, mode 0700);
# superuser `postgres`, database `postgres` (no other role or database is created).
# PostgreSQL refuses to run as root: as root, every server command runs as the `postgres` OS
# user, which owns the cluster's directory; when that user cannot reach the directory (a
# parent such as /root is closed to it), the cluster lives in /tmp/pcx-pg-<uid>-<checksum of
# the path> instead (the same one on every call; `start` says where).
# Every wait is bounded (60 s).
set -euo pipefail
umask 022

# The caller's libpq settings must not redirect this script's own connections.
while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^PG' || true)

self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
repo="$(cd "$(dirname "$self")/.." && pwd)"
dir="${PCX_PG_DIR:-$repo/target/pg-cluster}"
case "$dir" in /*) ;; *) dir="$PWD/$dir" ;; esac
dir="${dir%/}"
base="${PCX_PG_BASE_PORT:-55432}"
bin="${PCX_PG_BIN:-/usr/lib/postgresql/15/bin}"
nodes=(n0 n1 n2)
wait_s=60
as_root=0
[ "$(id -u)" = 0 ] && as_root=1
# The postgres user may not be able to enter the caller's working directory.
cd /

die() { echo "pg-cluster: $*" >&2; exit 1; }
note() { echo "pg-cluster: $*" >&2; }

usage() {
    sed -n '2,/^set -euo/p' "$self" | sed '$d; s/^# \{0,1\}//' >&2
}

case "$base" in
    '' | *[!0-9]*) die "PCX_PG_BASE_PORT must be a port number, not '$base'" ;;
esac
((base >= 1024 && base <= 65533)) || die "PCX_PG_BASE_PORT=$base: the ports $base..$((base + 2)) must lie within 1024..65535"

need_pg() {
    local tool
    for tool in postgres initdb pg_ctl pg_basebackup psql; do
        [ -x "$bin/$tool" ] \
            || die "PostgreSQL 15 is not installed ($bin/$tool is missing): install Debian's package: apt-get install -y postgresql"
    done
    if ((as_root)); then
        id postgres >/dev/null 2>&1 \
            || die "running as root, the servers must run as the 'postgres' OS user, which does not exist (Debian's postgresql package creates it)"
    fi
}

check_node() {
    case "${1:-}" in
        n0 | n1 | n2) ;;
        '') die "a node is needed: n0, n1 or n2" ;;
        *) die "unknown node '$1': n0, n1 or n2" ;;
    esac
}

port_of() {
    case "$1" in
        n0) echo "$base" ;;
        n1) echo $((base + 1)) ;;
        n2) echo $((base + 2)) ;;
    esac
}

# Runs a command as the user the servers run as (postgres under root, else the caller).
as_pg() {
    if ((as_root)); then
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
        fi
    else
        "$@"
    fi
}

# Under root, the postgres user must be able to traverse every parent of the directory: if
# it cannot, the cluster lives under /tmp (the same directory on every call for one path).
wanted=""
if ((as_root)) && id postgres >/dev/null 2>&1; then
    p="$(dirname "$dir")"
    while [ ! -e "$p" ]; do p="$(dirname "$p")"; done
    if ! as_pg test -x "$p"; then
        wanted="$dir"
        dir="/tmp/pcx-pg-$(id -u)-$(printf '%s' "$wanted" | cksum | cut -d' ' -f1)"
    fi
fi

# A cluster keeps the ports it was created on (in its nodes' node.conf), and every later call
# uses them, so `url`, `status` and the rest need no PCX_PG_BASE_PORT again (without this, a
# cluster started on other ports got a `url` naming the default ones, where nothing listens).
if [ -r "$dir/n0/node.conf" ]; then
    created="$(sed -n 's/^port = \([0-9][0-9]*\)$/\1/p' "$dir/n0/node.conf" | head -n 1)"
    if [ -n "$created" ] && [ "$created" != "$base" ]; then
        [ -z "${PCX_PG_BASE_PORT:-}" ] \
            || note "the cluster in $dir was created on ports $created..$((created + 2)) and keeps them (PCX_PG_BASE_PORT=$base is ignored; \`destroy\` it to move it)"
        base="$created"
    fi
fi

# A live (not zombie) process of that PID, running postgres.
alive() {
    local pid="$1" s st comm
    if [ -r "/proc/$pid/stat" ]; then
        read -r s <"/proc/$pid/stat" 2>/dev/null || return 1
        s="${s##*) }"
        st="${s%% *}"
        case "$st" in Z | X | x) return 1 ;; esac
        read -r comm <"/proc/$pid/comm" 2>/dev/null || return 1
        [ "$comm" = postgres ]
    else
        kill -0 "$pid" 2>/dev/null
    fi
}

# The postmaster's PID, if the node is running.
pid_of() {
    local f="$dir/$1/postmaster.pid" pid=""
    [ -r "$f" ] || return 1
    read -r pid <"$f" 2>/dev/null || true
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    alive "$pid" || return 1
    echo "$pid"
}

# The PIDs of a process's children.
children_of() {
    local f s ppid
    for f in /proc/[0-9]*/stat; do
        read -r s <"$f" 2>/dev/null || continue
        s="${s##*) }"
        read -r _ ppid _ <<<"$s"
        if [ "$ppid" = "$1" ]; then
            f="${f#/proc/}"
            echo "${f%/stat}"
        fi
    done
    return 0
}

psql_node() {
    local node="$1"
    shift
    timeout 30 "$bin/psql" -X -q -At -v ON_ERROR_STOP=1 \
        "host=127.0.0.1 port=$(port_of "$node") user=postgres dbname=postgres connect_timeout=5" "$@"
}

# primary, standby, unreachable (running, not answering) or down.
role_of() {
    local r
    pid_of "$1" >/dev/null || { echo down; return 0; }
    r="$(psql_node "$1" -c "SELECT pg_is_in_recovery()" 2>/dev/null)" || { echo unreachable; return 0; }
    case "$r" in
        t) echo standby ;;
        f) echo primary ;;
        *) echo unreachable ;;
    esac
}

is_retired() { [ -f "$dir/$1.retired" ]; }
initialised() { [ -f "$dir/.pcx-pg-cluster" ] && grep -qx initialised "$dir/.pcx-pg-cluster"; }

# Processes left by a SIGKILLed postmaster (its children exit once they notice) must be gone
# before the node starts again: they would hold its shared memory.
reap_orphans() {
    local node="$1" f="$dir/$1.orphans" pid left end=$((SECONDS + 10))
    [ -f "$f" ] || return 0
    while :; do
        left=()
        while read -r pid; do
            if [ -n "$pid" ] && alive "$pid"; then left+=("$pid"); fi
        done <"$f"
        ((${#left[@]} == 0)) && break
        if ((SECONDS >= end)); then
            note "$node: processes of its killed postmaster still run after 10s (${left[*]}): SIGKILL"
            kill -9 "${left[@]}" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    rm -f "$f"
}

# A postmaster that was SIGKILLed stays a zombie until its parent (init) reaps it, and the
# server's own lock-file check takes it for a live one: wait for it to go, or, if it lingers
# (or its PID was reused), remove its stale postmaster.pid (it is dead; its children too).
clear_stale_pid() {
    local node="$1" f="$dir/$1/postmaster.pid" pid="" end=$((SECONDS + 10))
    [ -f "$f" ] || return 0
    read -r pid <"$f" 2>/dev/null || true
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= end)); then
            note "$node: its dead postmaster's PID $pid still exists after 10s: removing its stale $f"
            as_pg rm -f "$f"
            return 0
        fi
        sleep 0.1
    done
}

wait_ready() {
    local node="$1" end=$((SECONDS + wait_s))
    until psql_node "$node" -c "SELECT 1" >/dev/null 2>&1; do
        pid_of "$node" >/dev/null || die "$node exited while starting: see $dir/$node.log"
        ((SECONDS < end)) || die "$node did not accept connections on port $(port_of "$node") within ${wait_s}s: see $dir/$node.log"
        sleep 0.2
    done
}

start_node() {
    local node="$1"
    pid_of "$node" >/dev/null && return 0
    [ -d "$dir/$node" ] || die "$node has no data directory ($dir/$node): run 'start' to build the cluster"
    if is_retired "$node"; then
        die "$node is retired (a standby was promoted in its place; starting it would make a second primary): 'destroy' and 'start' to rebuild the cluster"
    fi
    reap_orphans "$node"
    clear_stale_pid "$node"
    as_pg "$bin/pg_ctl" -D "$dir/$node" -l "$dir/$node.log" -w -t "$wait_s" start >/dev/null 2>&1 \
        || die "$node did not start on port $(port_of "$node"): see $dir/$node.log"
    wait_ready "$node"
}

stop_node() {
    local node="$1" pid kids end
    pid="$(pid_of "$node")" || return 0
    mapfile -t kids < <(children_of "$pid")
    as_pg "$bin/pg_ctl" -D "$dir/$node" -m fast -w -t "$wait_s" stop >/dev/null 2>&1 || true
    end=$((SECONDS + 10))
    while alive "$pid"; do
        if ((SECONDS >= end)); then
            note "$node (pid $pid) did not stop: SIGKILL; see $dir/$node.log"
            kill -9 "$pid" 2>/dev/null || true
            printf '%s\n' "${kids[@]}" >"$dir/$node.orphans"
            reap_orphans "$node"
            break
        fi
        sleep 0.1
    done
}

# Points a standby at a primary (its postgresql.auto.conf; read when it next starts).
set_upstream() {
    local node="$1" upstream="$2" f="$dir/$1/postgresql.auto.conf" rest
    rest="$(grep -v '^[[:space:]]*primary_conninfo[[:space:]]*=' "$f" || true)"
    printf '%s\n' "$rest" \
        "primary_conninfo = 'host=127.0.0.1 port=$(port_of "$upstream") user=postgres application_name=$node connect_timeout=5'" \
        | as_pg tee "$f" >/dev/null
}

# The quorum a primary waits for: 'ANY 1 (standbys...)'.
set_quorum() {
    local node="$1"
    shift
    local names=""
    if (($# == 0)); then
        note "$node has no standby left: its commits are no longer replicated synchronously"
    else
        names="ANY 1 ($1"
        shift
        while (($#)); do
            names+=", $1"
            shift
        done
        names+=")"
    fi
    psql_node "$node" -c "ALTER SYSTEM SET synchronous_standby_names = '$names'" >/dev/null \
        && psql_node "$node" -c "SELECT pg_reload_conf()" >/dev/null \
        || die "setting synchronous_standby_names on $node failed: see $dir/$node.log"
}

# Waits until each of the given standbys streams synchronously from the primary.
wait_streaming() {
    local primary="$1"
    shift
    (($# == 0)) && return 0
    local want=("$@") end=$((SECONDS + wait_s)) list got missing s logs
    list="$(printf "'%s'," "${want[@]}")"
    list="${list%,}"
    while :; do
        got="$(psql_node "$primary" -c "SELECT string_agg(application_name, ' ' ORDER BY application_name) FROM pg_stat_replication WHERE application_name IN ($list) AND state = 'streaming' AND sync_state IN ('sync', 'quorum')" 2>/dev/null || true)"
        missing=()
        for s in "${want[@]}"; do
            [[ " $got " == *" $s "* ]] || missing+=("$s")
        done
        ((${#missing[@]} == 0)) && return 0
        if ((SECONDS >= end)); then
            logs=()
            for s in "${missing[@]}"; do logs+=("$dir/$s.log"); done
            die "${missing[*]} not streaming synchronously from $primary within ${wait_s}s: see ${logs[*]} and $dir/$primary.log"
        fi
        sleep 0.2
    done
}

status() {
    local node pid
    for node in "${nodes[@]}"; do
        if pid="$(pid_of "$node")"; then
            echo "$node $(role_of "$node") port=$(port_of "$node") pid=$pid"
        elif is_retired "$node"; then
            echo "$node retired port=$(port_of "$node")"
        else
            echo "$node down port=$(port_of "$node")"
        fi
    done
}

primary_node() {
    local node
    for node in "${nodes[@]}"; do
        if [ "$(role_of "$node")" = primary ]; then
            echo "$node"
            return 0
        fi
    done
    return 1
}

# The Unix socket directory: the cluster's, unless its path is too long for a socket (107
# bytes), then none (every connection is TCP on 127.0.0.1 anyway).
socket_dir() {
    local s="$dir/.s.PGSQL.$((base + 2))"
    if ((${#s} <= 107)); then echo "$dir"; fi
}

node_conf() {
    as_pg tee "$dir/$1/node.conf" >/dev/null <<EOF
port = $(port_of "$1")
cluster_name = '$1'
EOF
}

init() {
    local node
    mkdir -p "$dir"
    # Whatever a failed attempt left behind: this script's nodes and files only.
    for node in "${nodes[@]}"; do stop_node "$node"; done
    for node in "${nodes[@]}"; do
        rm -rf "${dir:?}/$node" "$dir/$node.log" "$dir/$node.retired" "$dir/$node.orphans" "$dir/$node.basebackup.log"
    done
    rm -f "$dir/initdb.log"
    echo building >"$dir/.pcx-pg-cluster"
    if ((as_root)); then
        chown postgres: "$dir"
        chmod 755 "$dir"
        as_pg test -w "$dir" \
            || die "the postgres user cannot write to $dir: set PCX_PG_DIR to a directory it can reach (e.g. under /tmp)"
    fi
    [ -n "$(socket_dir)" ] || note "the path $dir is too long for a Unix socket: the nodes listen on TCP only"
    as_pg "$bin/initdb" -D "$dir/n0" -A trust -U postgres -E UTF8 --no-locale --no-instructions \
        >"$dir/initdb.log" 2>&1 || die "initdb for n0 failed: see $dir/initdb.log"
    # Trust, for loopback TCP and the owner's Unix sockets only.
    as_pg tee "$dir/n0/pg_hba.conf" >/dev/null <<EOF
# pcx test cluster (scripts/pg-cluster.sh): trust on loopback only.
local   all             all                     trust
host    all             all     127.0.0.1/32    trust
host    replication     all     127.0.0.1/32    trust
EOF
    as_pg tee -a "$dir/n0/postgresql.conf" >/dev/null <<EOF

# pcx test cluster (scripts/pg-cluster.sh)
listen_addresses = '127.0.0.1'
unix_socket_directories = '$(socket_dir)'
unix_socket_permissions = 0700
fsync = on
full_page_writes = on
synchronous_commit = on
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '512MB'
hot_standby = on
wal_retrieve_retry_interval = '1s'
max_connections = 200
shared_buffers = '128MB'
log_line_prefix = '%m [%p] %q%a '
# This node's own settings (port, name): each node has its own node.conf.
include_if_exists = 'node.conf'
EOF
    node_conf n0
    start_node n0
    for node in n1 n2; do
        as_pg "$bin/pg_basebackup" \
            -d "host=127.0.0.1 port=$(port_of n0) user=postgres application_name=$node" \
            -D "$dir/$node" -R -X stream -c fast >"$dir/$node.basebackup.log" 2>&1 \
            || die "pg_basebackup of n0 for $node failed: see $dir/$node.basebackup.log and $dir/n0.log"
        node_conf "$node"
        set_upstream "$node" n0
    done
    set_quorum n0 n1 n2
    start_node n1
    start_node n2
    echo initialised >"$dir/.pcx-pg-cluster"
}

cmd="${1:-}"
case "$cmd" in
    start)
        need_pg
        [ -z "$wanted" ] || note "the postgres user cannot reach $wanted: the cluster is in $dir"
        if ! initialised; then
            init
        else
            for node in "${nodes[@]}"; do is_retired "$node" || start_node "$node"; done
        fi
        p="$(primary_node)" || die "no node is a running primary: see $dir/n0.log, $dir/n1.log, $dir/n2.log"
        standbys=()
        for node in "${nodes[@]}"; do
            [ "$node" = "$p" ] || is_retired "$node" || standbys+=("$node")
        done
        wait_streaming "$p" "${standbys[@]}"
        note "cluster in $dir (logs: $dir/<node>.log)"
        status
        ;;
    status)
        status
        ;;
    stop)
        # The primary first: its shutdown checkpoint reaches the standbys still streaming.
        p="$(primary_node)" || p=""
        [ -z "$p" ] || stop_node "$p"
        for node in "${nodes[@]}"; do stop_node "$node"; done
        status
        ;;
    destroy)
        for node in "${nodes[@]}"; do stop_node "$node"; done
        if [ -f "$dir/.pcx-pg-cluster" ]; then
            rm -rf "${dir:?}"
        elif [ -d "$dir" ]; then
            for node in "${nodes[@]}"; do
                rm -rf "${dir:?}/$node" "$dir/$node.log" "$dir/$node.retired" "$dir/$node.orphans" "$dir/$node.basebackup.log"
            done
            rmdir "$dir" 2>/dev/null || true
        fi
        ;;
    url)
        echo "host=127.0.0.1,127.0.0.1,127.0.0.1 port=$(port_of n0),$(port_of n1),$(port_of n2) user=postgres dbname=postgres target_session_attrs=read-write connect_timeout=5"
        ;;
    kill)
        node="${2:-}"
        check_node "$node"
        pid="$(pid_of "$node")" || die "$node is not running"
        # Its children exit once they notice; the next start of the node waits for them.
        children_of "$pid" >"$dir/$node.orphans"
        kill -9 "$pid"
        echo "$node killed pid=$pid"
        ;;
    stop-node)
        node="${2:-}"
        check_node "$node"
        stop_node "$node"
        status
        ;;
    start-node)
        node="${2:-}"
        check_node "$node"
        need_pg
        initialised || die "no cluster in $dir: run 'start' first"
        start_node "$node"
        status
        ;;
    promote)
        node="${2:-}"
        check_node "$node"
        need_pg
        initialised || die "no cluster in $dir: run 'start' first"
        role="$(role_of "$node")"
        [ "$role" = standby ] || die "$node is not a running standby (it is $role): only a standby can be promoted"
        # The node that stays a standby follows the new primary; one that is not a standby
        # (the old primary, down) is retired, as starting it again would make two primaries.
        others=()
        for other in "${nodes[@]}"; do
            [ "$other" = "$node" ] && continue
            is_retired "$other" && continue
            r="$(role_of "$other")"
            case "$r" in
                primary) die "$other is still a running primary: kill or stop it before promoting $node (two primaries would diverge)" ;;
                standby) others+=("$other") ;;
                down)
                    if [ -f "$dir/$other/standby.signal" ]; then others+=("$other"); else touch "$dir/$other.retired"; fi
                    ;;
                *) die "$other is running but not answering: wait for it, or stop it, before promoting $node (see $dir/$other.log)" ;;
            esac
        done
        # The quorum first (a standby ignores it): the new primary's first commit waits for it.
        set_quorum "$node" "${others[@]}"
        as_pg "$bin/pg_ctl" -D "$dir/$node" -w -t "$wait_s" promote >/dev/null 2>&1 \
            || die "promoting $node failed: see $dir/$node.log"
        end=$((SECONDS + wait_s))
        until [ "$(role_of "$node")" = primary ]; do
            ((SECONDS < end)) || die "$node did not become a primary within ${wait_s}s: see $dir/$node.log"
            sleep 0.1
        done
        running=()
        for other in "${others[@]}"; do
            set_upstream "$other" "$node"
            if pid_of "$other" >/dev/null; then
                stop_node "$other"
                start_node "$other"
                running+=("$other")
            fi
        done
        wait_streaming "$node" "${running[@]}"
        status
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        [ -z "$cmd" ] || note "unknown command '$cmd'"
        usage
        exit 2
        ;;
esac
