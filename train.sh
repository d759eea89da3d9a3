#!/usr/bin/env bash
# bash train.sh              the embedded demo: digits, a small ViT teacher, a small CNN student (CPU, minutes)
# bash train.sh N [FLAGS]    RSD's launcher: N processes with torch.distributed.launch on a free port,
#                            ResNet18 <- Swin-T on CIFAR-100; FLAGS are passed on to train.py
#                            (DATA and TEACHER override the data folder and the teacher checkpoint)
set -euo pipefail
cd "$(dirname "$0")"

if [ $# -eq 0 ]; then
    exec python tools/demo.py
fi

NPROC=$1
shift
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: the first argument is the number of processes (e.g. bash train.sh 8), got '$NPROC'" >&2
    exit 2
fi
PORT=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

exec python -m torch.distributed.launch --nproc_per_node="$NPROC" --master_port="$PORT" train.py \
    "${DATA:-data/cifar100}" --config configs/cifar/cnn.yaml \
    --model resnet18 --teacher swin_tiny_patch4_window7_224 \
    --teacher-pretrained "${TEACHER:-pretrained/swin_tiny_patch4_window7_224_cifar100.pth}" \
    --num-classes 100 --distiller rsd "$@"
