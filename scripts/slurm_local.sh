#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to test the SLURM profile for real (tests/test_slurm.py):
# munge, slurmctld and slurmd from the distribution's packages, started without systemd.
#     bash scripts/slurm_local.sh up     # install if needed, configure, start, wait for an idle node
#     bash scripts/slurm_local.sh down   # stop the daemons `up` started, by their PID files
# Needs root and apt-get (Debian, Ubuntu). Where it cannot run, it says why and exits 3. It never
# touches a SLURM configuration or munged it did not create itself.
set -euo pipefail

STATE=/run/aoq-slurm                    # PID files, and `started`: the daemons `up` started
CONF=/etc/slurm/slurm.conf
MARK="# Written by scripts/slurm_local.sh (AOQ pipeline tests)."
LOGS=/var/log/slurm
SPOOL=/var/lib/aoq-slurm
PACKAGES=(munge slurmctld slurmd slurm-client)

unavailable() { echo "slurm_local: $*" >&2; exit 3; }
fail() { echo "slurm_local: $*" >&2; tail -n 20 "$LOGS"/slurm*.log 2>/dev/null >&2 || true; exit 1; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # seconds, then a command that succeeds when ready
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

install_packages() {
  local missing=0 tool
  for tool in munged slurmctld slurmd sbatch squeue scontrol; do
    command -v "$tool" >/dev/null || missing=1
  done
  ((missing)) || return 0
  command -v apt-get >/dev/null || unavailable "SLURM is not installed and there is no apt-get"
  # Package scripts would start the daemons (and fail without systemd): a policy-rc.d that
  # answers 101 forbids it while we install, unless the machine already has one.
  local policy=/usr/sbin/policy-rc.d
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  local install=(apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}")
  if ! "${install[@]}" >/dev/null 2>&1; then  # stale package lists: refresh once
    apt-get update -qq >/dev/null 2>&1 || unavailable "apt-get update failed"
    "${install[@]}" >/dev/null || unavailable "apt-get install ${PACKAGES[*]} failed"
  fi
}

start_munge() {
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0  # a munged already answers
  mkdir -p /run/munge
  chown munge:munge /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  echo "munged /run/munge/munged.pid" >>"$STATE/started"
  wait_for 20 bash -c 'munge -n | unmunge' || fail "munged does not answer"
}

write_conf() {
  if [[ -e $CONF ]] && ! grep -qxF "$MARK" "$CONF"; then
    unavailable "$CONF exists and was not written by this script; not touching it"
  fi
  local host node
  host=$(hostname -s)
  node=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=... as slurmd sees them
  mkdir -p /etc/slurm "$LOGS" "$SPOOL/ctld" "$SPOOL/d"
  cat >"$CONF" <<EOF
$MARK
ClusterName=aoqlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
# Finished jobs stay visible to squeue and scontrol for 10 minutes (there is no sacct here).
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_idle() { [[ $(sinfo -h -N -o %t) == idle ]]; }

up() {
  [[ $(id -u) == 0 ]] || unavailable "needs root (to install and start munge and SLURM)"
  install_packages
  mkdir -p "$STATE"
  touch "$STATE/started"
  start_munge
  if ! alive "$STATE/slurmctld.pid"; then
    write_conf
    slurmctld -c  # -c: start from a clean state, no jobs of earlier runs
    echo "slurmctld $STATE/slurmctld.pid" >>"$STATE/started"
  fi
  wait_for 30 bash -c 'scontrol ping | grep -q UP' || fail "slurmctld did not come up"
  if ! alive "$STATE/slurmd.pid"; then
    slurmd
    echo "slurmd $STATE/slurmd.pid" >>"$STATE/started"
  fi
  wait_for 60 node_idle || fail "the node is not idle: $(sinfo -h -N -o '%t %E')"
  echo "slurm_local: up: $(sinfo -h -N -o '%N %t cpus=%c mem=%m')"
}

stop() {  # name pidfile: TERM, then KILL after 15 s; only a live process of that name
  local pid
  [[ -s $2 ]] || return 0
  pid=$(cat "$2")
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -KILL "$pid" 2>/dev/null || true
}

down() {
  [[ -s $STATE/started ]] || { echo "slurm_local: nothing to stop"; return 0; }
  local name pidfile
  # Reverse order: slurmd, slurmctld, then munged.
  tac "$STATE/started" | while read -r name pidfile; do
    stop "$name" "$pidfile"
  done
  rm -f "$STATE/started"
  echo "slurm_local: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
