#!/bin/sh
# install-tool.sh COMMAND PACKAGE PURPOSE: a test needs Debian's PACKAGE (for COMMAND). Install it
# when we can (root + apt); otherwise say how, and that test is skipped (CI sets
# CHUNKD_REQUIRE_BROWSER / CHUNKD_REQUIRE_STRACE so that it fails instead).
command="$1" package="$2" purpose="$3"
if command -v "$command" >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "$command is missing: installing Debian's $package for $purpose"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
else
    echo "note: $command is not installed, so $purpose will be skipped" \
         "(sudo apt-get install $package)" >&2
fi
exit 0
