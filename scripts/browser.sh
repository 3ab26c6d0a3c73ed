#!/usr/bin/env bash
# Make sure Debian's chromium is at /usr/bin/chromium for the dashboard's browser tests.
#
# The tests drive it through the Python `playwright` package with
# executable_path=/usr/bin/chromium: no `playwright install`, no browser build
# downloaded at run time. Idempotent and quiet: does nothing when chromium is
# already there; otherwise installs the distribution's package with apt-get
# (needs root, as on the developers' machines and CI).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "scripts/browser.sh: /usr/bin/chromium is missing and apt-get is not available" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "installing chromium (apt-get) for the dashboard's browser tests" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
test -x /usr/bin/chromium
