#!/usr/bin/env bash
# Installs the system programs the service and its tests use, where missing:
#   scripts/system-deps.sh            ffmpeg/ffprobe (the service; `make serve`)
#   scripts/system-deps.sh --browser  also Debian's chromium (the page's browser test; `make test`)
#   scripts/system-deps.sh --redis    also Debian's redis-server (the RQ queue's tests start their
#                                     own, each on a free port; `make test`). A deployment runs its own Redis.
# Debian/Ubuntu with root (or sudo) only; elsewhere it says what to install and stops.
set -euo pipefail
tools=(ffmpeg ffprobe)
for arg in "$@"; do
  case "$arg" in
    --browser) tools+=(chromium) ;;
    --redis) tools+=(redis-server) ;;
    *) echo "usage: scripts/system-deps.sh [--browser] [--redis]" >&2; exit 2 ;;
  esac
done
missing=()
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
packages=()
for tool in "${missing[@]}"; do
  case "$tool" in
    ffmpeg|ffprobe) [[ " ${packages[*]-} " == *" ffmpeg "* ]] || packages+=(ffmpeg) ;;
    chromium) packages+=(chromium) ;;
    redis-server) packages+=(redis-server) ;;
  esac
done
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Missing: ${missing[*]}. Install ${packages[*]} with your system's package manager, then run make again." >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "Missing: ${missing[*]}; run 'apt-get install ${packages[*]}' as root." >&2; exit 1; }
  sudo="sudo"
fi
echo "Installing ${packages[*]} (for ${missing[*]})..." >&2
$sudo apt-get update -qq
# Debian's redis-server package does not start a server that the tests would use: each test
# starts its own (tests/redis_server.py).
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
