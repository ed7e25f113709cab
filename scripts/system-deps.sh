#!/usr/bin/env bash
# Installs the system programs the service and its tests use (ffmpeg/ffprobe), where missing.
# Debian/Ubuntu with root (or sudo) only; elsewhere it says what to install and stops.
set -euo pipefail
missing=()
for tool in ffmpeg ffprobe; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Missing: ${missing[*]}. Install ffmpeg with your system's package manager, then run make again." >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "Missing: ${missing[*]}; run 'apt-get install ffmpeg' as root." >&2; exit 1; }
  sudo="sudo"
fi
echo "Installing ffmpeg (for ${missing[*]})..." >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
