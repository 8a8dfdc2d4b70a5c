#!/bin/sh
# Install libmagic (needed by python-magic) when we can; otherwise say how.
set -e
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "libmagic is missing: installing Debian's libmagic1"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmagic1
elif command -v apt-get >/dev/null; then
    echo "libmagic is missing. Install it with:  sudo apt-get install libmagic1" >&2
    exit 1
else
    echo "libmagic is missing. Install your system's libmagic package (macOS: brew install libmagic)." >&2
    exit 1
fi
