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
#   - stops leftover GPU processes of the service user and checks free VRAM, on EACH of the
#     service's GPUs, against a minimum;
#   - checks that each model directory exists, is on a mounted store, is non-empty and readable.
# It fails closed: whatever it cannot check (ss, nvidia-smi or findmnt missing or failing, a
# listener without a pid, VRAM shown as [N/A]) refuses the start with a line naming it.
# A process belongs to the unit named by the *.service component of its cgroup at any depth
# (template instances live in system-<name>.slice/<name>@<instance>.service); the guard never
# signals a process of another running unit, and re-reads a PID's owner and start time right
# before each signal so that a reused PID is never hit.
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
# A hung driver must not hang the start (systemd would only cut it at TimeoutStartSec).
nvidia_smi_timeout_s=30
smi_out=""

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
            nvidia_smi_timeout_s) nvidia_smi_timeout_s=$value ;;
            *) config_error "config $config: unknown key '$key' (rewrite it with llmstack.inference.service_guard)" ;;
        esac
    done <"$config"

    [[ -n $svc_user ]] || config_error "config $config: no user= line"
    id -u "$svc_user" >/dev/null 2>&1 || config_error "service user '$svc_user' does not exist: create it before starting $unit"
    # Leftovers of the service user are killed: for uid 0 that would be any root process.
    [[ $(id -u "$svc_user") != 0 ]] ||
        config_error "service user '$svc_user' is root: run $unit as an unprivileged system user (service_guard_user)"
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
    is_uint "$nvidia_smi_timeout_s" && ((nvidia_smi_timeout_s > 0)) ||
        config_error "config $config: nvidia_smi_timeout_s '$nvidia_smi_timeout_s' is not a whole number of seconds above 0"
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

# The service unit a process runs in, empty when none: the first *.service component of its
# cgroup at any depth, so that a template instance (/system.slice/system-vllm.slice/vllm@a.service)
# is found as well as a plain unit (/system.slice/tabbyapi.service). Processes of a running unit
# belong to that unit's lifecycle, not to this guard.
proc_unit() {
    local path component
    path=$(sed -n 's/^0:://p' "/proc/$1/cgroup" 2>/dev/null || true)
    local IFS=/
    for component in $path; do
        if [[ $component == *.service ]]; then
            printf '%s' "$component"
            return 0
        fi
    done
    return 0
}

# "uid starttime" of a live process (starttime: field 22 of /proc/PID/stat, clock ticks since
# boot), empty when it is gone. A PID reused by a new process has another start time.
proc_identity() {
    local stat uid fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    uid=$(stat -c %u "/proc/$1" 2>/dev/null) || return 0
    # The fields after the command name, which is in parentheses and may hold spaces;
    # fields[0] is field 3 (state), so field 22 is fields[19].
    read -r -a fields <<<"${stat##*) }"
    printf '%s %s' "$uid" "${fields[19]}"
}

# Sends a signal only while PID is still the process that was judged (same owner and start time).
signal_same() {
    local pid=$1 sig=$2 identity=$3
    if [[ $(proc_identity "$pid") != "$identity" ]]; then
        log info "PID $pid exited (or its number was reused) before SIG$sig: not signalled"
        return 1
    fi
    kill "-$sig" "$pid" 2>/dev/null || true
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
    local pid=$1 why=$2 identity=$3
    log warn "stopping leftover PID $pid of user $svc_user ($why): $(proc_command "$pid")"
    signal_same "$pid" TERM "$identity" || return 0
    if wait_gone "$pid" "$kill_grace_s"; then
        log info "PID $pid exited after SIGTERM"
        return 0
    fi
    log warn "PID $pid still running ${kill_grace_s}s after SIGTERM: sending SIGKILL"
    signal_same "$pid" KILL "$identity" || return 0
    if wait_gone "$pid" 5; then
        log info "PID $pid killed"
        return 0
    fi
    refuse "PID $pid survived SIGKILL (uninterruptible I/O or a hung GPU driver?): reboot or reset the GPU before starting $unit"
    return 1
}

# Decides about one process that holds a resource of this service. Returns 0 when it is gone.
handle_holder() {
    local pid=$1 what=$2 owner owning_unit identity
    # Judged once; from then on only this very process (owner + start time) may be signalled.
    identity=$(proc_identity "$pid")
    [[ -n $identity ]] || return 0
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
    stop_leftover "$pid" "$what" "$identity"
}

# PIDs listening on TCP port $1, one a line. Fails (status 1, the reason on stdout) when ss cannot
# tell: ss missing or failing, or a listener shown without a process (a socket of another network
# namespace, or one ss may not inspect).
listeners() {
    local out line pids=""
    if ! command -v ss >/dev/null 2>&1; then
        printf 'ss is not installed (apt install iproute2)'
        return 1
    fi
    if ! out=$(ss -Hltnp "sport = :$1" 2>&1); then
        printf 'ss failed: %s' "${out//$'\n'/ }"
        return 1
    fi
    while IFS= read -r line; do
        [[ -n ${line//[[:space:]]/} ]] || continue
        if [[ $line != *pid=* ]]; then
            printf 'ss shows a listener without a process (%s)' "$(tr -s ' ' <<<"$line")"
            return 1
        fi
        pids+="$(grep -o 'pid=[0-9]*' <<<"$line" | cut -d= -f2)"$'\n'
    done <<<"$out"
    printf '%s' "$pids" | sort -un
}

check_ports() {
    local port pid holders refused
    for port in "${ports[@]}"; do
        if ! holders=$(listeners "$port"); then
            refuse "could not check port $port: $holders. Not starting $unit on a port that may be taken"
            continue
        fi
        if [[ -z $holders ]]; then
            log info "port $port is free"
            continue
        fi
        refused=false
        for pid in $holders; do
            handle_holder "$pid" "port $port" || refused=true
        done
        [[ $refused == true ]] && continue
        if ! holders=$(listeners "$port"); then
            refuse "could not re-check port $port after stopping leftovers: $holders"
        elif [[ -n $holders ]]; then
            refuse "port $port is still held by PID(s) ${holders//$'\n'/ }"
        else
            log info "port $port is free after stopping leftovers"
        fi
    done
}

# Runs nvidia-smi with a timeout. Success: its stdout in smi_out. Failure (status 1): the reason
# in smi_out, with nvidia-smi's own first line ("Failed to initialize NVML: Driver/library version
# mismatch", "Unable to determine the device handle for GPU ...: GPU is lost").
smi() {
    local rc=0 err
    err=$(mktemp)
    smi_out=$(timeout --kill-after=5 "$nvidia_smi_timeout_s" "$nvidia_smi" "$@" 2>"$err") || rc=$?
    if ((rc == 124 || rc == 137)); then
        smi_out="'$nvidia_smi' did not answer within ${nvidia_smi_timeout_s}s (a hung driver or GPU? dmesg shows Xid errors)"
    elif ((rc != 0)); then
        smi_out="'$nvidia_smi $1' failed with exit code $rc: $(grep -m1 . <<<"$smi_out"$'\n'"$(cat "$err")" | tr -d '\r')"
    fi
    rm -f "$err"
    ((rc == 0))
}

is_unavailable() {
    # nvidia-smi prints these instead of a value: [N/A], [Not Supported], [Unknown Error], [GPU is lost]...
    [[ -z $1 || $1 == \[* || $1 == N/A ]]
}

# Sets sel_index/sel_uuid (parallel arrays): the GPUs this unit may use, every GPU when none is
# configured. A MIG UUID selects its parent GPU for the process check and leaves its free memory
# unknown, since --query-gpu reports memory per physical GPU, not per MIG instance.
sel_index=()
sel_uuid=()
sel_mig=()
select_gpus() {
    local rows index uuid token found listing parent line
    smi --query-gpu=index,uuid --format=csv,noheader,nounits || return 1
    rows=$smi_out
    sel_index=() sel_uuid=() sel_mig=()
    if ((${#gpus[@]} == 0)); then
        while IFS=', ' read -r index uuid; do
            [[ -n $index ]] || continue
            sel_index+=("$index") sel_uuid+=("$uuid") sel_mig+=("")
        done <<<"$rows"
        return 0
    fi
    for token in "${gpus[@]}"; do
        found=""
        if [[ $token == MIG-* ]]; then
            smi -L || return 1
            listing=$smi_out
            parent=""
            while IFS= read -r line; do
                if [[ $line =~ ^GPU\ [0-9]+:.*\(UUID:\ (GPU-[^\)]+)\) ]]; then
                    parent=${BASH_REMATCH[1]}
                elif [[ $line == *"(UUID: $token)"* ]]; then
                    found=$parent
                    break
                fi
            done <<<"$listing"
            [[ -n $found ]] || { smi_out="MIG device $token is not listed by '$nvidia_smi -L'"; return 1; }
        fi
        while IFS=', ' read -r index uuid; do
            [[ -n $index ]] || continue
            if [[ $token == "$index" || $token == "$uuid" || $found == "$uuid" ]]; then
                sel_index+=("$index") sel_uuid+=("$uuid")
                if [[ $token == MIG-* ]]; then sel_mig+=("$token"); else sel_mig+=(""); fi
                found=$uuid
                break
            fi
        done <<<"$rows"
        [[ -n $found && $found != MIG-* ]] || { smi_out="GPU $token is not among the GPUs '$nvidia_smi' lists (nvidia-smi -L)"; return 1; }
    done
}

# Stops the service user's leftovers on the selected GPUs. Fails when the process list cannot be read.
stop_gpu_leftovers() {
    local pid gpu_uuid used i wanted
    smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader,nounits || return 1
    while IFS=', ' read -r pid gpu_uuid used; do
        is_uint "${pid:-}" || continue
        wanted=false
        for i in "${!sel_uuid[@]}"; do
            [[ ${sel_uuid[$i]} == "$gpu_uuid" ]] && wanted=true
        done
        [[ $wanted == true ]] || continue
        [[ $(proc_user "$pid") == "$svc_user" ]] || continue
        # In MIG mode the driver shows no per-process memory ([N/A]).
        is_uint "${used:-}" || used="unknown"
        handle_holder "$pid" "GPU memory (${used} MiB)" || true
    done <<<"$smi_out"
}

# Checks each selected GPU on its own: a model that needs 40000 MiB does not fit on two GPUs with
# 1000 and 80000 MiB free unless the engine shards it, and then every shard needs its part.
# Sets short to the GPUs still short (or unknown), empty when all are fine.
short=""
short_gpus() {
    local index uuid free free_raw i
    short=""
    if ! smi --query-gpu=index,uuid,memory.free --format=csv,noheader,nounits; then
        short="free VRAM unreadable ($smi_out)"
        return 0
    fi
    for i in "${!sel_uuid[@]}"; do
        if [[ -n ${sel_mig[$i]} ]]; then
            short+="MIG device ${sel_mig[$i]}: free memory not reported per MIG instance by nvidia-smi --query-gpu; "
            continue
        fi
        free=""
        while IFS=',' read -r index uuid free_raw; do
            uuid=${uuid// /}
            if [[ $uuid == "${sel_uuid[$i]}" ]]; then
                free=${free_raw# }
                free=${free% }
                break
            fi
        done <<<"$smi_out"
        if is_unavailable "$free" || ! is_uint "$free"; then
            short+="GPU ${sel_index[$i]}: free VRAM unknown (nvidia-smi shows '${free:-nothing}'); "
        elif ((free < min_free_vram_mib)); then
            short+="GPU ${sel_index[$i]}: ${free} MiB free < required ${min_free_vram_mib} MiB; "
        else
            log info "GPU ${sel_index[$i]}: ${free} MiB free"
        fi
    done
    short=${short%; }
}

check_gpu() {
    local tick
    if ! command -v "$nvidia_smi" >/dev/null 2>&1; then
        if ((min_free_vram_mib > 0 || ${#gpus[@]} > 0)); then
            refuse "could not check the GPUs of $unit (${gpus[*]:-all}): it needs ${min_free_vram_mib} MiB free VRAM but '$nvidia_smi' is not installed. Install the NVIDIA driver utilities, or for a CPU-only service set service_guard_gpus: [] and service_guard_min_free_vram_mib: 0"
        else
            log info "no '$nvidia_smi' on this host: GPU process and VRAM checks skipped (no GPUs given, minimum is 0 MiB)"
        fi
        return 0
    fi
    if ! select_gpus; then
        refuse "could not check the GPUs of $unit: $smi_out"
        return 0
    fi
    if ! stop_gpu_leftovers; then
        refuse "could not list the GPU processes, so leftovers of $svc_user may hold VRAM: $smi_out"
        return 0
    fi
    if ((min_free_vram_mib == 0)); then
        log info "no free VRAM minimum: VRAM not read"
        return 0
    fi
    # Memory of a stopped process is released by the driver shortly after it exits.
    for ((tick = 0; tick <= kill_grace_s; tick++)); do
        short_gpus
        if [[ -z $short ]]; then
            log info "free VRAM >= required ${min_free_vram_mib} MiB on each GPU (${sel_index[*]})"
            return 0
        fi
        ((tick < kill_grace_s)) && sleep 1
    done
    refuse "free VRAM check failed on GPU(s) ${gpus[*]:-all}: $short. Stop what uses it (nvidia-smi shows the PIDs) or lower service_guard_min_free_vram_mib"
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
            if ! command -v findmnt >/dev/null 2>&1; then
                refuse "could not check that model directory $dir is on a mounted store: findmnt is not installed (apt install util-linux)"
                return 0
            fi
            if ! target=$(findmnt -n -o TARGET --target "$real" 2>&1); then
                refuse "could not check that model directory $dir is on a mounted store: findmnt failed (${target//$'\n'/ })"
                return 0
            fi
            target=${target%%$'\n'*}
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
