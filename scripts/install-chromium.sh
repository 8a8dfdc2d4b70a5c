#!/bin/sh
# The browser test drives Debian's chromium headless. Install it when we can (root + apt);
# otherwise say how, and the test is skipped (CI sets CHUNKD_REQUIRE_BROWSER=1 to fail instead).
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "chromium is missing: installing Debian's chromium for the browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
    echo "note: chromium is not installed, so the browser test will be skipped" \
         "(sudo apt-get install chromium)" >&2
fi
exit 0
