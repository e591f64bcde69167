#!/usr/bin/env bash
# What tests/test_browser.py needs beyond the Python packages (playwright comes with `make install`, from the
# dev extras): a Chromium from the system's packages. Playwright drives it through executable_path, because
# `playwright install` downloads its own browser from the network. Idempotent. Never fails the build: where no
# browser can be had, the browser test is skipped with the reason.
set -uo pipefail
found() { command -v "${WORKBOOK_CHROMIUM:-chromium}" || command -v chromium || command -v chromium-browser \
          || command -v google-chrome; }
if browser="$(found)"; then
    echo "browser test: using $browser"
    exit 0
fi
if command -v apt-get >/dev/null; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null && sudo="sudo -n"
    fi
    echo "browser test: installing Debian's chromium (apt-get)"
    $sudo apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null \
        || echo "browser test: apt-get install chromium failed"
fi
if browser="$(found)"; then
    echo "browser test: using $browser"
else
    echo "browser test: no Chromium here (the test will be skipped); install one, or set WORKBOOK_CHROMIUM=/path"
fi
exit 0
