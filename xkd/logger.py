"""Console and file log, summary.csv and TensorBoard; only rank 0 writes files."""
import logging
import os
import sys

from timm.utils import update_summary

LOG_FORMAT = '%(asctime)s %(levelname)s %(message)s'


def setup_logging(output_dir=None, is_main=True):
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(LOG_FORMAT, '%H:%M:%S'))
    root.addHandler(console)
    if output_dir and is_main:
        file_handler = DeferredFileHandler(os.path.join(output_dir, 'log.txt'))
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(file_handler)


class DeferredFileHandler(logging.Handler):
    """log.txt, written from the moment the run commits to its folder (`start_file_log`); the records before
    that are held in memory and written then. A run that stops before (a refused resume, a bad flag found
    late) leaves the folder's earlier log.txt as it was."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.pending = []
        self.file = None

    def emit(self, record):
        if self.file is None:
            self.pending.append(record)
        else:
            self.file.emit(record)

    def start(self):
        if self.file is None:
            self.file = logging.FileHandler(self.path)
            self.file.setFormatter(self.formatter)
            for record in self.pending:
                self.file.emit(record)
            self.pending = []

    def close(self):
        if self.file is not None:
            self.file.close()
        super().close()


def start_file_log():
    """Start writing log.txt (see DeferredFileHandler)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, DeferredFileHandler):
            handler.start()


class RunRecorder:
    """summary.csv rows (epoch, train loss per key, eval metrics, lr) and TensorBoard scalars."""

    def __init__(self, output_dir, enabled, wandb_config=None):
        """`wandb_config`: the run's arguments, to log to Weights & Biases as well (--log-wandb)."""
        self.output_dir = output_dir
        self.enabled = enabled
        self.writer = None
        self.wandb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=output_dir)
            if wandb_config is not None:
                import wandb
                name = os.path.basename(os.path.normpath(output_dir))
                wandb.init(project=wandb_config.get('experiment') or name, name=name, config=wandb_config,
                           dir=output_dir, resume='allow', id=name)
                self.wandb = wandb

    def forget_from(self, epoch):
        """On resume, drop summary rows of epochs that the resumed run will train again."""
        path = os.path.join(self.output_dir, 'summary.csv')
        if not self.enabled or not os.path.isfile(path):
            return
        with open(path) as f:
            lines = f.readlines()
        kept = lines[:1] + [line for line in lines[1:] if int(line.split(',', 1)[0]) < epoch]
        if len(kept) != len(lines):
            with open(path, 'w') as f:
                f.writelines(kept)

    def step(self, global_step, losses, lr):
        if self.writer is None:
            return
        for key, value in losses.items():
            self.writer.add_scalar(f'train_step/{key}', value, global_step)
        self.writer.add_scalar('train_step/lr', lr, global_step)

    def epoch(self, epoch, train_metrics, eval_metrics, lr):
        if not self.enabled:
            return
        update_summary(epoch, train_metrics, eval_metrics, os.path.join(self.output_dir, 'summary.csv'), lr=lr)
        for key, value in train_metrics.items():
            self.writer.add_scalar(f'train/{key}', value, epoch)
        for key, value in (eval_metrics or {}).items():
            self.writer.add_scalar(f'eval/{key}', value, epoch)
        self.writer.add_scalar('lr', lr, epoch)
        self.writer.flush()
        if self.wandb is not None:
            row = {'epoch': epoch, 'lr': lr, **{f'train_{k}': v for k, v in train_metrics.items()},
                   **{f'eval_{k}': v for k, v in (eval_metrics or {}).items() if v != ''}}
            self.wandb.log(row, step=epoch)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
