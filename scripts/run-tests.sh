#!/usr/bin/env bash
# The whole suite in pytest sessions side by side, so that its waiting (on heartbeats,
# timeouts, container boots, a hub's readiness back-off) overlaps:
#
#   beside everything: the cluster tier (its own three incusd in network namespaces) with
#                      the tests that need no daemon (marker nodaemon: the unit tier, the
#                      local hub tests);
#   on the host's daemons, first: the tests marked exclusive (they stop or freeze a daemon,
#                      or need a bridge bare of other hubs' ACLs; the install test), then all
#                      the others, in one session.
#
# The host's daemons are not shared by two sessions: run side by side, the browser tests' hub
# failed to put its ACL on the bridge while another session's containers were being deleted
# (Incus: "Failed to delete bridge children interfaces ... does not exist"), and a stop timed
# out. The background session's report is printed after the foreground's. Exit status: the
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

# The exclusive tests stop and restart the host's daemons; a cluster-tier test that also
# drives them (test_remotes) waits for them to end on this lock, held exclusively meanwhile.
export LXDSPAWNER_EXCLUSIVE_LOCK="$logs/exclusive.lock"
exec 9>"$LXDSPAWNER_EXCLUSIVE_LOCK"
flock -x 9

"$PYTHON" -m pytest "${common[@]}" -m "cluster or nodaemon" >"$logs/cluster" 2>&1 9>&- &
cluster=$!

echo "== the host's daemons to one session: the exclusive tests =="
"$PYTHON" -m pytest "${common[@]}" -m "$host and exclusive" 9>&-
exclusive=$?
[ "$exclusive" -eq 5 ] && exclusive=0 # none selected
flock -u 9
exec 9>&-

echo "== the host's daemons to one session: the others =="
"$PYTHON" -m pytest "${common[@]}" -m "$host and not exclusive"
rest=$?

echo "== waiting for the cluster tier and the daemonless tests (pid $cluster) =="
wait "$cluster"
clustered=$?
echo "== the cluster tier's and daemonless tests' session =="
cat "$logs/cluster"
echo "== exit: exclusive $exclusive, rest $rest, cluster tier $clustered =="
for status in "$exclusive" "$rest" "$clustered"; do
    [ "$status" -ne 0 ] && exit "$status"
done
exit 0
