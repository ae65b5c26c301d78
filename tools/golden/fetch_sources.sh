#!/usr/bin/env bash
# Downloads the Debian packages whose text makes up the tokenizer golden corpus and unpacks them
# under $CACHE (default ~/.cache/gyre-golden). Only `apt-get download` (no install, no root);
# the npm sources come from tools/node_modules (tools/setup.sh). Idempotent.
set -euo pipefail
CACHE="${CACHE:-$HOME/.cache/gyre-golden}"
mkdir -p "$CACHE/debs" "$CACHE/root"
pkgs=(python3.11-doc dict-gcide perl-doc libc6-dev manpages-ja manpages-zh unicode-cldr-core
      unicode-data texlive-science-doc)
cd "$CACHE/debs"
for p in "${pkgs[@]}"; do
  if ! ls "${p}"_*.deb >/dev/null 2>&1; then
    apt-get download "$p" >/dev/null
  fi
  if [ ! -f "$CACHE/root/.${p}.done" ]; then
    dpkg-deb -x "${p}"_*.deb "$CACHE/root"
    touch "$CACHE/root/.${p}.done"
  fi
done
echo "$CACHE/root"
