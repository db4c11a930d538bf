# shellcheck shell=bash
# Shared set-up for scripts/test and scripts/demo. Sourced, not run: it only defines
# functions and settles ROOT/PATH, so each script picks the steps it needs.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PG_BINDIR="/usr/lib/postgresql/15/bin"
AZURITE_PREFIX="$ROOT/.tools/azurite"

# CI runs without the login shell's environment, so rustup's bin dir may be missing from PATH.
if [[ -d "$HOME/.cargo/bin" && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
export PATH

if [[ -t 1 ]]; then
    section() { printf '\n\033[1m=== %s ===\033[0m\n' "$*"; }
else
    section() { printf '\n=== %s ===\n' "$*"; }
fi

_apt_updated=
apt_install() {
    if [[ -z "$_apt_updated" ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        _apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

ensure_venv() {
    section "python venv (.venv)"
    # A venv left by another Python (or half-created) is rebuilt rather than patched.
    if ! "$VENV/bin/python" -c '' 2>/dev/null; then
        rm -rf "$VENV"
        # Debian's own python3 lacks ensurepip until python3-venv is installed.
        python3 -m venv "$VENV" || { apt_install python3-venv && python3 -m venv --clear "$VENV"; }
    fi
    local req="$ROOT/scripts/requirements-test.txt" stamp="$VENV/.requirements-test.txt"
    if ! cmp -s "$req" "$stamp"; then
        "$VENV/bin/pip" install -q --disable-pip-version-check -r "$req"
        cp "$req" "$stamp"
    fi
    # maturin develop installs into the active venv.
    export VIRTUAL_ENV="$VENV"
    PATH="$VENV/bin:$PATH"
}

ensure_build() {
    section "build extension (maturin develop --release)"
    "$VENV/bin/maturin" develop --release
}

ensure_postgres() {
    section "postgresql 15"
    if [[ ! -x "$PG_BINDIR/initdb" ]]; then
        apt_install postgresql-15
    fi
    "$PG_BINDIR/postgres" --version
}

ensure_azurite() {
    section "azurite (.tools/azurite)"
    if ! command -v npm >/dev/null; then
        apt_install nodejs npm
    fi
    if [[ ! -x "$AZURITE_PREFIX/node_modules/.bin/azurite-blob" ]]; then
        npm install --no-audit --no-fund --prefix "$AZURITE_PREFIX" azurite@3
    fi
    "$AZURITE_PREFIX/node_modules/.bin/azurite-blob" --version
}

ensure_chromium() {
    section "chromium + chromedriver (browser tests of the viewer)"
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        apt_install chromium chromium-driver
    fi
    chromium --version
}
