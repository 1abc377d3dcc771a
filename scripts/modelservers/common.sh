# Shared by scripts/mlflow and scripts/mlserver (sourced, not run). The caller
# sets NAME (log prefix), VENV, REQUIREMENTS, DATA, START_TIMEOUT,
# STOP_TIMEOUT, and defines launch_server (starts the server on $PORT in the
# background) and ready_path (the URL path that answers 200 once it serves).
#
# Each server is installed into its own virtualenv, outside the product's
# .venv: MLflow and MLServer pull in ~300 MB of dependencies (pandas, grpc,
# SQLAlchemy, ...) whose pins fight each other and would weigh on every
# ehrbridge install. Only the tests and benchmarks use them.

LOG_DIR="$DATA/logs"
SERVER_LOG="$LOG_DIR/server.log"
PID_FILE="$DATA/server.pid"
PORT_FILE="$DATA/port"

log() { printf '%s: %s\n' "$NAME" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ------------------------------------------------------------------ venv ----

venv_ready() {
    [ -x "$VENV/bin/python" ] && [ -f "$VENV/.complete" ] \
        && [ "$(cat "$VENV/.complete")" = "$(md5sum <"$REQUIREMENTS" | cut -d' ' -f1)" ]
}

install_venv() {
    venv_ready && return 0
    mkdir -p "$(dirname "$VENV")"
    exec 9>"$VENV.lock"
    command -v flock >/dev/null 2>&1 && flock 9
    venv_ready && return 0
    local python="${PYTHON:-python3}" pip_log="$VENV.pip.log"
    log "installing $(grep -cv '^\s*\(#\|$\)' "$REQUIREMENTS") pinned packages from PyPI into $VENV"
    rm -rf "$VENV"
    "$python" -m venv "$VENV" || die "cannot create a virtualenv with $python"
    if ! { "$VENV/bin/python" -m pip install --quiet --upgrade pip \
        && "$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"; } >"$pip_log" 2>&1; then
        tail -n 30 "$pip_log" >&2
        die "pip could not install $REQUIREMENTS (full output: $pip_log)"
    fi
    md5sum <"$REQUIREMENTS" | cut -d' ' -f1 >"$VENV/.complete"
    exec 9>&-
}

# ----------------------------------------------------------------- ports ----

port_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    "${PYTHON:-python3}" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

base_url() {
    [ -f "$PORT_FILE" ] || return 1
    echo "http://127.0.0.1:$(cat "$PORT_FILE")"
}

# --------------------------------------------------------------- process ----

alive() {
    local state=""
    kill -0 "$1" 2>/dev/null || return 1
    [ -r "/proc/$1/stat" ] && read -r _ _ state _ <"/proc/$1/stat"
    [ "$state" != Z ]
}

running_pid() {
    local pid
    [ -f "$PID_FILE" ] || return 1
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    case "$pid" in '' | *[!0-9]*) return 1 ;; esac
    alive "$pid" || return 1
    # A stale pid file after a reboot may name someone else's process.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$VENV" || return 1
    echo "$pid"
}

answers_ready() {
    curl -fsS -o /dev/null --max-time 2 "$(base_url)$(ready_path)" 2>/dev/null
}

wait_ready() {
    local deadline=$((SECONDS + START_TIMEOUT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ! running_pid >/dev/null; then
            tail -n 40 "$SERVER_LOG" >&2 2>/dev/null || true
            die "the server exited during start-up (log: $SERVER_LOG)"
        fi
        answers_ready && return 0
        sleep 0.2
    done
    tail -n 40 "$SERVER_LOG" >&2 2>/dev/null || true
    stop_server
    die "not ready within ${START_TIMEOUT}s"
}

# The server runs in its own session (setsid) so a Ctrl-C in a terminal or a
# test runner does not reach it, and so stop can signal its whole process
# group (MLflow's uvicorn workers, MLServer's inference pool).
spawn() {
    mkdir -p "$LOG_DIR"
    [ -f "$SERVER_LOG" ] && mv -f "$SERVER_LOG" "$SERVER_LOG.previous"
    # shellcheck disable=SC2016
    nohup setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" "$@" \
        >"$SERVER_LOG" 2>&1 </dev/null 8>&- 9>&- &
    local _
    for _ in $(seq 1 50); do
        [ -s "$PID_FILE" ] && return 0
        sleep 0.1
    done
    die "the server process did not start (see $SERVER_LOG)"
}

stop_server() {
    local pid waited=0
    if ! pid="$(running_pid)"; then
        rm -f "$PID_FILE"
        return 0
    fi
    log "stopping (pid $pid)"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid"; do
        if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
            log "no exit after ${STOP_TIMEOUT}s, sending SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    rm -f "$PID_FILE"
}

# Resident memory of the server and every process in its group, in KiB.
group_rss_kib() {
    local pid
    pid="$(running_pid)" || return 3
    ps -o rss= -g "$pid" | awk '{ total += $1 } END { print total + 0 }'
}

# ---------------------------------------------------------------- commands ----

cmd_start() { # $1: what to serve
    [ -n "${1:-}" ] || die "usage: $0 start MODEL_DIR"
    local target
    target="$(cd "$1" && pwd)" || die "no directory $1"
    mkdir -p "$DATA"
    exec 8>"$DATA/.lock"
    command -v flock >/dev/null 2>&1 && flock 8
    if running_pid >/dev/null; then
        [ "$(cat "$DATA/serving" 2>/dev/null)" = "$target" ] \
            || die "already serving $(cat "$DATA/serving" 2>/dev/null); stop it first"
        wait_ready
        base_url
        return 0
    fi
    install_venv
    PORT="${PORT_OVERRIDE:-$(free_port)}"
    echo "$PORT" >"$PORT_FILE"
    echo "$target" >"$DATA/serving"
    local started=$SECONDS
    START_NS="$(date +%s%N)"
    log "serving $target on $(base_url) (data: $DATA)"
    launch_server "$target"
    wait_ready
    local elapsed_ms=$((($(date +%s%N) - START_NS) / 1000000))
    echo "$elapsed_ms" >"$DATA/startup-ms"
    log "ready after ${elapsed_ms} ms ($((SECONDS - started)) s), RSS $(group_rss_kib) KiB"
    base_url
}

cmd_status() {
    local pid
    pid="$(running_pid)" || { log "not running"; return 3; }
    answers_ready || { log "process $pid is alive but $(base_url) does not answer"; return 1; }
    base_url
}

cmd_stop() {
    [ -d "$DATA" ] || return 0
    exec 8>"$DATA/.lock"
    command -v flock >/dev/null 2>&1 && flock 8
    stop_server
}

cmd_logs() {
    [ -f "$SERVER_LOG" ] || die "no log yet at $SERVER_LOG"
    if [ "${1:-}" = "-f" ]; then exec tail -n 50 -F "$SERVER_LOG"; fi
    tail -n "${1:-100}" "$SERVER_LOG"
}

cmd_stats() {
    local pid
    pid="$(running_pid)" || { log "not running"; return 3; }
    printf 'pid %s\nstartup_ms %s\nrss_kib %s\n' "$pid" "$(cat "$DATA/startup-ms" 2>/dev/null || echo -)" \
        "$(group_rss_kib)"
}

dispatch() {
    local command="${1:-}"
    [ $# -gt 0 ] && shift
    case "$command" in
        install) install_venv; echo "$VENV/bin/python" ;;
        installed) venv_ready || { log "not installed in $VENV"; return 3; } ;;
        start) cmd_start "$@" ;;
        stop) cmd_stop ;;
        status) cmd_status ;;
        stats) cmd_stats ;;
        logs) cmd_logs "$@" ;;
        python) install_venv; exec "$VENV/bin/python" "$@" ;;
        -h | --help | help) usage ;;
        *) usage; exit 2 ;;
    esac
}
