"""The machinery that train.py and validate.py share: one module per concern.

config       flags, YAML defaults, validation of the merged arguments
data         datasets (CIFAR-100, ImageFolder, digits, fake), transforms, loaders
models       building student and teacher through timm, loading weight files
checkpoint   atomic checkpoints with the distiller's extra modules, resume
distributed  process group set-up from torchrun / torch.distributed.launch / SLURM
engine       the training epoch and the evaluation loop
logger       console/file log, summary.csv, TensorBoard
"""
