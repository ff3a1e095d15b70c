#!/usr/bin/env bash
# The declared floors hold: pinpool's library (and the pinpool-lint bin) compiles with every
# direct dependency at the lowest version its requirement in Cargo.toml allows, so a service
# whose lockfile holds older releases gets either a working build or a resolver upgrade, never
# compile errors inside pinpool.
#
# In a copy of the crate as a user's build sees it (no dev-dependencies, benches or examples),
# each direct dependency's requirement becomes `=FLOOR` (the floors are read from Cargo.toml,
# through `cargo metadata`: "1.39" is 1.39.0), a fresh lockfile is resolved, and then: `cargo
# check` of the library with every feature, of pinpool-lint, and of the library with none. On
# failure it says which floor to raise, and exits non-zero.
#
# Usage: scripts/check-floors.sh  (network to crates.io; its own target dir,
# ${CARGO_TARGET_DIR:-target}/floors, so the main build is left alone).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target_dir="${CARGO_TARGET_DIR:-$root/target}/floors"
case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac

work=$(mktemp -d "${TMPDIR:-/tmp}/pinpool-floors.XXXXXX")
trap 'rm -rf "$work"' EXIT

fail() {
  echo "check-floors: $*" >&2
  exit 1
}

# What `cargo check` of the library needs: the manifest, the sources, the README (the crate's
# doc, through include_str!).
cp -R src README.md "$work/"
# The manifest less what only this repository's own builds use: [dev-dependencies] (and any
# target-specific ones), [[bench]] and [[example]] (their files are not copied). Its own
# [workspace], so no enclosing directory's manifest is taken for one.
awk '
  /^[[:space:]]*\[/ {
    header = $0
    sub(/[[:space:]]*#.*/, "", header)
    skip = (header ~ /^[[:space:]]*\[\[(bench|example|test)\]\]$/ || header ~ /dev-dependencies\]$/)
  }
  !skip { print }
' Cargo.toml >"$work/Cargo.toml"
printf '\n[workspace]\n' >>"$work/Cargo.toml"
cd "$work"

# The direct dependencies (normal and build; optional ones too) and their floors, as cargo reads
# the manifest: a requirement "1.39" is "^1.39", whose floor is 1.39.0.
# (Python reads cargo's JSON: it is on every machine of this project, jq is not.)
deps_json() {
  cargo metadata --no-deps --format-version 1 --offline | python3 -c '
import json, sys
for dep in json.load(sys.stdin)["packages"][0]["dependencies"]:
    if dep["kind"] != "dev":
        print(dep["rename"] or dep["name"], dep["name"], dep["req"])
' | sort -u
}
floors=$(deps_json)
[ -n "$floors" ] || fail "no dependencies read from Cargo.toml"

declare -a keys=() names=() floor_of=()
while read -r key name req; do
  if [[ ! "$req" =~ ^\^([0-9]+)(\.([0-9]+))?(\.([0-9]+))?$ ]]; then
    fail "$name: requirement \"$req\" is not of the form \"MAJOR.MINOR[.PATCH]\"; its floor cannot be checked"
  fi
  floor="${BASH_REMATCH[1]}.${BASH_REMATCH[3]:-0}.${BASH_REMATCH[5]:-0}"
  keys+=("$key")
  names+=("$name")
  floor_of+=("$floor")
done <<<"$floors"

# The copy's requirements become `=FLOOR`, and the resolver picks everything else: the newest
# releases that fit those floors, or an error naming what excludes one. (Setting each floor with
# `cargo update --precise` in a fresh lockfile would keep the newest releases of its dependents,
# e.g. a tokio-util that asks for the newest tokio: floors far above what pinpool needs.)
for i in "${!names[@]}"; do
  key=${keys[$i]} name=${names[$i]} floor=${floor_of[$i]}
  awk -v n="$key" -v f="$floor" '
    /^[[:space:]]*\[/ { deps = ($0 ~ /^[[:space:]]*\[(target\..*\.)?(build-)?dependencies\][[:space:]]*(#.*)?$/) }
    deps && index($0, n " = ") == 1 {
      if (!sub(/^[^=]+= "[^"]*"/, n " = \"=" f "\"") && !sub(/version = "[^"]*"/, "version = \"=" f "\""))
        exit 1
    }
    { print }
  ' Cargo.toml >Cargo.toml.new || fail "$name: cannot set its floor in the copy of Cargo.toml"
  mv Cargo.toml.new Cargo.toml
done
pinned=$(deps_json)
for i in "${!names[@]}"; do
  grep -qxF "${keys[$i]} ${names[$i]} =${floor_of[$i]}" <<<"$pinned" ||
    fail "${names[$i]}: its requirement in the copy of Cargo.toml is not =${floor_of[$i]}"
done

echo "check-floors: resolving with every direct dependency at its floor:"
for i in "${!names[@]}"; do
  printf '    %-24s %s\n' "${names[$i]}" "${floor_of[$i]}"
done
if ! out=$(cargo generate-lockfile 2>&1); then
  echo "$out" | sed 's/^/    /' >&2
  echo >&2
  fail "no dependency graph holds every floor at once: raise, in Cargo.toml, the floor of the dependency cargo could not select above to what the package it names requires"
fi

# On a compile error, the dependencies to look at: those that did not compile themselves (a floor
# too old for this toolchain, or for another crate of the graph), else those whose paths the
# errors name (tokio_postgres:: is tokio-postgres).
check() {
  echo "check-floors: cargo check $*"
  local log="$work/check.log" name broken=() named=()
  if ! CARGO_TARGET_DIR="$target_dir" cargo check --locked --quiet "$@" 2>"$log"; then
    cat "$log" >&2
    echo >&2
    for name in "${names[@]}"; do
      grep -q "could not compile \`$name\`" "$log" && broken+=("$name")
      grep -Eq "(^|[^[:alnum:]_])${name//-/_}::" "$log" && named+=("$name")
    done
    if [ ${#broken[@]} -gt 0 ]; then
      fail "${broken[*]} does not compile with the floors above (cargo check $*): raise its floor in Cargo.toml to a release that compiles here${named:+, or the floor of what its errors name: ${named[*]}}"
    elif [ ${#named[@]} -gt 0 ]; then
      fail "pinpool or a dependency does not compile with the floors above (cargo check $*); the errors name ${named[*]}: raise that floor in Cargo.toml to the release that has what the code uses (see its CHANGELOG)"
    fi
    fail "pinpool or a dependency does not compile with the floors above (cargo check $*): raise, in Cargo.toml, the floor of the dependency the errors are about to the release that has what the code uses"
  fi
}
check --lib --all-features
check --bin pinpool-lint --features cli
check --lib
echo "check-floors: ok, every floor declared in Cargo.toml builds"
