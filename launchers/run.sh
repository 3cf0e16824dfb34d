#!/usr/bin/env bash
# Train under SLURM, one task per rank, surviving preemption:
#
#   sbatch [sbatch options] launchers/run.sh [launchers/pretrain.py arguments]
#   sbatch -N 2 --ntasks-per-node=4 launchers/run.sh --config tiny parallel.tensor_parallel=2 \
#       train_steps=5000 checkpoint.dir=/shared/runs/r1/checkpoints logging.tensorboard_dir=/shared/runs/r1/tb
#
# Every argument after run.sh goes to the entry point unchanged (--resume auto is the default).
# srun starts the ranks; SLURM's variables become RANK, LOCAL_RANK, WORLD_SIZE and
# MASTER_ADDR (the first host of the allocation) / MASTER_PORT (derived from the job id).
# The job runs in the virtual environment active at submission, else the project's .venv.
#
# Preemption: SIGUSR1 (this script's --signal, or `scancel -b -s USR1`) or SIGTERM reaching
# this shell is passed to the ranks; every rank finishes its step, the step is checkpointed,
# and the job requeues itself. The rerun resumes from that checkpoint (same step, schedule,
# data position). A signal sent to the ranks directly (`scancel -s USR1`) does the same.
#
#   MEGAMM_ENTRY  the entry point (default launchers/pretrain.py)
#   MASTER_PORT   rendezvous port (default 20000 + job id mod 20000)
#
#SBATCH --job-name=megamm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail

cd "${SLURM_SUBMIT_DIR:?submit this script with sbatch}"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  if [[ ! -f .venv/bin/activate ]]; then
    echo "run.sh: no virtual environment is active and $PWD/.venv does not exist; run tools/setup_env.sh" >&2
    exit 2
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
entry=${MEGAMM_ENTRY:-launchers/pretrain.py}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export WORLD_SIZE=$SLURM_NTASKS
echo "run.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $WORLD_SIZE ranks on $SLURM_JOB_NODELIST," \
  "rendezvous $MASTER_ADDR:$MASTER_PORT, $entry $*"

signalled=""
forward() {  # pass a preemption signal from this shell to the ranks (srun tasks only)
  signalled=$1
  echo "run.sh: received SIG$1: the ranks checkpoint their step and stop; the job will requeue"
  scancel --signal="$1" "$SLURM_JOB_ID" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# One task per rank. LOCAL_SIZE (ranks on this node) lets DeepSpeed use shared memory when the
# whole job is on one node.
srun --kill-on-bad-exit=1 bash -c \
  'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID LOCAL_SIZE=${SLURM_STEP_TASKS_PER_NODE%%(*}; exec python "$@"' \
  run.sh "$entry" "$@" &
srun_pid=$!
status=0
while true; do  # a trapped signal interrupts `wait`; keep waiting until srun itself ends
  wait "$srun_pid"
  status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done

# 138 = 128 + SIGUSR1, 143 = 128 + SIGTERM: the ranks stopped after checkpointing their step.
if [[ -n "$signalled" || $status -eq 138 || $status -eq 143 ]]; then
  echo "run.sh: preempted (srun exit $status); requeueing job $SLURM_JOB_ID to resume from its checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
