#!/bin/bash
# Submit a cohort to SLURM: tile (array) -> merge -> predict (array), chained with afterok.
#
#   examples/slurm/submit_cohort.sh COHORT.csv OUT_DIR MODEL.pt [SHARDS]
#
# SHARDS (default 8) is the size of both arrays. Each job starts only when the one before it
# succeeded completely; if a tile task fails, the merge and predict jobs wait with the reason
# DependencyNeverSatisfied (see merge.sbatch). Prints the three job ids.
#
# Environment (all optional):
#   TILE_ARGS      histoduo tile options, default "--mpp 0.5 --tile-size 256": use the
#                  checkpoint's mpp and tile size (`histoduo predict` warns when they differ)
#   PREDICT_ARGS   extra histoduo predict options
#   SBATCH_ARGS    sbatch options for every job (e.g. "--partition=cpu --account=lab")
#   PREDICT_SBATCH_ARGS  sbatch options for the predict array only (e.g. "--partition=gpu --gpus=1")
#   HISTODUO_PYTHON      the Python that has histoduo, exported to the jobs (default python3)
#   SUBMIT_WAIT=1  wait until the predict array has finished; exit with its status
set -euo pipefail
usage="usage: $0 COHORT.csv OUT_DIR MODEL.pt [SHARDS]"
here=$(cd "$(dirname "$0")" && pwd)
# Jobs may start in another working directory: hand them absolute paths.
cohort=$(realpath -e "${1:?$usage}")
out=$(realpath -m "${2:?$usage}")
model=$(realpath -e "${3:?$usage}")
shards=${4:-8}
[[ $shards =~ ^[1-9][0-9]*$ ]] || { echo "SHARDS must be a positive number: $shards" >&2; exit 2; }
read -r -a sbatch_args <<<"${SBATCH_ARGS:-}"
read -r -a predict_sbatch_args <<<"${PREDICT_SBATCH_ARGS:-}"
read -r -a tile_args <<<"${TILE_ARGS:---mpp 0.5 --tile-size 256}"
read -r -a predict_args <<<"${PREDICT_ARGS:-}"
mkdir -p "$out"

submit() { # sbatch --parsable prints "jobid" or "jobid;cluster"; keep sbatch's status
    local id status=0
    id=$(sbatch --parsable "$@") || status=$?
    echo "${id%%;*}"
    return $status
}

tile=$(submit "${sbatch_args[@]}" --array="1-$shards" \
    "$here/tile.sbatch" "$cohort" "$out" "${tile_args[@]}")
merge=$(submit "${sbatch_args[@]}" --dependency="afterok:$tile" \
    "$here/merge.sbatch" "$out" "$shards")
wait_flag=()
[ "${SUBMIT_WAIT:-0}" = 1 ] && wait_flag=(--wait)
echo "tile $tile -> merge $merge -> predict (submitting)" >&2
set +e
predict=$(submit "${wait_flag[@]}" "${sbatch_args[@]}" "${predict_sbatch_args[@]}" \
    --array="1-$shards" --dependency="afterok:$merge" \
    "$here/predict.sbatch" "$out" "$model" "${predict_args[@]}")
status=$?
set -e
echo "tile=$tile merge=$merge predict=$predict"
exit $status
