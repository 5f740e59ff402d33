#!/usr/bin/env bash
# Run a training launch so that preemption loses nothing and ends in exit 0:
#
#   scripts/preemptible.sh accelerate launch --multi_gpu train_controlnet.py ... --resume_from_checkpoint=latest
#
# A stop signal (TERM, INT, HUP or USR1) sent to this script, to its process group, or to every process of the job
# (SLURM's `--signal`, `scancel --signal`, a preemption, Ctrl-C) becomes one SIGTERM to the trainer's ranks on this
# node. The ranks agree at their next --logging_steps boundary, save checkpoint-N and exit 0; so does the launcher,
# and so does this script. Rerunning the same command resumes.
#
# Why not let the signal reach the launcher: torchrun (inside `accelerate launch --multi_gpu`) dies of USR1 and
# leaves its ranks running; it answers TERM by forwarding it, SIGKILLs the ranks TORCH_ELASTIC_SHUTDOWN_TIMEOUT
# (30 s) later, whatever they are writing, and exits 1.
set -u
[ $# -gt 0 ] || { echo "usage: $0 LAUNCH COMMAND..." >&2; exit 2; }
# Should the launcher be signalled anyway (a kill aimed at it by hand), give the ranks time to save.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}

# The launcher runs in a session of its own, out of reach of signals sent to this script's process group, and with
# USR1 ignored, a disposition that survives exec and that torchrun keeps (it handles only TERM, INT, HUP and QUIT):
# a USR1 sent to every process of the job cannot kill it. The trainer installs its own USR1 handler.
trap '' USR1
setsid "$@" &
launcher=$!

ranks() {  # the launcher's children, from /proc in plain bash (a slim container may lack procps)
  local stat fields pid
  for stat in /proc/[0-9]*/stat; do
    fields=$(<"$stat") 2>/dev/null || continue
    fields=${fields##*) }  # after the command name, which may hold spaces: state, ppid, ...
    set -- $fields
    pid=${stat#/proc/}
    [ "$2" = "$launcher" ] && echo "${pid%/stat}"
  done
}
stop() {
  echo "preemptible.sh: $1 received: asking the trainer to save a checkpoint and stop" >&2
  local pid
  for pid in $(ranks); do  # their dataloader workers end with them
    kill -TERM "$pid" 2>/dev/null
  done
}
for sig in TERM INT HUP USR1; do
  trap "stop SIG$sig" "$sig"
done

# `wait` returns early whenever a trapped signal arrives; keep waiting until the launcher has really exited.
while :; do
  wait "$launcher"
  rc=$?
  kill -0 "$launcher" 2>/dev/null || exit "$rc"
done
