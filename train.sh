#!/usr/bin/env bash
# bash train.sh              the embedded demo: digits, a small ViT teacher, a small CNN student (CPU, minutes)
# bash train.sh N [FLAGS]    RSD's launcher: N processes with torch.distributed.launch on a free port,
#                            ResNet18 <- Swin-T on CIFAR-100; FLAGS are passed on to train.py
#                            (DATA and TEACHER override the data folder and the teacher checkpoint;
#                            TEACHER_CACHE=DIR passes --teacher-cache DIR)
# bash train.sh --list       the published cells of configs/experiments.yaml: name, teacher, student,
#                            method, published top-1
# bash train.sh CELL N [FLAGS]   one cell by name on N processes (DATA overrides the data folder,
#                            TEACHER_CACHE=DIR passes --teacher-cache DIR);
#                            FLAGS come last, so they override the cell's own flags
set -euo pipefail
cd "$(dirname "$0")"

if [ $# -eq 0 ]; then
    exec python tools/demo.py
fi
if [ "$1" = "--list" ]; then
    exec python tools/experiments.py --list
fi

# check_nproc VALUE EXAMPLE: VALUE must be a process count; EXAMPLE shows a correct command line.
check_nproc() {
    if ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
        local given="'$1'"
        [ -n "$1" ] || given=nothing
        echo "error: expected the number of processes (e.g. $2), got $given" >&2
        exit 2
    fi
}

# launch N ARGS: train.py on N processes. The launcher answers a failed process with a report of its own
# (tens of lines); train.py's one-line error is repeated after it, last, and the exit status is 2.
launch() {
    local nproc=$1
    shift
    # TEACHER_CACHE=DIR: read or write the teacher's outputs there (train.py --teacher-cache), like DATA.
    if [ -n "${TEACHER_CACHE:-}" ]; then
        set -- "$@" --teacher-cache "$TEACHER_CACHE"
    fi
    local port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
    local errors status=0
    errors=$(mktemp)
    # stdout goes straight through; stderr is shown as it comes and kept in a file.
    set +e
    { python -m torch.distributed.launch --nproc_per_node="$nproc" --master_port="$port" train.py "$@" \
        2>&1 1>&3 3>&- | tee "$errors" >&2 3>&-; status=${PIPESTATUS[0]}; } 3>&1
    set -e
    if [ "$status" -ne 0 ]; then
        local line
        line=$(grep -E '^error: ' "$errors" | tail -n 1 || true)
        rm -f "$errors"
        if [ -n "$line" ]; then
            echo "$line" >&2
            exit 2
        fi
        exit "$status"
    fi
    rm -f "$errors"
    exit 0
}

if [[ "$1" =~ ^[0-9]+$ ]]; then
    NPROC=$1
    shift
    check_nproc "$NPROC" "bash train.sh 8"
    launch "$NPROC" "${DATA:-data/cifar100}" --config configs/cifar/cnn.yaml \
        --model resnet18 --teacher swin_tiny_patch4_window7_224 \
        --teacher-pretrained "${TEACHER:-pretrained/swin_tiny_patch4_window7_224_cifar100.pth}" \
        --num-classes 100 --distiller rsd "$@"
fi

CELL=$1
shift
# The cell is looked up before the process count, so that a mistyped name is reported with close names.
# Its error goes through a file so that it can be completed into one line; stdout holds only arguments.
ERROR_FILE=$(mktemp)
if ! CELL_ARGS=$(python tools/experiments.py --one-per-line --data "${DATA:-data/cifar100}" "$CELL" 2>"$ERROR_FILE"); then
    echo "$(cat "$ERROR_FILE"); a first argument that is not a cell name must be the number of processes" \
         "(bash train.sh 8)" >&2
    rm -f "$ERROR_FILE"
    exit 2
fi
rm -f "$ERROR_FILE"
check_nproc "${1:-}" "bash train.sh $CELL 8"
NPROC=$1
shift
mapfile -t TRAIN_ARGS <<< "$CELL_ARGS"
launch "$NPROC" "${TRAIN_ARGS[@]}" "$@"
