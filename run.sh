#!/usr/bin/env bash
# vspan quick start: `./run.sh demo` (set up, then run the main job) and `./run.sh test`
# (set up, then run every check CI runs). Both install what they need: Debian tools
# (tshark, ...) through apt-get when missing, a virtual environment in .venv, and the
# project with its Python dependencies. `./run.sh bench` also installs the peer tools.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
VENV="$HERE/.venv"
PY=${PYTHON:-python3}
# vspan is imported as installed: the checkout's vspan/ folder is only the core of the
# package (analysis/, collectors/ and api/ join it when installed), so Python must not put
# the current directory first on its path (here and in every process the tests start).
export PYTHONSAFEPATH=1

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        say "need root to run: $*"; return 1; fi
}

apt_install() {  # apt_install CMD PACKAGE [CMD PACKAGE]...: install packages whose command is missing
    local missing=()
    while [ $# -gt 0 ]; do
        command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || missing+=("$2")
        shift 2
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing system packages: ${missing[*]}"
    echo "wireshark-common wireshark-common/install-setuid boolean false" | as_root debconf-set-selections || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

find_python() {  # find_python 3.13: a working interpreter of that version (pyenv's too), or nothing
    local c
    for c in "python$1" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/python"$1"; do
        if "$c" -c 'import sys' >/dev/null 2>&1; then echo "$c"; return 0; fi
    done
}

setup_python() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the virtual environment in ${VENV#"$HERE"/}"
        "$PY" -m venv "$VENV" || { apt_install python3-venv python3-venv; "$PY" -m venv "$VENV"; }
    fi
    say "installing vspan and its dependencies"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # A regular (non-editable) install: what users get, and what the tests exercise. (A
    # build/ left by an earlier install would carry deleted modules into the new one.)
    rm -rf "$HERE/build"
    "$VENV/bin/python" -m pip install -q "$HERE[dev]" 2>&1 | grep -v -E '^(WARNING: Location|$)' || true
    "$VENV/bin/python" -c "import vspan.analysis.report"
    # vspan's kernels, compiled for this machine into its kernel cache (once per version
    # of the sources; about a minute): the demo and the tests then start warm.
    "$VENV/bin/vspan" kernels --compile
}

cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        apt_install tshark tshark tcpdump tcpdump
        setup_python
        say "running the demo"
        exec "$VENV/bin/vspan" demo "$@"
        ;;
    test)
        # tshark: the oracle of the decode tests; tcpdump brings libpcap (capture filters);
        # iproute2: the network-namespace lab; util-linux: setpriv and mount; chromium: the
        # dashboard's browser test (driven by Playwright, which downloads no browser);
        # prometheus: its promtool lints /metrics (only promtool is used); openvswitch-switch
        # and ethtool: the lab's Open vSwitch hosts (userspace datapath, VM checksum offload
        # off; the tests skip, saying why, where Open vSwitch cannot run).
        apt_install tshark tshark tcpdump tcpdump ip iproute2 setpriv util-linux chromium chromium \
            promtool prometheus ovs-vswitchd openvswitch-switch ethtool ethtool
        setup_python
        say "ruff"
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        say "mypy --strict"
        # On the installed package, by the names users import (the checkout's folders
        # become vspan.* only when installed), from outside the checkout.
        (cd "$VENV" && "$VENV/bin/mypy" --config-file "$HERE/pyproject.toml" -p vspan)
        # The suite runs on the default Python and, at the same time, on the newest one vspan
        # supports (VSPAN_TEST_ALSO, default 3.13; empty: the default Python only), each in
        # its own virtual environment (.venv, .venv-3.13).
        also=${VSPAN_TEST_ALSO-3.13}
        version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
        other="" also_py=""
        if [ -n "$also" ] && [ "$also" != "$(version "$VENV/bin/python")" ]; then
            also_py=$(find_python "$also")
            if [ -n "$also_py" ]; then
                other=$also
                PY=$also_py VENV="$HERE/.venv-$other" setup_python
            else
                say "no Python $also here: the suite runs on $(version "$VENV/bin/python") only"
            fi
        fi
        cd "$HERE"
        if [ -n "$other" ]; then
            say "pytest on Python $other, in the background (its output: .pytest-$other.log)"
            basetemp=$(mktemp -d -t "vspan-pytest-$other-XXXXXX")
            "$HERE/.venv-$other/bin/pytest" -q -p no:cacheprovider --basetemp="$basetemp" "$@" \
                >"$HERE/.pytest-$other.log" 2>&1 &
            other_pid=$!
        fi
        say "pytest on Python $(version "$VENV/bin/python")"
        status=0
        "$VENV/bin/pytest" -q "$@" || status=$?
        if [ -n "$other" ]; then
            other_status=0
            wait "$other_pid" || other_status=$?
            say "pytest on Python $other (exit $other_status): the end of .pytest-$other.log"
            tail -n 25 "$HERE/.pytest-$other.log"
            [ "$other_status" -eq 0 ] || status=$other_status
        fi
        exit "$status"
        ;;
    bench)
        apt_install tshark tshark argus argus-server ra argus-client nfpcapd nfdump softflowd softflowd tcpdump tcpdump
        setup_python
        exec "$VENV/bin/python" bench/run.py "$@"
        ;;
    *)
        echo "usage: ./run.sh demo|test|bench [ARGS...]" >&2
        exit 2
        ;;
esac
