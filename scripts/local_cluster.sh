#!/usr/bin/env bash
# A rehearsal of a real cluster on one machine, with real parts: a Ray head and a second Ray node as
# separate raylets (each with its own CPUs and a resource naming it: rehearsal_head, rehearsal_node2)
# and an MLflow tracking server as its own process (SQLite backend, served artifacts), all listening
# on 127.0.0.1 only. Ray's token authentication stays on.
#
#   bash scripts/local_cluster.sh up [--dir DIR] [--cpus N] [--private-storage PATH]
#   eval "$(bash scripts/local_cluster.sh env [--dir DIR])"     # RAY_ADDRESS, RAY_AUTH_MODE, MLFLOW_TRACKING_URI,
#                                                                # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (keeps 127.0.0.1)
#   python -m raylora.train cluster.placement_strategy=SPREAD cluster.storage_path=DIR/storage
#   bash scripts/local_cluster.sh down [--dir DIR]
#
# --dir DIR (default /tmp/raylora-cluster) holds the state: ports, process ids, logs, the MLflow store.
# --cpus N: logical CPUs per node (default 2).
# --private-storage PATH: the second node gets an empty private mount at PATH (a mount namespace,
#   needs root and util-linux's unshare), as a node without the shared storage would see it;
#   raylora's preflight must then refuse cluster.storage_path=PATH.
# down stops only what up started (by process group), never other Ray clusters on the machine.
set -euo pipefail

cmd=${1:-}
[ -n "$cmd" ] && shift
DIR=/tmp/raylora-cluster
CPUS=2
PRIVATE=
while [ $# -gt 0 ]; do
    case $1 in
        --dir) DIR=$2; shift ;;
        --cpus) CPUS=$2; shift ;;
        --private-storage) PRIVATE=$2; shift ;;
        *) echo "error: unknown option $1 (see the head of $0)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
# Loopback only. On Linux Ray turns a node address of 127.0.0.1 into the machine's address, and a node
# whose address is not 127.0.0.1 binds its GCS, raylet, agents and workers to every interface. This
# variable keeps 127.0.0.1 as it is for the head and every client (it also forbids `ray start --address`,
# hence the second node's start below).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# token authentication: the nodes and the CLI calls below all use ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH)
export RAY_AUTH_MODE=token
[ -f "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ] || ray get-auth-token --generate >/dev/null

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq "$((seconds * 2))"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "error: $what did not come up within ${seconds}s; logs in $DIR/logs" >&2
    return 1
}

start() {  # start NAME COMMAND...: a new session (its own process group), pid in DIR/NAME.pid
    local name=$1
    shift
    setsid "$@" >"$DIR/logs/$name.log" 2>&1 < /dev/null &
    echo $! >"$DIR/$name.pid"
}

case $cmd in
    up)
        if [ -f "$DIR/head.pid" ] && kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
            echo "error: a cluster from $DIR is running; run: bash $0 down --dir $DIR" >&2
            exit 1
        fi
        mkdir -p "$DIR/logs" "$DIR/mlflow"
        gcs=$(free_port); dash=$(free_port); mlf=$(free_port)
        printf '%s\n' "$gcs" >"$DIR/gcs.port"
        printf '%s\n' "$mlf" >"$DIR/mlflow.port"
        printf '%s\n' "$dash" >"$DIR/dashboard.port"
        start head ray start --head --block --node-ip-address=127.0.0.1 --port="$gcs" \
            --dashboard-host=127.0.0.1 --dashboard-port="$dash" --num-cpus="$CPUS" --num-gpus=0 \
            --resources='{"rehearsal_head": 1}' --disable-usage-stats
        wait_for 60 "the Ray head" ray status --address="127.0.0.1:$gcs"
        # `ray start` for a second node, with Ray's rewrite of 127.0.0.1 to the machine's address left out
        # (services.resolve_ip_for_localhost): its address is 127.0.0.1, its listeners on loopback.
        node2=(env -u RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER "$PY" -c "import sys, ray._private.services as s
s.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = 'ray'
main()" start --block --address="127.0.0.1:$gcs" --node-ip-address=127.0.0.1 --num-cpus="$CPUS"
            --num-gpus=0 --resources='{"rehearsal_node2": 1}' --disable-usage-stats)
        if [ -n "$PRIVATE" ]; then
            mkdir -p "$PRIVATE"
            start node2 unshare --mount --propagation private sh -c \
                "mount -t tmpfs raylora-private '$PRIVATE' && exec \"\$@\"" sh "${node2[@]}"
        else
            start node2 "${node2[@]}"
        fi
        wait_for 60 "the second Ray node" sh -c \
            "ray status --address=127.0.0.1:$gcs 2>/dev/null | grep -q rehearsal_node2"
        start mlflow "$PY" -m mlflow server --host 127.0.0.1 --port "$mlf" \
            --backend-store-uri "sqlite:///$DIR/mlflow/mlflow.db" --artifacts-destination "$DIR/mlflow/artifacts"
        wait_for 90 "the MLflow server" "$PY" -c \
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$mlf/health', timeout=2)"
        echo "cluster up: Ray at 127.0.0.1:$gcs (dashboard http://127.0.0.1:$dash; authenticate with the token" \
            "from 'ray get-auth-token'), MLflow at http://127.0.0.1:$mlf"
        "$0" env --dir "$DIR"
        ;;
    env)
        [ -f "$DIR/gcs.port" ] || { echo "error: no cluster state in $DIR; run: bash $0 up" >&2; exit 1; }
        echo "export RAY_ADDRESS=127.0.0.1:$(cat "$DIR/gcs.port")"
        echo "export RAY_AUTH_MODE=token"
        echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"  # keep 127.0.0.1 (see the head of this script)
        echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$(cat "$DIR/mlflow.port")"
        ;;
    down)
        for name in mlflow node2 head; do
            [ -f "$DIR/$name.pid" ] || continue
            pid=$(cat "$DIR/$name.pid")
            kill -TERM -- "-$pid" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
            kill -KILL -- "-$pid" 2>/dev/null || true
            rm -f "$DIR/$name.pid"
        done
        if [ -n "$PRIVATE" ]; then umount "$PRIVATE" 2>/dev/null || true; fi
        # ray start recorded this cluster as the machine's current one: forget it, as `ray stop` does
        current=/tmp/ray/ray_current_cluster
        if [ -f "$DIR/gcs.port" ] && [ -f "$current" ] && grep -q ":$(cat "$DIR/gcs.port")\$" "$current"; then
            rm -f "$current"
        fi
        echo "cluster down ($DIR)"
        ;;
    *)
        awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0" | sed 's/^# \{0,1\}//'  # the header above
        [ "$cmd" = "-h" ] || [ "$cmd" = "--help" ] || exit 2
        ;;
esac
