# shellcheck shell=bash disable=SC2034  # SC2034: the variables are used by the sourcing scripts
# Shared helpers for scripts/broker, scripts/test, scripts/demo, scripts/bench-peers,
# scripts/load-test and .ci/run.
# Source it; it defines variables and functions only (no side effects).
#
# Environment (all optional):
#   PULSES_CACHE               cache root                 (default: $HOME/.cache/pulses)
#   PULSES_BROKER_PORT         local broker port          (default: 9092)

PULSES_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PULSES_CACHE="${PULSES_CACHE:-$HOME/.cache/pulses}"
PULSES_BROKER_PORT="${PULSES_BROKER_PORT:-9092}"

# The Apache Kafka version of the local broker, pinned here only: scripts/kafka/pom.xml
# takes it as a property, and tests/deploy.rs checks that docker-compose.yml runs the
# same version. Kafka 4.x brokers run on Java 17.
KAFKA_VERSION="4.1.1"
KAFKA_HOME="$PULSES_CACHE/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_POM="$PULSES_ROOT/scripts/kafka/pom.xml"
# Maven's local repository, kept beside the classpath so one cache holds both.
MAVEN_REPO="$PULSES_CACHE/m2"

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

# A venv at $1 holding the pinned requirements file $2 (reinstalled when it changes).
ensure_venv() {
    local venv="$1" requirements="$2" stamp want
    stamp="$venv/.requirements-stamp"
    want="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating venv $venv"
        python3 -m venv "$venv"
    fi
    if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
        log "installing $requirements into $venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
        echo "$want" >"$stamp"
    fi
}

ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
        # shellcheck source=/dev/null
        . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 \
        || die "cargo not found on PATH (install Rust with rustup: https://rustup.rs)"
}

# Debian packages a fresh machine needs for the build (clang for RocksDB's bindgen,
# libssl-dev for librdkafka's TLS and SASL/SCRAM and the registry's HTTPS),
# the broker (a Java 17 runtime, Maven to fetch Kafka's jars; openssl for the secure
# broker's test certificates), kcat, and the browser of the dashboard test (chromium,
# driven headless by chromedriver); python3-venv for the Python SDK's tests.
PULSES_APT_PACKAGES=(kcat clang libclang-dev cmake build-essential pkg-config libssl-dev python3 python3-pip python3-venv
                     zlib1g-dev ca-certificates openssl procps maven openjdk-17-jre-headless
                     chromium chromium-driver)

# Installs whichever of PULSES_APT_PACKAGES are missing (as root, or with sudo -n).
# A command that is already on PATH (java, mvn installed another way) counts as present.
ensure_apt_packages() {
    local missing=() p
    for p in "${PULSES_APT_PACKAGES[@]}"; do
        case "$p" in
            maven) command -v mvn >/dev/null 2>&1 && continue ;;
            openjdk-17-jre-headless) command -v java >/dev/null 2>&1 && continue ;;
        esac
        [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == "install ok installed" ]] \
            || missing+=("$p")
    done
    (( ${#missing[@]} )) || { log "all system packages present"; return 0; }
    log "installing Debian packages: ${missing[*]}"
    local sudo=()
    if (( EUID != 0 )); then
        command -v sudo >/dev/null 2>&1 || die "need root to install: apt-get install -y ${missing[*]}"
        sudo=(sudo -n)
    fi
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Use-Pty=0 "${missing[@]}" </dev/null
}

_install_kafka_locked() {
    [[ -f "$KAFKA_HOME/.complete" ]] && return 0
    command -v mvn >/dev/null 2>&1 || die "mvn not found (apt-get install -y maven)"
    command -v java >/dev/null 2>&1 || die "java not found (apt-get install -y openjdk-17-jre-headless)"
    log "fetching Apache Kafka $KAFKA_VERSION (broker classpath) from Maven Central into $KAFKA_HOME"
    local started=$SECONDS tmp
    mkdir -p "$PULSES_CACHE"
    tmp="$(mktemp -d "$PULSES_CACHE/kafka.tmp.XXXXXX")"
    # Maven's output goes to a file, shown only if it fails (even -q -B prints escapes).
    if ! mvn -q -B -f "$KAFKA_POM" -Dmaven.repo.local="$MAVEN_REPO" -Dkafka.version="$KAFKA_VERSION" \
            dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1; then
        cat "$tmp/mvn.log" >&2
        rm -rf "$tmp"
        die "fetching kafka_2.13 $KAFKA_VERSION with Maven failed"
    fi
    [[ -f "$tmp/libs/kafka_2.13-$KAFKA_VERSION.jar" ]] || { rm -rf "$tmp"; die "Maven did not fetch kafka_2.13-$KAFKA_VERSION.jar"; }
    rm -rf "$KAFKA_HOME"
    mv "$tmp" "$KAFKA_HOME"
    touch "$KAFKA_HOME/.complete"
    log "Kafka $KAFKA_VERSION classpath ready ($(ls "$KAFKA_LIBS" | wc -l) jars) in $(( SECONDS - started ))s"
}

# Fetches the broker's classpath unless it is already cached.
ensure_kafka() {
    [[ -f "$KAFKA_HOME/.complete" ]] && return 0
    with_lock kafka-install _install_kafka_locked
}
