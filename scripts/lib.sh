# shellcheck shell=bash disable=SC2034  # SC2034: the variables are used by the sourcing scripts
# Shared helpers for scripts/broker, scripts/kcat, scripts/test and .ci/run.
# Source it; it defines variables and functions only (no side effects).
#
# Environment (all optional):
#   PULSES_CACHE               cache root                 (default: $HOME/.cache/pulses)
#   PULSES_BROKER_PORT         local broker port          (default: 9092)
#   PULSES_KCAT_BIN            the real kcat binary       (default: /usr/bin/kcat)
#   PULSES_CONFLUENT_KAFKA_VERSION  PyPI confluent-kafka wheel whose bundled
#                              librdkafka kcat uses      (default: see below)

PULSES_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PULSES_CACHE="${PULSES_CACHE:-$HOME/.cache/pulses}"
PULSES_BROKER_PORT="${PULSES_BROKER_PORT:-9092}"

# Nisshi: 0.7.0-pre.2 is the newest that builds with our rustc and the first with
# EndTxn (transactions). See SPEC.md section 7.
NISSHI_VERSION="0.7.0-pre.2"
NISSHI_ROOT="$PULSES_CACHE/nisshi"
NISSHI_BIN="$NISSHI_ROOT/bin/nisshi"
NISSHI_BUILD_DIR="$PULSES_CACHE/nisshi-build"

# librdkafka for kcat: Debian's 2.0.2 fails the ApiVersions handshake with Nisshi,
# so kcat runs against the librdkafka bundled in the confluent-kafka manylinux wheel.
PULSES_CONFLUENT_KAFKA_VERSION="${PULSES_CONFLUENT_KAFKA_VERSION:-2.16.1}"
RDKAFKA_DIR="$PULSES_CACHE/librdkafka"
KCAT_BIN="${PULSES_KCAT_BIN:-/usr/bin/kcat}"
KCAT_WRAPPER="$PULSES_ROOT/scripts/kcat"

log() { printf '%s %s\n' "[$(date +%H:%M:%S)]" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Run "$@" while holding an exclusive lock named $1 under $PULSES_CACHE/locks.
with_lock() {
    local name="$1"; shift
    mkdir -p "$PULSES_CACHE/locks"
    (
        exec 9>"$PULSES_CACHE/locks/$name.lock"
        flock 9
        "$@"
    )
}

ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
        # shellcheck source=/dev/null
        . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 \
        || die "cargo not found on PATH (install Rust with rustup: https://rustup.rs)"
}

_install_nisshi_locked() {
    [[ -x "$NISSHI_BIN" ]] && return 0
    # An install started outside these scripts (same command) may be running: wait for it
    # instead of compiling a second copy side by side.
    if command -v pgrep >/dev/null 2>&1 && pgrep -f "cargo install nisshi" >/dev/null; then
        log "another 'cargo install nisshi' is running; waiting for it (up to 40 min)"
        local waited=0
        while pgrep -f "cargo install nisshi" >/dev/null; do
            (( waited >= 2400 )) && die "timed out waiting for the running 'cargo install nisshi'"
            sleep 10; waited=$(( waited + 10 ))
        done
        [[ -x "$NISSHI_BIN" ]] && return 0
        log "that install did not produce $NISSHI_BIN; installing now"
    fi
    ensure_cargo
    log "installing nisshi $NISSHI_VERSION into $NISSHI_ROOT (cold build: ~15 min)"
    local started=$SECONDS
    CARGO_TARGET_DIR="$NISSHI_BUILD_DIR" cargo install "nisshi@$NISSHI_VERSION" --locked \
        --no-default-features --features dynostore --root "$NISSHI_ROOT" \
        || die "cargo install nisshi@$NISSHI_VERSION failed"
    [[ -x "$NISSHI_BIN" ]] || die "cargo install finished but $NISSHI_BIN is missing"
    log "nisshi installed in $(( SECONDS - started ))s"
}

# Installs Nisshi unless $NISSHI_BIN already exists.
ensure_nisshi() {
    [[ -x "$NISSHI_BIN" ]] && return 0
    with_lock nisshi-install _install_nisshi_locked
}

_wheel_platform() {
    case "$(uname -m)" in
        x86_64) echo manylinux_2_28_x86_64 ;;
        aarch64) echo manylinux_2_28_aarch64 ;;
        *) die "no confluent-kafka manylinux wheel for architecture $(uname -m)" ;;
    esac
}

_install_librdkafka_locked() {
    local marker="$RDKAFKA_DIR/confluent-kafka.version"
    if [[ -f "$RDKAFKA_DIR/librdkafka.so.1" && -f "$marker" \
          && "$(cat "$marker")" == "$PULSES_CONFLUENT_KAFKA_VERSION" ]]; then
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || die "python3 is required (apt-get install -y python3-pip)"
    python3 -m pip --version >/dev/null 2>&1 || die "pip is required (apt-get install -y python3-pip)"
    log "fetching librdkafka from the confluent-kafka $PULSES_CONFLUENT_KAFKA_VERSION wheel into $RDKAFKA_DIR"

    local tmp
    tmp="$(mktemp -d "$PULSES_CACHE/librdkafka.tmp.XXXXXX")"
    # The bundled librdkafka does not depend on the Python ABI: pin one wheel so
    # every machine gets the same library whatever its python3.
    if ! python3 -m pip download --quiet --disable-pip-version-check --no-cache-dir \
            --no-deps --only-binary=:all: \
            --platform "$(_wheel_platform)" --implementation cp --python-version 3.11 --abi cp311 \
            --dest "$tmp/wheel" "confluent-kafka==$PULSES_CONFLUENT_KAFKA_VERSION"; then
        rm -rf "$tmp"
        die "pip download confluent-kafka==$PULSES_CONFLUENT_KAFKA_VERSION failed (is PyPI reachable?)"
    fi
    local wheel
    wheel="$(find "$tmp/wheel" -name 'confluent_kafka-*.whl' | head -n1)"
    [[ -n "$wheel" ]] || { rm -rf "$tmp"; die "no confluent_kafka wheel downloaded"; }
    python3 - "$wheel" "$tmp/x" <<'PY' || { rm -rf "$tmp"; die "cannot unpack $wheel"; }
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("confluent_kafka.libs/")])
PY
    local libs="$tmp/x/confluent_kafka.libs" lib
    lib="$(find "$libs" -maxdepth 1 -name 'librdkafka-*.so*' | head -n1)"
    [[ -n "$lib" ]] || { rm -rf "$tmp"; die "no librdkafka-*.so* in $wheel"; }
    mkdir -p "$tmp/out"
    # Sibling libraries keep their (auditwheel-mangled) names, which is what the
    # librdkafka NEEDED entries refer to; librdkafka itself is renamed for kcat.
    local f
    for f in "$libs"/*; do
        [[ "$f" == "$lib" ]] || cp "$f" "$tmp/out/"
    done
    cp "$lib" "$tmp/out/librdkafka.so.1"
    echo "$PULSES_CONFLUENT_KAFKA_VERSION" > "$tmp/out/confluent-kafka.version"

    local missing
    missing="$(LD_LIBRARY_PATH="$tmp/out" ldd "$tmp/out/librdkafka.so.1" | grep 'not found' || true)"
    [[ -z "$missing" ]] || { rm -rf "$tmp"; die "unresolved dependencies of the bundled librdkafka: $missing"; }
    if [[ -x "$KCAT_BIN" ]]; then
        local resolved
        resolved="$(LD_LIBRARY_PATH="$tmp/out" ldd "$KCAT_BIN")"
        [[ "$resolved" == *"$tmp/out/librdkafka.so.1"* ]] \
            || { rm -rf "$tmp"; die "$KCAT_BIN does not pick up $tmp/out/librdkafka.so.1"; }
    fi

    rm -rf "$RDKAFKA_DIR"
    mv "$tmp/out" "$RDKAFKA_DIR"
    rm -rf "$tmp"
    log "librdkafka ready: $RDKAFKA_DIR/librdkafka.so.1"
}

# Installs the newer librdkafka that kcat needs unless it is already in place.
ensure_librdkafka() {
    if [[ -f "$RDKAFKA_DIR/librdkafka.so.1" && -f "$RDKAFKA_DIR/confluent-kafka.version" \
          && "$(cat "$RDKAFKA_DIR/confluent-kafka.version")" == "$PULSES_CONFLUENT_KAFKA_VERSION" ]]; then
        return 0
    fi
    mkdir -p "$PULSES_CACHE"
    with_lock librdkafka-install _install_librdkafka_locked
}

# Runs the real kcat with the cached librdkafka.
run_kcat() {
    [[ -x "$KCAT_BIN" ]] || die "$KCAT_BIN not found (apt-get install -y kcat)"
    ensure_librdkafka
    LD_LIBRARY_PATH="$RDKAFKA_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$KCAT_BIN" "$@"
}
