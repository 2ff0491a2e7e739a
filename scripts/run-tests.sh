#!/usr/bin/env bash
# The whole suite in two pytest sessions side by side: the cluster tier (its own three
# incusd in network namespaces, mostly waiting on heartbeats and timeouts) with the tests
# that need no daemon (marker nodaemon: the unit tier, the local hub tests), and everything
# else (the host's Incus and LXD daemons, the hubs and the browser). They share no daemon, bridge or
# hub, so neither waits for the other; the second session's report is printed after the
# first's. Exit status: the first failing session's.
#
#   scripts/run-tests.sh [PYTEST_ARGS...]      PYTHON= the interpreter (default: .venv's)
#
# With PYTEST_ARGS that select tests (a path, -k, -m), one session runs them as given.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
common=(-ra --durations=15)

if [ $# -gt 0 ]; then
    exec "$PYTHON" -m pytest "${common[@]}" "$@"
fi

log=$(mktemp /tmp/lxdspawner-cluster-tests.XXXXXX)
trap 'rm -f "$log"' EXIT
"$PYTHON" -m pytest "${common[@]}" -p no:cacheprovider -m "cluster or nodaemon" >"$log" 2>&1 &
cluster=$!
"$PYTHON" -m pytest "${common[@]}" -m "not cluster and not nodaemon"
rest=$?
echo "== waiting for the cluster tier and the daemonless hub tests (pid $cluster) =="
wait "$cluster"
clustered=$?
echo "== the cluster tier's and daemonless hub tests' session =="
cat "$log"
echo "== exit: cluster tier $clustered, the rest $rest =="
[ "$rest" -ne 0 ] && exit "$rest"
exit "$clustered"
