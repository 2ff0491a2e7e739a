#!/usr/bin/env bash
# The whole suite in pytest sessions side by side, so that its waiting (on heartbeats,
# timeouts, container boots, a hub's readiness back-off) overlaps:
#
#   beside everything: the cluster tier (its own three incusd in network namespaces) with
#                      the tests that need no daemon (marker nodaemon: the unit tier, the
#                      local hub tests);
#   first, alone on the host's daemons: the tests marked exclusive (they stop or freeze a
#                      daemon, or need a bridge bare of other hubs' ACLs);
#   then, two sessions sharing the host's daemons: the browser and install tests (markers
#                      e2e, install) and the rest of the integration tier.
#
# Each test hub has names, keys and ACLs of its own, so sessions sharing a daemon do not see
# each other's; the sessions sharing it leave the test hubs' ACLs and volumes be at their
# start and end (LXDSPAWNER_TEST_SHARED_DAEMONS), and this script forgets them after both.
# The background sessions' reports are printed after the foreground's. Exit status: the
# first failing session's.
#
#   scripts/run-tests.sh [PYTEST_ARGS...]      PYTHON= the interpreter (default: .venv's)
#
# With PYTEST_ARGS that select tests (a path, -k, -m), one session runs them as given.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
common=(-ra --durations=15 -p no:cacheprovider)

if [ $# -gt 0 ]; then
    exec "$PYTHON" -m pytest "${common[@]}" "$@"
fi

host="not cluster and not nodaemon"
logs=$(mktemp -d /tmp/lxdspawner-tests.XXXXXX)
trap 'rm -rf "$logs"' EXIT

"$PYTHON" -m pytest "${common[@]}" -m "cluster or nodaemon" >"$logs/cluster" 2>&1 &
cluster=$!

echo "== the host's daemons to one session: the exclusive tests =="
"$PYTHON" -m pytest "${common[@]}" -m "$host and exclusive"
exclusive=$?
[ "$exclusive" -eq 5 ] && exclusive=0 # none selected

echo "== the host's daemons shared: the browser and install tests (in the background) and the rest =="
export LXDSPAWNER_TEST_SHARED_DAEMONS=1
"$PYTHON" -m pytest "${common[@]}" -m "$host and not exclusive and (e2e or install)" \
    >"$logs/browser" 2>&1 &
browser=$!
"$PYTHON" -m pytest "${common[@]}" -m "$host and not exclusive and not e2e and not install"
rest=$?
wait "$browser"
browsed=$?
[ "$browsed" -eq 5 ] && browsed=0
unset LXDSPAWNER_TEST_SHARED_DAEMONS
"$PYTHON" -c 'import asyncio
from testbench.hubtools import forget_network_acls, forget_volumes
asyncio.run(forget_network_acls(None))
asyncio.run(forget_volumes(None))'

echo "== the browser and install tests' session =="
cat "$logs/browser"
echo "== waiting for the cluster tier and the daemonless tests (pid $cluster) =="
wait "$cluster"
clustered=$?
echo "== the cluster tier's and daemonless tests' session =="
cat "$logs/cluster"
echo "== exit: exclusive $exclusive, rest $rest, browser and install $browsed, cluster tier $clustered =="
for status in "$exclusive" "$rest" "$browsed" "$clustered"; do
    [ "$status" -ne 0 ] && exit "$status"
done
exit 0
