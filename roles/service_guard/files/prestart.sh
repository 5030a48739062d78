#!/usr/bin/env bash
# llmstack service guard: the pre-start check of one backend unit.
#
# Installed by llmstack.inference.service_guard and run by systemd as
# `ExecStartPre=+prestart /etc/llmstack/service_guard/<unit>.conf`. It can also be run by hand
# (as root) with the same argument to see what the next start would find.
#
# Before the service starts it:
#   - stops leftover processes of the service's own user that hold one of its ports
#     (SIGTERM, SIGKILL after the grace period); TabbyAPI would otherwise silently move to port+1;
#   - refuses to start when a port is held by another user or another running unit, naming
#     the PID and command and leaving that process alone;
#   - stops leftover GPU processes of the service user and checks free VRAM against a minimum;
#   - checks that each model directory exists, is on a mounted store, is non-empty and readable.
# Every decision is one line on stdout, which systemd sends to the unit's journal.
#
# Exit status: 0 start may proceed, 1 the guard refused the start, 2 unusable configuration.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C

unit=unknown
svc_user=""
ports=()
gpus=()
model_dirs=()
min_free_vram_mib=0
require_mountpoint=true
model_mount=""
kill_grace_s=10
nvidia_smi=nvidia-smi
failures=0
vram_free_total=0

log() {
    local level=$1 prio
    shift
    case $level in
        error) prio=3 ;;
        warn) prio=4 ;;
        *) prio=6 ;;
    esac
    # Under systemd, a "<N>" prefix sets the journal priority of the line (SyslogLevelPrefix=).
    if [[ -n ${JOURNAL_STREAM:-} ]]; then
        printf '<%s>' "$prio"
    fi
    printf 'service-guard[%s]: %s: %s\n' "$unit" "$level" "$*"
}

# A refused start: logged now, counted, and the guard exits 1 after the remaining checks so
# that one run names every problem.
refuse() {
    log error "$*"
    failures=$((failures + 1))
}

config_error() {
    log error "$*"
    exit 2
}

is_uint() {
    [[ $1 =~ ^[0-9]+$ ]]
}

read_config() {
    local config=$1 line key value owner mode
    [[ -f $config ]] || config_error "config $config does not exist: include llmstack.inference.service_guard for this unit"
    # Root acts on this file (it decides whose processes die), so only root may write it.
    read -r owner mode < <(stat -c '%u %a' "$config")
    if [[ $owner != 0 ]] || (((8#$mode & 8#022) != 0)); then
        config_error "config $config must be owned by root and not group/other-writable (is uid $owner, mode $mode)"
    fi
    while IFS= read -r line || [[ -n $line ]]; do
        [[ -z ${line//[[:space:]]/} || $line == \#* ]] && continue
        [[ $line == *=* ]] || config_error "config $config: '$line' is not key=value"
        key=${line%%=*}
        value=${line#*=}
        case $key in
            unit) unit=$value ;;
            user) svc_user=$value ;;
            port) ports+=("$value") ;;
            gpu) gpus+=("$value") ;;
            model_dir) model_dirs+=("$value") ;;
            min_free_vram_mib) min_free_vram_mib=$value ;;
            require_mountpoint) require_mountpoint=$value ;;
            model_mount) model_mount=$value ;;
            kill_grace_s) kill_grace_s=$value ;;
            nvidia_smi) nvidia_smi=$value ;;
            *) config_error "config $config: unknown key '$key' (rewrite it with llmstack.inference.service_guard)" ;;
        esac
    done <"$config"

    [[ -n $svc_user ]] || config_error "config $config: no user= line"
    id -u "$svc_user" >/dev/null 2>&1 || config_error "service user '$svc_user' does not exist: create it before starting $unit"
    local port gpu
    for port in "${ports[@]}"; do
        if ! is_uint "$port" || ((port < 1 || port > 65535)); then
            config_error "config $config: port '$port' is not a TCP port number"
        fi
    done
    for gpu in "${gpus[@]}"; do
        is_uint "$gpu" || [[ $gpu =~ ^(GPU-[0-9A-Fa-f-]+|MIG-[0-9A-Za-z/-]+)$ ]] ||
            config_error "config $config: gpu '$gpu' is neither a GPU index nor a GPU-/MIG- UUID (nvidia-smi -L lists them)"
    done
    is_uint "$min_free_vram_mib" || config_error "config $config: min_free_vram_mib '$min_free_vram_mib' is not a whole number of MiB"
    is_uint "$kill_grace_s" || config_error "config $config: kill_grace_s '$kill_grace_s' is not a whole number of seconds"
    [[ $require_mountpoint == true || $require_mountpoint == false ]] ||
        config_error "config $config: require_mountpoint must be true or false, not '$require_mountpoint'"
}

proc_user() {
    ps -o user:64= -p "$1" 2>/dev/null | tr -d ' '
}

proc_command() {
    local cmd=""
    if [[ -r /proc/$1/cmdline ]]; then
        # One journal line per decision: argv separators and embedded newlines become spaces.
        cmd=$(tr '\0\n\t' '   ' <"/proc/$1/cmdline" 2>/dev/null || true)
    fi
    cmd=${cmd% }
    [[ -n $cmd ]] || cmd=$(ps -o comm= -p "$1" 2>/dev/null || true)
    printf '%s' "${cmd:0:200}"
}

# The system service a process runs in (its cgroup under system.slice), empty when none:
# processes of a running unit belong to that unit's lifecycle, not to this guard.
proc_unit() {
    local path component
    path=$(sed -n 's/^0:://p' "/proc/$1/cgroup" 2>/dev/null || true)
    [[ $path == /system.slice/* ]] || return 0
    path=${path#/system.slice/}
    component=${path%%/*}
    [[ $component == *.service ]] && printf '%s' "$component"
    return 0
}

alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    # A zombie has released its sockets and GPU memory; only its parent can reap it.
    [[ $state != Z* ]]
}

wait_gone() {
    local pid=$1 seconds=$2 tick
    for ((tick = 0; tick < seconds * 10; tick++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    ! alive "$pid"
}

stop_leftover() {
    local pid=$1 why=$2
    log warn "stopping leftover PID $pid of user $svc_user ($why): $(proc_command "$pid")"
    kill -TERM "$pid" 2>/dev/null || true
    if wait_gone "$pid" "$kill_grace_s"; then
        log info "PID $pid exited after SIGTERM"
        return 0
    fi
    log warn "PID $pid still running ${kill_grace_s}s after SIGTERM: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    if wait_gone "$pid" 5; then
        log info "PID $pid killed"
        return 0
    fi
    refuse "PID $pid survived SIGKILL (uninterruptible I/O or a hung GPU driver?): reboot or reset the GPU before starting $unit"
    return 1
}

# Decides about one process that holds a resource of this service. Returns 0 when it is gone.
handle_holder() {
    local pid=$1 what=$2 owner owning_unit
    owner=$(proc_user "$pid")
    [[ -n $owner ]] || return 0
    owning_unit=$(proc_unit "$pid")
    if [[ $owner != "$svc_user" ]]; then
        refuse "$what is held by PID $pid of user $owner: $(proc_command "$pid"). Not touching it; stop that process or move $unit to another port"
        return 1
    fi
    if [[ -n $owning_unit && $owning_unit != "$unit" ]]; then
        refuse "$what is held by PID $pid of unit $owning_unit (user $owner): $(proc_command "$pid"). Not touching another running unit; stop it or give $unit its own port"
        return 1
    fi
    stop_leftover "$pid" "$what"
}

listeners() {
    { ss -Hltnp "sport = :$1" 2>/dev/null || true; } | { grep -o 'pid=[0-9]*' || true; } | cut -d= -f2 | sort -un
}

check_ports() {
    local port pid holders refused
    for port in "${ports[@]}"; do
        holders=$(listeners "$port")
        if [[ -z $holders ]]; then
            log info "port $port is free"
            continue
        fi
        refused=false
        for pid in $holders; do
            handle_holder "$pid" "port $port" || refused=true
        done
        [[ $refused == true ]] && continue
        holders=$(listeners "$port")
        if [[ -n $holders ]]; then
            refuse "port $port is still held by PID(s) ${holders//$'\n'/ }"
        else
            log info "port $port is free after stopping leftovers"
        fi
    done
}

nvidia_smi_query() {
    local args=("$@")
    # --id takes indexes and UUIDs alike, comma-separated.
    if ((${#gpus[@]} > 0)); then
        args+=("--id=$(IFS=,; echo "${gpus[*]}")")
    fi
    "$nvidia_smi" "${args[@]}" --format=csv,noheader,nounits
}

# Sets vram_free_total (MiB, summed over the service's GPUs) and logs each GPU.
read_free_vram() {
    local out index free
    out=$(nvidia_smi_query --query-gpu=index,memory.free) || return 1
    vram_free_total=0
    while IFS=', ' read -r index free; do
        [[ -n $index ]] || continue
        is_uint "$free" || return 1
        log info "GPU $index: ${free} MiB free"
        vram_free_total=$((vram_free_total + free))
    done <<<"$out"
}

check_gpu() {
    local pid used tick
    if ! command -v "$nvidia_smi" >/dev/null 2>&1; then
        if ((min_free_vram_mib > 0)); then
            refuse "$unit needs ${min_free_vram_mib} MiB free VRAM but '$nvidia_smi' is not installed: install the NVIDIA driver utilities, or set service_guard_min_free_vram_mib: 0 for a CPU-only service"
        else
            log info "no '$nvidia_smi' on this host: GPU process and VRAM checks skipped (minimum is 0 MiB)"
        fi
        return 0
    fi
    local apps
    if ! apps=$(nvidia_smi_query --query-compute-apps=pid,used_memory 2>&1); then
        if ((min_free_vram_mib > 0)); then
            refuse "'$nvidia_smi' failed, so free VRAM is unknown ($apps): load the NVIDIA driver or set service_guard_min_free_vram_mib: 0"
        else
            log warn "'$nvidia_smi' failed ($apps): GPU checks skipped (minimum is 0 MiB)"
        fi
        return 0
    fi
    while IFS=', ' read -r pid used; do
        is_uint "${pid:-}" || continue
        [[ $(proc_user "$pid") == "$svc_user" ]] || continue
        handle_holder "$pid" "GPU memory (${used} MiB)" || true
    done <<<"$apps"

    # Memory of a stopped process is released by the driver shortly after it exits.
    for ((tick = 0; tick <= kill_grace_s; tick++)); do
        if ! read_free_vram; then
            refuse "could not read free VRAM from '$nvidia_smi'"
            return 0
        fi
        if ((vram_free_total >= min_free_vram_mib)); then
            log info "free VRAM ${vram_free_total} MiB >= required ${min_free_vram_mib} MiB"
            return 0
        fi
        ((tick < kill_grace_s)) && sleep 1
    done
    refuse "free VRAM ${vram_free_total} MiB < required ${min_free_vram_mib} MiB on GPU(s) ${gpus[*]:-all}: stop what uses it (nvidia-smi shows the PIDs) or lower service_guard_min_free_vram_mib"
}

under() {
    local dir=$1 parent=$2
    [[ $parent == / || $dir == "$parent" || $dir == "$parent"/* ]]
}

check_model_dir() {
    local dir=$1 real target
    if [[ ! -d $dir ]]; then
        refuse "model directory $dir does not exist: mount the model store or fix the model directory variable of $unit"
        return 0
    fi
    real=$(realpath -e "$dir")
    if [[ $require_mountpoint == true ]]; then
        if [[ -n $model_mount ]]; then
            if ! mountpoint -q "$model_mount"; then
                refuse "declared model mount $model_mount is not mounted: mount it (systemctl status of its .mount unit, /etc/fstab)"
                return 0
            fi
            if ! under "$real" "$(realpath -e "$model_mount")"; then
                refuse "model directory $dir is not inside the declared mount $model_mount"
                return 0
            fi
            log info "model directory $dir is on the mounted store $model_mount"
        else
            target=$(findmnt -n -o TARGET --target "$real" | head -n1)
            if [[ -z $target || $target == / ]]; then
                refuse "model directory $dir is on the root filesystem, not on a mounted model store: mount the store, declare it with service_guard_model_mount, or set service_guard_require_mountpoint: false"
                return 0
            fi
            log info "model directory $dir is on the mount $target"
        fi
    fi
    if [[ -z $(find "$real" -mindepth 1 -maxdepth 1 -print -quit 2>/dev/null) ]]; then
        refuse "model directory $dir is empty: the model store is not populated (or an empty mountpoint hides it)"
        return 0
    fi
    if ! runuser -u "$svc_user" -- test -r "$real" -a -x "$real"; then
        refuse "model directory $dir is not readable by $svc_user: fix its permissions (read + execute for that user or its group)"
        return 0
    fi
    log info "model directory $dir is present, non-empty and readable by $svc_user"
}

main() {
    (($# == 1)) || config_error "usage: $0 CONFIG_FILE"
    ((EUID == 0)) || config_error "must run as root (ExecStartPre=+...) to see and stop other processes"
    read_config "$1"
    log info "pre-start checks for $unit (user $svc_user, ports ${ports[*]:-none}, model dirs ${model_dirs[*]:-none})"
    check_ports
    check_gpu
    local dir
    for dir in "${model_dirs[@]}"; do
        check_model_dir "$dir"
    done
    if ((failures > 0)); then
        log error "start of $unit refused: $failures problem(s) above"
        exit 1
    fi
    log info "all checks passed: $unit may start"
}

main "$@"
