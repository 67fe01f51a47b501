#!/usr/bin/env bash
# Set up the project's virtual environment, idempotently: a second run with nothing changed takes well under a second.
#
#   scripts/setup-env.sh                          .venv with napari-nir (editable) and its base dependencies
#   scripts/setup-env.sh --gui-libs --extras testing
#                                                 also the Debian packages for a headless Qt/OpenGL display (Xvfb)
#                                                 and the test extras (napari[pyqt6], pytest, pytest-qt, pytest-xvfb, ...)
#
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default torch==2.13.0),
# TORCH_PIP_ARGS (extra pip arguments for the torch step, e.g. "--index-url https://download.pytorch.org/whl/cpu"
# for a small CPU-only build on a machine where no torch wheel is at hand).
#
# torch is installed FIRST and pinned: an unpinned torch, pulled in as a dependency, would fetch a multi-GB build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}
EXTRAS=""
GUI_LIBS=0
while [ $# -gt 0 ]; do
    case "$1" in
        --extras) EXTRAS=$2; shift 2 ;;
        --gui-libs) GUI_LIBS=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "setup-env: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { printf '[setup-env] %s\n' "$*"; }
step_start() { STEP_T0=$(date +%s.%N); log "$*"; }
step_done() { log "  done in $(awk -v a="$STEP_T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"; }
is_root() { [ "$(id -u)" = 0 ]; }
APT_UPDATED=0
apt_install() {  # apt_install PKG...: as root on Debian/Ubuntu only
    export DEBIAN_FRONTEND=noninteractive
    if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- 1. system libraries for Qt (xcb platform) + OpenGL (Mesa llvmpipe) under Xvfb -------------------------------
# Read off PyQt6 6.x's libqxcb.so / libQt6XcbQpa / libQt6Gui / libQt6OpenGL with ldd on Debian 12, plus the Mesa
# driver that gives vispy an OpenGL context inside Xvfb.
GUI_PACKAGES=(
    xvfb
    libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0
    libxcb-xfixes0 libxcb-xinerama0 libxcb-xkb1 libx11-xcb1 libxkbcommon-x11-0
    libegl1 libgl1 libglx-mesa0 libgl1-mesa-dri
    libfontconfig1 libdbus-1-3 libglib2.0-0
)
if [ "$GUI_LIBS" = 1 ]; then
    if command -v dpkg-query >/dev/null 2>&1; then
        missing=()
        for p in "${GUI_PACKAGES[@]}"; do
            [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || missing+=("$p")
        done
        if [ ${#missing[@]} -eq 0 ]; then
            log "system libraries for Xvfb + Qt: all present"
        elif is_root && command -v apt-get >/dev/null 2>&1; then
            step_start "apt-get install ${missing[*]}"
            apt_install "${missing[@]}"
            step_done
        else
            log "WARNING: missing Debian packages for the GUI tests: ${missing[*]}"
            log "         install them with: sudo apt-get install ${missing[*]}"
        fi
    else
        log "not a Debian system: skipping the Xvfb/Qt library check (GUI tests need an X display or Xvfb)"
    fi
fi

# --- 2. the virtual environment -------------------------------------------------------------------------------------
VPY="$VENV/bin/python"
if [ -x "$VPY" ] && "$VPY" -c 'import sys' >/dev/null 2>&1; then
    :
else
    step_start "creating $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
        echo "setup-env: napari-nir needs Python >= 3.10; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=python3.11" >&2
        exit 1
    }
    rm -rf "$VENV"
    if ! "$PYTHON" -m venv "$VENV"; then
        # Debian's own python3 ships venv/ensurepip separately
        if is_root && command -v apt-get >/dev/null 2>&1; then
            rm -rf "$VENV"
            apt_install python3-venv
            "$PYTHON" -m venv "$VENV"
        else
            echo "setup-env: '$PYTHON -m venv' failed; on Debian/Ubuntu: sudo apt-get install python3-venv" >&2
            exit 1
        fi
    fi
    step_done
fi

# --- 3. packages: skipped when this exact setup (pyproject.toml, torch spec, extras) was installed before -------------
HASH=$( { cat pyproject.toml; echo "$TORCH_SPEC $TORCH_PIP_ARGS"; } | sha256sum | cut -c1-16)
STAMP="$VENV/.napari-nir-installed-${EXTRAS:-base}"
up_to_date() {  # a base install is also satisfied by any install with extras
    local f candidates=("$STAMP")
    [ -z "$EXTRAS" ] && candidates=("$VENV"/.napari-nir-installed-*)
    for f in "${candidates[@]}"; do
        [ -f "$f" ] && [ "$(cat "$f")" = "$HASH" ] && return 0
    done
    return 1
}
export PIP_ROOT_USER_ACTION=ignore
if up_to_date \
    && "$VPY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("napari_nir") is None)' 2>/dev/null; then
    log "$VENV is up to date (${EXTRAS:-base} install; delete $VENV/.napari-nir-installed-* to force a reinstall)"
    exit 0
fi

step_start "pip install -U pip"
"$VPY" -m pip install -q -U pip
step_done

step_start "pip install $TORCH_SPEC $TORCH_PIP_ARGS (first, so nothing pulls another torch build)"
# shellcheck disable=SC2086
"$VPY" -m pip install -q "$TORCH_SPEC" $TORCH_PIP_ARGS
step_done

TARGET="."
[ -n "$EXTRAS" ] && TARGET=".[$EXTRAS]"
step_start "pip install -e \"$TARGET\""
"$VPY" -m pip install -q -e "$TARGET"
step_done

echo "$HASH" > "$STAMP"
log "ready: $("$VPY" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("napari-nir", "torch", "numpy")))')"
