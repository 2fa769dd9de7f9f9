#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the templates in examples/slurm/ and for
# the tests marked `slurm` (CI runs `up` before the tests and `down` after).
#
#   sudo examples/slurm/local-cluster.sh up      # install if missing, configure, start, wait idle
#   sudo examples/slurm/local-cluster.sh status  # sinfo, or say it is down
#   sudo examples/slurm/local-cluster.sh down    # cancel every job, stop the daemons
#
# Debian/Ubuntu, as root. Works in a container: no systemd, no cgroups (the daemons are started
# directly and the config uses no cgroup plugins). Both `up` and `down` are idempotent.
# It never touches a slurm.conf that it did not write: on a real cluster it refuses to run.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by histoduo examples/slurm/local-cluster.sh"
STATE=/var/lib/slurm
LOGS=/var/log/slurm
RUN=/run/slurm
CTLD_PID=$RUN/slurmctld.pid
SLURMD_PID=$RUN/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
WAIT_S=${LOCAL_CLUSTER_WAIT_S:-60}

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts daemons)"; }

ours_or_absent() {
    [ ! -e "$CONF" ] || head -n1 "$CONF" | grep -qxF "$MARK" ||
        die "$CONF exists and was not written by this script (a real cluster?); not touching it"
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} = 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    say "installing ${missing[*]} (slurm-wlm, without recommends)"
    export DEBIAN_FRONTEND=noninteractive
    # slurm-wlm is the metapackage of slurmctld + slurmd + slurm-client; recommends (plugin
    # dev files, docs) are not needed and double the download.
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
        >/tmp/local-cluster-apt.log 2>&1 ||
        { tail -n 20 /tmp/local-cluster-apt.log >&2; die "apt-get install failed (log above)"; }
}

write_conf() {
    local node hw cpus mem tmp
    node=$(hostname -s)
    # slurmd -C prints this machine's hardware in slurm.conf syntax; keep the CPU count and
    # memory, so jobs' --cpus-per-task and --mem are checked against what is really there.
    hw=$(slurmd -C | head -n1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [ -n "$cpus" ] && [ -n "$mem" ] || die "could not read CPUs and RealMemory from: $hw"
    mkdir -p "$CONF_DIR"
    tmp=$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
$MARK
# One node, no accounting database, no cgroups (works in containers without systemd).
ClusterName=histoduo-local
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
ReturnToService=2
# Keep finished jobs visible to scontrol/squeue for 5 minutes (there is no sacct here).
MinJobAge=300
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 644 "$tmp"
    mv -f "$tmp" "$CONF"
    # slurmd loads cgroup.conf only for cgroup plugins; an empty one keeps older builds quiet.
    [ -e "$CONF_DIR/cgroup.conf" ] || echo "$MARK" >"$CONF_DIR/cgroup.conf"
    say "wrote $CONF (node $node, $cpus CPUs, $mem MB)"
}

start_munge() {
    alive "$MUNGE_PID" && return 0
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    # As the munge user, as the packaged service does (munged refuses root without --force).
    runuser -u munge -- /usr/sbin/munged
    install -d -m 0755 "$RUN"
    touch "$RUN/munged.ours"
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

start_slurm() {
    install -d -m 0755 "$RUN" "$LOGS" "$STATE/slurmctld" "$STATE/slurmd"
    # -c: start with an empty queue (this cluster is for tests; no job survives a `down`).
    alive "$CTLD_PID" || slurmctld -c
    alive "$SLURMD_PID" || slurmd -N "$(hostname -s)"
}

wait_idle() {
    local node state
    node=$(hostname -s)
    for _ in $(seq $((WAIT_S * 2))); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
        case "$state" in
        idle* | mixed* | allocated*) say "node $node is $state"; return 0 ;;
        down* | drain*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    tail -n 5 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
    die "node $node not idle after ${WAIT_S}s (state: ${state:-no answer}); logs above"
}

stop_pidfile() { # pidfile name
    alive "$1" || { rm -f "$1"; return 0; }
    local pid
    pid=$(cat "$1")
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }; sleep 0.1; done
    say "$2 (pid $pid) ignored SIGTERM for 10 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
}

case "${1:-}" in
up)
    need_root
    ours_or_absent
    install_packages
    # Rewrite the config only while slurm is stopped: daemons read it at start.
    if ! alive "$CTLD_PID" && ! alive "$SLURMD_PID"; then write_conf; fi
    start_munge
    start_slurm
    wait_idle
    ;;
down)
    need_root
    ours_or_absent
    # Cancel what is still queued or running, so no job outlives the cluster.
    if alive "$CTLD_PID"; then
        squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
        for _ in $(seq 40); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.25; done
    fi
    stop_pidfile "$SLURMD_PID" slurmd
    stop_pidfile "$CTLD_PID" slurmctld
    # munged may serve other software: stop it only if `up` started it.
    if [ -e "$RUN/munged.ours" ]; then stop_pidfile "$MUNGE_PID" munged; rm -f "$RUN/munged.ours"; fi
    say "stopped"
    ;;
status)
    if alive "$CTLD_PID"; then sinfo; else say "down"; exit 3; fi
    ;;
*)
    echo "usage: $0 up|down|status" >&2
    exit 2
    ;;
esac
