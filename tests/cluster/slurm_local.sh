#!/usr/bin/env bash
# A real single-node SLURM on localhost for the tests: munged + slurmctld + slurmd from Debian's
# slurm-wlm/munge packages, everything (config, key, state, logs, sockets) under one directory.
#
#   tests/cluster/slurm_local.sh start DIR    # prints "export SLURM_CONF=DIR/slurm.conf" when ready
#   tests/cluster/slurm_local.sh stop DIR     # stops the daemons started with DIR (by their pid files)
#
# Needs root (slurmd launches jobs as their submitting user) and no cgroups: proctrack/linuxproc,
# task/none. The node is "localhost" with the CPUs and memory of this machine; one partition "debug".
# Exit status 2 with one line on stderr when something is missing or a daemon does not come up.
set -euo pipefail

cmd=${1:-}; dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
    echo "usage: $0 start|stop DIR" >&2; exit 2
fi

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        [[ -f "$dir/$name.pid" ]] || continue
        pid=$(cat "$dir/$name.pid" 2>/dev/null || true)
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$dir/$name.pid"
    done
}

fail() { echo "slurm_local: $*" >&2; stop; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if [[ "$cmd" == stop ]]; then stop; exit 0; fi
[[ "$cmd" == start ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

[[ $(id -u) == 0 ]] || fail "needs root (slurmd runs jobs as their user); run the SLURM tests as root"
for b in munged slurmctld slurmd sbatch squeue scancel; do
    command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] \
        || fail "$b not found; install Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge)"
done
export PATH="$PATH:/usr/sbin"

mkdir -p "$dir"/{state,spool,munge,log}
dir=$(cd "$dir" && pwd)
chmod 700 "$dir/munge"
key="$dir/munge/munge.key"
[[ -f "$key" ]] || { dd if=/dev/urandom of="$key" bs=1 count=1024 status=none; chmod 400 "$key"; }
sock="$dir/munge/munge.sock"

cpus=$(nproc)
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
ctld_port=$(free_port); d_port=$(free_port)
cat > "$dir/slurm.conf" <<CONF
ClusterName=vlptest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$d_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=0
MinJobAge=30
SchedulerParameters=sched_interval=1
MessageTimeout=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
rm -f "$dir/cgroup.conf"  # 22.05 has no "disabled" cgroup plugin: slurmd autodetects v1/v2 and uses none of it
export SLURM_CONF="$dir/slurm.conf"

munged --socket="$sock" --key-file="$key" --pid-file="$dir/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" --force \
    || fail "munged did not start (see $dir/log/munged.log)"
slurmctld -i -f "$SLURM_CONF" || fail "slurmctld did not start (see $dir/log/slurmctld.log)"
slurmd -N localhost -f "$SLURM_CONF" || fail "slurmd did not start (see $dir/log/slurmd.log)"

for _ in $(seq 150); do  # up to 30 s for the node to register as idle
    state=$(sinfo -h -N -o %T 2>/dev/null | head -n1 || true)
    [[ "$state" == idle* ]] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.2
done
fail "the node did not become idle (state '${state:-none}'; see $dir/log/slurmctld.log and slurmd.log)"
