#!/usr/bin/env bash
# Debian's Chromium for the browser test of `kvsqueeze ui` (tests/test_ui.py drives it with Playwright, whose own
# browser download is never used). Needs root and apt; does nothing when /usr/bin/chromium is there.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
echo "kvsqueeze setup: installing chromium (apt)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium > /dev/null  # headless: no fonts, printing or desktop extras
