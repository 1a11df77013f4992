#!/bin/bash
# One search process against three (a search and two workers) on one study, through PostgreSQL and
# an `mlflow server`, as on several machines (here: separate processes and state directories on
# one machine). Run by hand, as root on Debian with PostgreSQL installed (apt-get install postgresql):
#   bench/workers_postgres.sh STUDY_FILE            (the results are printed; see bench/RESULTS.md)
set -euo pipefail
STUDY=$(realpath "$1")
R=$(mktemp -d /tmp/ftsearch-pg.XXXXXX)
B=$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | tail -1)")
cd "$(dirname "$0")/.."
chown postgres "$R"
runuser -u postgres -- "$B/initdb" -D "$R/data" -A trust -U postgres >/dev/null
runuser -u postgres -- "$B/pg_ctl" -D "$R/data" -l "$R/pg.log" -w -o "-h 127.0.0.1 -p 55432 -k $R" start >/dev/null
trap 'pkill -f "mlflow.server|huey_consumer|port 5560" || true; runuser -u postgres -- "$B/pg_ctl" -D "$R/data" -m immediate stop >/dev/null' EXIT
for n in 1 3; do
    "$B/createdb" -h 127.0.0.1 -p 55432 -U postgres "optuna$n"
    "$B/createdb" -h 127.0.0.1 -p 55432 -U postgres "mlflow$n"
    .venv/bin/mlflow server --backend-store-uri "postgresql://postgres@127.0.0.1:55432/mlflow$n" \
        --artifacts-destination "$R/artifacts$n" --host 127.0.0.1 --port 5560 --workers 1 >"$R/mlflow$n.log" 2>&1 &
    until curl -sf http://127.0.0.1:5560/health >/dev/null; do sleep 1; done
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5560 OMP_NUM_THREADS=1
    storage="postgresql://postgres@127.0.0.1:55432/optuna$n"
    start=$(date +%s.%N)
    FTSEARCH_STATE_DIR="$R/search$n" .venv/bin/ftsearch search "$STUDY" --storage "$storage" --quiet >"$R/search$n.log" 2>&1 &
    pids="$!"
    for i in $(seq 2 "$n"); do
        FTSEARCH_STATE_DIR="$R/worker$n-$i" .venv/bin/ftsearch worker "$STUDY" --storage "$storage" --quiet >"$R/worker$n-$i.log" 2>&1 &
        pids="$pids $!"
    done
    for pid in $pids; do wait "$pid"; done
    end=$(date +%s.%N)
    echo "processes $n: wall $(python3 -c "print(round($end - $start, 1))") s; $(grep '^study ' "$R/search$n.log")"
    pkill -f "mlflow.server|huey_consumer|port 5560" || true
    sleep 2
done
