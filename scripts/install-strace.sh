#!/bin/sh
# The power-cut durability test records the server's syscall order with strace. Install it when
# we can (root + apt); otherwise say how, and the test is skipped (CI sets CHUNKD_REQUIRE_STRACE=1
# to fail instead).
if command -v strace >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "strace is missing: installing Debian's strace for the durability test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq strace >/dev/null
else
    echo "note: strace is not installed, so the durability test will be skipped" \
         "(sudo apt-get install strace)" >&2
fi
exit 0
