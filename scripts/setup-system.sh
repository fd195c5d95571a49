#!/usr/bin/env bash
# Installs the Debian packages asrlab renders speech with: espeak-ng, sox, mbrola and its voices; and
# PostgreSQL, the shared Optuna/MLflow database for many sweep workers (scripts/postgres-local.sh).
# mbrola lives in Debian's contrib/non-free components, which are enabled here when missing.
# Idempotent: does nothing when every package is already installed.
set -euo pipefail

PACKAGES=(espeak-ng sox libsndfile1 mbrola
  mbrola-us1 mbrola-us2 mbrola-en1
  mbrola-de2 mbrola-de5 mbrola-fr1 mbrola-fr4 mbrola-nl2 mbrola-af1
  mbrola-pl1 mbrola-hu1 mbrola-ro1 mbrola-gr2 mbrola-sw1
  postgresql)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "[setup-system] all Debian packages present"
  exit 0
fi
echo "[setup-system] installing: ${missing[*]}"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Enable contrib + non-free (mbrola and its voices live there) unless an apt source lists both already.
# Whole words only: "non-free-firmware" is not "non-free".
has_component() {
  grep -rqsE "^(Components:|deb )(.*[[:space:]])?$1([[:space:]]|\$)" /etc/apt/sources.list /etc/apt/sources.list.d/
}
if ! has_component non-free || ! has_component contrib; then
  . /etc/os-release
  codename="${VERSION_CODENAME:?cannot tell the Debian release from /etc/os-release}"
  echo "[setup-system] enabling contrib and non-free for $codename"
  $SUDO tee /etc/apt/sources.list.d/asrlab-contrib-non-free.sources >/dev/null <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $codename
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
