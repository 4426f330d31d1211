#!/usr/bin/env bash
#
# scripts/release-manifests.sh: the Homebrew formula and the Scoop manifest of one release.
#
#   scripts/release-manifests.sh OUT_DIR OWNER/REPO SUMS_FILE SOURCE_TARBALL
#
# Writes OUT_DIR/keyhole.rb and OUT_DIR/keyhole.json: packaging/homebrew/keyhole.rb and
# packaging/scoop/keyhole.json with OWNER/keyhole replaced by OWNER/REPO and their
# placeholder hashes filled in: the formula's with the SHA-256 of SOURCE_TARBALL (GitHub's
# tarball of the tag, which the formula downloads), the manifest's with the Windows zip's
# line of SUMS_FILE (sha256sum's format); the manifest's "##" note about placeholders is
# left out. Both files already carry Cargo.toml's version,
# which the release job checks against the tag. .github/workflows/release.yml runs this;
# tests/release_files.rs runs it on made-up inputs.
set -euo pipefail

if (($# != 4)); then
  sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
  exit 2
fi
out=$1 repo=$2 sums=$3 tarball=$4
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo_root/Cargo.toml" | head -n 1)
placeholder=0000000000000000000000000000000000000000000000000000000000000000

sha256() {
  if command -v sha256sum >/dev/null; then
    sha256sum "$1" | cut -d' ' -f1
  else
    shasum -a 256 "$1" | cut -d' ' -f1
  fi
}

zip="keyhole-$version-x86_64-pc-windows-msvc.zip"
# sha256sum writes "HASH  NAME" ("HASH *NAME" in binary mode).
zip_hash=$(awk -v name="$zip" '$2 == name || $2 == "*" name { print $1 }' "$sums")
[[ $zip_hash =~ ^[0-9a-f]{64}$ ]] || {
  echo "release-manifests: $sums has no SHA-256 for $zip" >&2
  exit 1
}
source_hash=$(sha256 "$tarball")

mkdir -p "$out"
fill() {
  local from=$1 to=$2 hash=$3
  sed -e "s|OWNER/keyhole|$repo|g" -e "s|$placeholder|$hash|" -e '/^ *"##"/d' \
    "$repo_root/$from" >"$to"
  if grep -q -e "$placeholder" -e 'OWNER/' "$to"; then
    echo "release-manifests: $to still has a placeholder" >&2
    exit 1
  fi
}
fill packaging/homebrew/keyhole.rb "$out/keyhole.rb" "$source_hash"
fill packaging/scoop/keyhole.json "$out/keyhole.json" "$zip_hash"
echo "$out/keyhole.rb $out/keyhole.json"
