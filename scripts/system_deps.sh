#!/usr/bin/env bash
# The system programs the test suite uses as outside references, installed when missing:
#   go                   Go's text/template, the engine behind Ollama's TEMPLATE (tests/test_ollama_template.py)
#   chromium, chromedriver  a real browser for the dashboard and the origin checks (tests/test_dashboard.py)
# `make test` runs this before pytest. With apt and root (or password-less sudo) it installs the
# Debian packages quietly (the log is printed only if apt fails); otherwise it prints one line
# that says what to install by hand and exits 1.
set -uo pipefail

# LORAKIT_ALLOW_NO_GO=1 / LORAKIT_ALLOW_NO_BROWSER=1: those tests are skipped, nothing installed.
need=()
if [ "${LORAKIT_ALLOW_NO_GO:-}" != 1 ]; then
    command -v go >/dev/null || need+=(golang-go)
fi
if [ "${LORAKIT_ALLOW_NO_BROWSER:-}" != 1 ]; then
    { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } || need+=(chromium)
    command -v chromedriver >/dev/null || need+=(chromium-driver)
fi
[ ${#need[@]} -eq 0 ] && exit 0

by_hand="install them by hand (Debian/Ubuntu: sudo apt-get install ${need[*]}), or skip those tests with LORAKIT_ALLOW_NO_GO=1 LORAKIT_ALLOW_NO_BROWSER=1"
if ! command -v apt-get >/dev/null; then
    echo "make test: the tests need ${need[*]}, and this machine has no apt-get: $by_hand" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "make test: the tests need ${need[*]}, and installing them needs root: $by_hand" >&2
        exit 1
    fi
fi

echo "make test: installing ${need[*]} (apt-get, once)"
log="$(mktemp)"
if ! { "${sudo[@]}" apt-get update -q && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q "${need[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "make test: apt-get could not install ${need[*]}: $by_hand" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
