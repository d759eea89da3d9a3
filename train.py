#!/usr/bin/env python3
"""Train a student, alone or distilled from a frozen teacher of another architecture.

    python train.py DATA --config configs/cifar/cnn.yaml --model resnet18 \
        --teacher swin_tiny_patch4_window7_224 --teacher-pretrained teacher.pth --num-classes 100 \
        --distiller ofa --ofa-eps 1.0

Launch with torchrun or `python -m torch.distributed.launch --nproc_per_node=N` for several processes;
`--batch-size` is per process. See README.md.
"""
import logging
import os
import sys

import torch
import yaml
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel

import distillers
from xkd import checkpoint, data, distributed, engine, models, teacher_cache
from xkd.config import check_args, command_line_warnings, mixup_active, parse_args, run_arguments
from xkd.ema import StudentEmas
from xkd.errors import UserError, require_file
from xkd.hardware import warn_if_bfloat16_emulated
from xkd.logger import RunRecorder, setup_logging, start_file_log
from xkd.run import output_folder, resolve_amp_dtype, resolve_input_size, run_cli, seed_everything

_logger = logging.getLogger('train')


def check_inputs(args, distiller_class):
    """Everything that can be checked before a model is built or a file is read in full."""
    models.check_model_name(args.model)
    if distiller_class.requires_teacher:
        if not args.teacher:
            raise UserError(f"--distiller {args.distiller} needs --teacher (a timm model name)")
        models.check_model_name(args.teacher, '--teacher')
        if args.teacher_pretrained:
            require_file(args.teacher_pretrained, '--teacher-pretrained')
    if args.amp and args.amp_dtype == 'float16' and args.device_type != 'cuda':
        raise UserError('--amp-dtype float16 needs a GPU; on CPU use --amp --amp-dtype bfloat16')
    if args.sync_bn and args.device_type != 'cuda':
        raise UserError('--sync-bn needs GPUs: PyTorch\'s SyncBatchNorm runs on CUDA only; leave it out on CPU')
    if models.teacher_dtype(args) == torch.float16 and args.device_type != 'cuda':
        raise UserError('--teacher-dtype float16 needs a GPU; on CPU use --teacher-dtype bfloat16')
    if args.resume and args.resume != 'auto':
        require_file(args.resume, '--resume', ' (use --resume auto to continue the run in --output/--experiment '
                                              'when it has a last.pth.tar)')


def create_criterion(args):
    mixup = mixup_active(args)
    if args.bce_loss:
        # As the reference: mixup's targets already carry the smoothing; unlike it, BCE also without
        # mixup or smoothing (the reference falls back to cross-entropy there, silently).
        return BinaryCrossEntropy(smoothing=0.0 if mixup else args.smoothing, target_threshold=args.bce_target_thresh)
    if mixup:
        return SoftTargetCrossEntropy()  # mixup's targets already carry the label smoothing
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def make_run_folder(path):
    """Create the run folder (if new) and check that files can be written in it, before anything is built."""
    probe = os.path.join(path, f'.write-test-{os.getpid()}')
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write the run folder '{path}' ({type(e).__name__}: {e.strerror or e}); "
                        f"choose an --output where you can write") from None


def student_kwargs(args):
    """The student's optional regularisation and pooling flags, passed to timm only when given."""
    drop_path = args.drop_path if args.drop_path is not None else args.drop_connect
    optional = {'drop_path_rate': drop_path, 'drop_block_rate': args.drop_block, 'global_pool': args.gp}
    return {key: value for key, value in optional.items() if value is not None}


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    warnings = command_line_warnings(args, argv)
    distiller_class = distillers.get_distiller(args.distiller)
    env = distributed.init_distributed(args.local_rank, args.device)
    args.device_type = env.device.type
    args.amp_dtype = resolve_amp_dtype(args, env.device)
    args.world_size = env.world_size
    check_inputs(args, distiller_class)

    train_set, val_set = data.create_datasets(args)
    args.num_classes = data.check_num_classes(args, train_set)
    args.input_size = resolve_input_size(args, args.model)

    # Every rank checks the folder (so all fail alike); rank 0's choice of a fresh suffix is the one used.
    args.output_dir = distributed.broadcast_object(output_folder(args), env)
    if env.is_main:
        make_run_folder(args.output_dir)
    setup_logging(args.output_dir, env.is_main)
    resume_path = checkpoint.resolve_resume(args.resume, args.output_dir)
    _logger.info(f'Run folder {args.output_dir}; {env.world_size} process(es) on {env.device.type}, '
                 f'batch {args.batch_size} per process ({args.batch_size * env.world_size} in all)')
    warn_if_bfloat16_emulated(args, env.device)
    for warning in warnings:
        _logger.warning(warning)
    seed_everything(args.seed + env.rank)

    student = models.create_model(args.model, args.num_classes, args.input_size, pretrained=args.pretrained,
                                  pretrained_path=args.pretrained_path, drop_rate=args.drop,
                                  **student_kwargs(args), **args.model_kwargs)
    teacher = models.create_teacher(args) if distiller_class.requires_teacher else None
    try:
        distiller = distiller_class(student, teacher, create_criterion(args), args)
        distiller.bind_train_data(train_set.targets)
    except ValueError as e:
        raise UserError(f'--distiller {args.distiller}: {e}') from None
    distiller.to(env.device)
    if teacher is not None:
        teacher.to(env.device, dtype=models.teacher_dtype(args))
    if args.channels_last:
        distiller.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    if args.sync_bn and env.distributed:
        distiller.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)

    if env.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels once
    train_loader, val_loader = data.create_loaders(args, train_set, val_set, env.device, env.rank, env.world_size)
    if args.teacher_cache:
        distiller.teacher_cache = teacher_cache.open_for_run(args, distiller_class, teacher, len(train_set),
                                                             len(train_loader), env.rank, env.world_size)
    mixup_fn = engine.create_mixup(args)

    optimizer = create_optimizer_v2(distiller, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum,
                                    **{k: v for k, v in (('eps', args.opt_eps), ('betas', args.opt_betas))
                                       if v is not None})
    # The schedule always comes from this command line, also on --resume (as in timm's train.py): a resumed run
    # with more --epochs or another --lr follows the new plan. num_epochs adds cooldown and cycles, as the reference.
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
        patience_epochs=args.patience_epochs, min_lr=args.min_lr, warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs, noise=args.lr_noise, noise_pct=args.lr_noise_pct,
        noise_std=args.lr_noise_std, noise_seed=args.seed, cycle_mul=args.lr_cycle_mul,
        cycle_decay=args.lr_cycle_decay, cycle_limit=args.lr_cycle_limit, k_decay=args.lr_k_decay,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=len(train_loader))
    scaler = torch.amp.GradScaler('cuda') if args.amp and args.amp_dtype == 'float16' else None
    model_emas = StudentEmas(distiller.student, args.model_ema_decay) if args.model_ema else None
    named_emas = model_emas.items() if model_emas is not None else []

    saver = None
    if env.is_main:
        saver = checkpoint.DistillationSaver(distiller, optimizer, scheduler, args, model_emas, scaler,
                                            args.output_dir, args.checkpoint_hist)
    start_epoch = 0
    if resume_path:
        start_epoch = checkpoint.resume(resume_path, distiller, optimizer, model_emas, scaler, saver)
        if args.sched_on_updates:
            scheduler.step_update(start_epoch * len(train_loader))
        else:
            scheduler.step(start_epoch)
        _logger.info(f'Resumed from {resume_path} at epoch {start_epoch}')
    if env.is_main:
        # From here on the run owns its folder: nothing before this line has changed a file in it.
        start_file_log()
        with open(os.path.join(args.output_dir, 'args.yaml'), 'w') as f:
            yaml.safe_dump(run_arguments(args), f)

    student_params = models.count_parameters(distiller.student.parameters())
    extra_params = models.count_parameters(distiller.extra_parameters())
    _logger.info(f'Student {args.model}: {student_params / 1e6:.3f} M parameters; '
                 f'{args.distiller} extra modules: {extra_params / 1e6:.3f} M parameters')
    if teacher is not None:
        _logger.info(f'Teacher {args.teacher}: {models.count_parameters(teacher.parameters()) / 1e6:.3f} M '
                     f'parameters (frozen)')
        if args.eval_teacher:
            teacher_metrics = engine.evaluate(teacher, val_loader, args, env)
            _logger.info(f"Teacher top-1 {teacher_metrics['top1']:.2f} top-5 {teacher_metrics['top5']:.2f} "
                         f"on {teacher_metrics['count']} validation images")

    model, eval_model = distiller, distiller.student
    if env.distributed:
        # Only the trainable part (student and extra modules) is wrapped; the teacher is not a child module.
        model = DistributedDataParallel(distiller, device_ids=[env.local_rank] if env.device.type == 'cuda' else None)
    if args.torchcompile:
        # Compiled wrappers share the modules' parameters, so checkpoints keep their plain layout.
        model, eval_model = torch.compile(model), torch.compile(eval_model)
    recorder = RunRecorder(args.output_dir, env.is_main, run_arguments(args) if args.log_wandb else None)
    if resume_path:
        recorder.forget_from(start_epoch)
    best = (None, None)
    last_metrics = None
    last_checkpoint = resume_path
    try:
        for epoch in range(start_epoch, num_epochs):
            engine.start_epoch(train_loader, epoch, args, env)
            lr = optimizer.param_groups[0]['lr']
            train_metrics = engine.train_one_epoch(epoch, model, distiller, train_loader, optimizer, scheduler,
                                                   args, env, mixup_fn, scaler, model_emas, recorder,
                                                   last_checkpoint)
            # As the reference, every epoch: the BatchNorm statistics that are evaluated and saved are the
            # average (or rank 0's copy) over all processes, not rank 0's alone.
            distributed.distribute_bn([distiller] + [ema for _, ema in named_emas], env, args.dist_bn)
            eval_metrics = {'loss': '', 'top1': '', 'top5': ''}
            if (epoch + 1) % args.eval_interval == 0 or epoch + 1 == num_epochs:
                metrics = engine.evaluate(eval_model, val_loader, args, env)
                eval_metrics = {k: metrics[k] for k in ('loss', 'top1', 'top5')}
                last_metrics = (eval_metrics['top1'], epoch)
                for name, ema in named_emas:
                    eval_metrics[f'{name}_top1'] = engine.evaluate(ema.module, val_loader, args, env)['top1']
                _logger.info(f"Eval: {epoch}  loss {eval_metrics['loss']:.4f}  top-1 {eval_metrics['top1']:.2f}  "
                             f"top-5 {eval_metrics['top5']:.2f}" +
                             ''.join(f"  {key} {value:.2f}" for key, value in eval_metrics.items()
                                     if key.startswith('ema')))
            else:
                for name, _ in named_emas:
                    eval_metrics[f'{name}_top1'] = ''
            scheduler.step(epoch + 1, eval_metrics['top1'] if eval_metrics['top1'] != '' else None)
            recorder.epoch(epoch, train_metrics, eval_metrics, lr)
            if saver is not None:
                metric = eval_metrics['top1'] if eval_metrics['top1'] != '' else None
                best = saver.save_checkpoint(epoch, metric=metric)
                last_checkpoint = os.path.join(args.output_dir, checkpoint.LAST)
            distributed.barrier(env)
    finally:
        recorder.close()
    if env.is_main and last_metrics is not None:
        best_metric, best_epoch = best if best[0] is not None else last_metrics
        _logger.info(f'Best top-1 {best_metric:.2f} (epoch {best_epoch}); last top-1 {last_metrics[0]:.2f} '
                     f'(epoch {last_metrics[1]}); run folder {args.output_dir}')
    distributed.cleanup(env)
    return {'best_top1': best[0], 'best_epoch': best[1],
            'last_top1': last_metrics[0] if last_metrics else None, 'output_dir': args.output_dir}


if __name__ == '__main__':
    sys.exit(run_cli(main))
