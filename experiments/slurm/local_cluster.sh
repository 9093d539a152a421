#!/bin/bash
# A real single-node SLURM cluster on this machine, to try the sbatch scripts before a cluster does.
#
#   sudo bash experiments/slurm/local_cluster.sh          # install (Debian/Ubuntu), configure, start
#   sbatch --partition=local --gpus-per-node=0 ... experiments/slurm/single_node.sbatch   # see docs/slurm.md
#   sudo bash experiments/slurm/local_cluster.sh stop     # stop the daemons
#
# Debian's or Ubuntu's own packages (tried: slurm-wlm 22.05 on Debian 12): munge, slurmctld
# and slurmd started directly (no systemd, no cgroups: proctrack/linuxproc, task/none), one node holding
# every core of this machine, one partition `local`, requeue allowed (JobRequeue=1), array tasks
# sharing the node (select/cons_tres, CR_Core). Needs root. Running it again restarts the daemons with
# the same configuration; the controller's state (job ids included) starts afresh each time.
#
# REQUEUE_HOLD=<seconds> (default 120, SLURM's own default): how long a requeued job waits before it
# may start again (AuthInfo=cred_expire); the tests use 10 to keep a requeue short.
set -euo pipefail

conf_dir=/etc/slurm
state=/var/spool/slurmctld
log_dir=/var/log/slurm

stop() {
    for daemon in slurmd slurmctld; do
        pkill -x "$daemon" 2>/dev/null || true
    done
    for _ in $(seq 50); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || return 0
        sleep 0.1
    done
    pkill -9 -x slurmd 2>/dev/null || true
    pkill -9 -x slurmctld 2>/dev/null || true
}

if [ "${1:-start}" = stop ]; then stop; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "local_cluster.sh: run as root (it installs packages and starts daemons)." >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || { echo "local_cluster.sh: needs apt-get (Debian or Ubuntu)." >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
fi

# munge: the key every SLURM daemon and command authenticates with.
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge 2>/dev/null || true
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged 2>/dev/null || munged --force

host=$(hostname -s)
cpus=$(nproc)
memory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
mkdir -p "$conf_dir" "$state" /var/spool/slurmd "$log_dir"
cat > "$conf_dir/slurm.conf" <<EOF
# Written by experiments/slurm/local_cluster.sh: a single-node cluster for trying sbatch scripts.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=${REQUEUE_HOLD:-120}
StateSaveLocation=$state
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
# Debian's packages read /etc/slurm; some builds look in /etc/slurm-llnl.
[ -e /etc/slurm-llnl ] || ln -s "$conf_dir" /etc/slurm-llnl

stop
slurmctld -i   # -i: ignore state left by an earlier start (a fresh controller; job ids start at 1 again)
slurmd
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "SLURM is up: partition local, node $host, $cpus CPUs (sinfo, squeue, sbatch, scancel work now)."
        exit 0
    fi
    sleep 0.2
done
echo "local_cluster.sh: SLURM did not come up; see $log_dir/slurmctld.log and $log_dir/slurmd.log." >&2
exit 1
