#!/usr/bin/env bash
# Install the Debian packages the test suite drives as real peers, pinned to exact versions so every machine
# tests against the same servers. Idempotent and non-interactive; returns at once when everything is present.
#
#   xrdp                 a real RDP server (TLS / native RDP security layers) for the handshake module's tests
#   freerdp2-shadow-x11  FreeRDP's shadow server (freerdp-shadow-cli): the real server that does CredSSP (NLA)
#   xvfb                 a virtual X display, which the shadow server needs to have something to share
#   nmap                 rdp-enum-encryption, the reference the handshake module's answers are compared with
#   chromium             a real headless browser for the fleet report's HTML test (driven over its debugging pipe)
#   ShellCheck           the shell linter ansible-test sanity runs on the scripts (it skips the test without it)
#   mono-mcs             a C# compiler: the agent's embedded C# must compile as C# 5 (Windows PowerShell 5.1's Add-Type)
#   libkrb5-dev          Kerberos headers and krb5-config: pip builds pykerberos (pywinrm[kerberos]) against them
#
# Override a pin only on purpose:  XRDP_VERSION=... make setup
# Chromium is not pinned to a build: Debian ships it from the security archive, which keeps only the newest build and
# replaces it every few weeks, so any pin goes stale. Any installed Chromium does (the report test drives it over its
# debugging pipe); CHROMIUM_VERSION=... pins one on purpose. For a pinned package whose version is no longer offered,
# the newest one is installed instead, with a warning that names both.
#
# Every `make` runs this script: once the packages are in place it answers from a stamp (the pins and the installed
# versions it saw last), without apt-get.
set -euo pipefail

declare -A PINS=(
  [xrdp]="${XRDP_VERSION:-0.9.21.1-1+deb12u2}"
  [freerdp2-shadow-x11]="${FREERDP_VERSION:-2.11.7+dfsg1-6~deb12u1}"
  [xvfb]="${XVFB_VERSION:-2:21.1.7-3+deb12u12}"
  [nmap]="${NMAP_VERSION:-7.93+dfsg1-1}"
  [chromium]="${CHROMIUM_VERSION:-any}"
  [shellcheck]="${SHELLCHECK_VERSION:-0.9.0-1}"
  [mono-mcs]="${MONO_MCS_VERSION:-6.8.0.105+dfsg-3.3+deb12u1}"
  [libkrb5-dev]="${LIBKRB5_DEV_VERSION:-1.20.1-2+deb12u5}"
)

installed_version() {
  dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null | awk '$3 == "installed" { print $4 }'
}

root=$(cd "$(dirname "$0")/.." && pwd)
stamp="$root/.cache/system-packages.stamp"

# What is installed now, against the pins: "package wanted installed" per line, sorted.
current() {
  for package in "${!PINS[@]}"; do
    echo "$package ${PINS[$package]} $(installed_version "$package" || true)"
  done | sort
}
# Nothing to do when the pins and the installed versions are what the last successful run left.
if [[ -f "$stamp" ]] && [[ "$(current)" == "$(cat "$stamp")" ]]; then
  exit 0
fi

missing=()
for package in "${!PINS[@]}"; do
  wanted=${PINS[$package]}
  have=$(installed_version "$package" || true)
  if [[ -z "$have" ]]; then
    [[ "$wanted" == any ]] && missing+=("$package") || missing+=("$package=$wanted")
  elif [[ "$wanted" != any && "$have" != "$wanted" ]]; then
    # A different version is installed: install the pinned one (apt-get downgrades or upgrades as needed).
    missing+=("$package=$wanted")
  fi
done

write_stamp() {
  mkdir -p "$(dirname "$stamp")"
  current > "$stamp"
  chown --reference="$root" "$stamp" 2>/dev/null || true
}
if [[ ${#missing[@]} -eq 0 ]]; then
  write_stamp
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo --preserve-env=XRDP_VERSION,FREERDP_VERSION,XVFB_VERSION,NMAP_VERSION,CHROMIUM_VERSION,SHELLCHECK_VERSION,MONO_MCS_VERSION,LIBKRB5_DEV_VERSION "$0" "$@"
  fi
  echo "install-system-packages: need root (or sudo) to install: ${missing[*]}" >&2
  exit 1
fi

# Installing xrdp must not leave a server listening on every interface: the tests start their own instances on
# loopback. Without systemd, invoke-rc.d asks policy-rc.d; a temporary "deny" keeps package scripts from
# starting services, and is removed again unless the machine already had one.
own_policy=""
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  own_policy=/usr/sbin/policy-rc.d
fi
cleanup() { [[ -z "$own_policy" ]] || rm -f "$own_policy"; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
resolved=()
for spec in "${missing[@]}"; do
  package=${spec%%=*} wanted=${spec#*=}
  if [[ "$spec" != *=* ]]; then
    resolved+=("$package")
  elif apt-cache madison "$package" | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF -- "$wanted"; then
    resolved+=("$spec")
  else
    candidate=$(apt-cache policy "$package" | awk '/Candidate:/ { print $2 }')
    if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
      echo "install-system-packages: $package is not offered by the configured Debian mirrors" >&2
      exit 1
    fi
    echo "install-system-packages: WARNING: $package $wanted is no longer offered; installing $candidate (update the pin)" >&2
    [[ "$(installed_version "$package" || true)" == "$candidate" ]] || resolved+=("$package=$candidate")
  fi
done
if [[ ${#resolved[@]} -eq 0 ]]; then
  write_stamp
  exit 0
fi
missing=("${resolved[@]}")
echo "install-system-packages: installing ${missing[*]}"
apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null

# With systemd present, the package may have started and enabled the system-wide xrdp anyway; the tests
# never need it.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now xrdp xrdp-sesman >/dev/null 2>&1 || true
fi
write_stamp
echo "install-system-packages: done"
