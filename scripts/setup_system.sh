#!/usr/bin/env bash
# System parts the simulators need, installed idempotently on Debian 12 (bookworm) or 13 (trixie):
#   - the Vulkan loader and Mesa >= 25 lavapipe: SAPIEN (ManiSkill3) needs a Vulkan device even for
#     state observations, and refuses Debian 12's Mesa 22.3 lavapipe. Debian 13 ships Mesa 25;
#     on Debian 12 the whole Mesa stack comes from bookworm-backports (one consistent version).
#   - Mesa EGL and OSMesa for headless MuJoCo rendering (LIBERO: MUJOCO_GL=egl or osmesa).
# Machines with an NVIDIA driver render through it and need none of this.
#
#   sudo bash scripts/setup_system.sh          # install what is missing (root)
#   bash scripts/setup_system.sh --check       # only report; exit 1 if something is missing
set -euo pipefail

PACKAGES=(libvulkan1 mesa-vulkan-drivers libegl1 libegl-mesa0 libgl1-mesa-dri)
# OSMesa (MUJOCO_GL=osmesa, the fallback to EGL) left Mesa in 25.1: installed where the release
# still has it, never required.
OPTIONAL=(libosmesa6)
MIN_MESA_MAJOR=25

mesa_major() {
    local version
    version=$(dpkg-query -W -f '${Version}' mesa-vulkan-drivers 2>/dev/null || true)
    echo "${version%%.*}" | sed 's/^[0-9]*://'
}

missing() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

is_ready() {
    local major
    major=$(mesa_major)
    [[ -z "$(missing)" && -n "$major" && "$major" -ge $MIN_MESA_MAJOR ]]
}

if is_ready; then
    echo "setup_system: ready (Mesa $(dpkg-query -W -f '${Version}' mesa-vulkan-drivers), Vulkan loader, EGL)"
    exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
    echo "setup_system: missing: $(missing | tr '\n' ' ') (mesa-vulkan-drivers major: $(mesa_major || echo none), need >= $MIN_MESA_MAJOR)" >&2
    exit 1
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "setup_system: run as root (sudo bash $0) to install: ${PACKAGES[*]}" >&2
    exit 1
fi

. /etc/os-release
export DEBIAN_FRONTEND=noninteractive
target=()
case "${VERSION_CODENAME:-}" in
    bookworm)
        # Mesa 25 from backports; the source file is ours, so re-running leaves one copy.
        cat > /etc/apt/sources.list.d/rlplat-bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
        target=(-t bookworm-backports)
        ;;
    trixie | forky | sid) ;;
    *) echo "setup_system: untested distribution '${VERSION_CODENAME:-?}'; trying the default Mesa" >&2 ;;
esac
apt-get update
optional=()
for pkg in "${OPTIONAL[@]}"; do
    apt-cache show "$pkg" >/dev/null 2>&1 && optional+=("$pkg")
done
apt-get install -y --no-install-recommends "${target[@]}" "${PACKAGES[@]}" "${optional[@]}"

if ! is_ready; then
    echo "setup_system: Mesa $(dpkg-query -W -f '${Version}' mesa-vulkan-drivers) installed; SAPIEN needs >= $MIN_MESA_MAJOR" >&2
    exit 1
fi
echo "setup_system: installed (Mesa $(dpkg-query -W -f '${Version}' mesa-vulkan-drivers))"
