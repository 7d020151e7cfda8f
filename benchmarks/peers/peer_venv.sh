# Shared by the setup_*.sh scripts: a virtual environment per peer tool, torch installed first
# (the local CPU wheel) and then held by a constraint so that no later step replaces it with a
# multi-GB CUDA build. Source it, then call:
#   peer_venv NAME PACKAGE VERSION [EXTRA_PACKAGE ...]    creates/updates $BENCH_HOME/NAME-venv
#   peer_report NAME DIST [DIST ...]                      prints installed versions
set -euo pipefail

BENCH_HOME="${HFCOMPRESS_BENCH_HOME:-$HOME/.cache/hfcompress-bench}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

_installed() {  # _installed VENV DIST: the installed version, empty if absent
    "$1/bin/python" - "$2" <<'PY' 2>/dev/null || true
import sys
from importlib.metadata import version
try:
    print(version(sys.argv[1]))
except Exception:
    pass
PY
}

peer_venv() {
    local venv="$BENCH_HOME/$1-venv" package="$2" wanted="$3"
    shift 3
    mkdir -p "$BENCH_HOME"
    [ -x "$venv/bin/python" ] || { echo "creating $venv"; "$PYTHON" -m venv "$venv"; }
    local have_torch
    have_torch="$(_installed "$venv" torch)"
    if [ "${have_torch%%+*}" != "$TORCH_VERSION" ]; then  # local version "+cpu" satisfies ==2.13.0
        "$venv/bin/python" -m pip install "torch==$TORCH_VERSION"
    fi
    if [ "$(_installed "$venv" "$package")" != "$wanted" ]; then
        local constraints
        constraints="$(mktemp)"
        echo "torch==$TORCH_VERSION" > "$constraints"
        "$venv/bin/python" -m pip install -c "$constraints" "$package==$wanted" "$@"
        rm -f "$constraints"
    fi
}

peer_report() {
    local venv="$BENCH_HOME/$1-venv"
    shift
    "$venv/bin/python" - "$@" <<'PY'
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except Exception:
        print(f"{name}: not installed")
PY
    echo "peer python: $venv/bin/python"
}
