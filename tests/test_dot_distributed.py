"""DOT under DistributedDataParallel (gloo, CPU): two processes with half a batch each
take the same step as one process with the whole batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, tiny_opts
from test_distributed import _join, free_port
from mdistill.engine.launch import shutdown

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")
STEPS, BATCH = 2, 16


def fixed_batches():
    generator = torch.Generator().manual_seed(3)
    return [{"image": torch.randn(BATCH, 3, 32, 32, generator=generator),
             "target": torch.randint(0, 100, (BATCH,), generator=generator)}
            for _ in range(STEPS)]


def train_dot(opts, rank=0, world=1):
    """Two DOT steps of KD on this process's share of fixed batches; the student's
    BatchNorm in eval mode, so that per-process batch statistics play no part."""
    from mdistill.config import load_cfg
    from mdistill.engine.builder import build_experiment
    from mdistill.engine.trainer import Trainer
    experiment = build_experiment(load_cfg(CONFIG, opts))
    trainer = Trainer(experiment, run_dir=None, log=lambda text: None)
    trainer.start_epoch(1)
    experiment.distiller.student.eval()
    for batch in fixed_batches():
        trainer.run_step({key: value[rank::world] for key, value in batch.items()})
    return torch.cat([p.detach().reshape(-1) for p in experiment.distiller.student.parameters()])


def _worker(rank, world, port, opts, out_path):
    _join(rank, world, port)
    weights = train_dot(opts, rank, world)
    if rank == 0:
        torch.save(weights, out_path)
    shutdown()


def test_dot_with_two_processes_equals_one_process(cifar_root, teacher_file, tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "KD", "DISTILLER.TEACHER",
                     "resnet20", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                     teacher_file, "SOLVER.TRAINER", "dot", "SOLVER.BATCH_SIZE", str(BATCH),
                     "SOLVER.DETERMINISTIC", "True")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as in the workers; restored for the tests after this one
    try:
        single = train_dot(opts)
        start = train_dot(opts + ["SOLVER.LR", "1e-12"])    # hardly moved: the update is not 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "two.pt"
    mp.start_processes(_worker, args=(2, free_port(), opts, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    double = torch.load(out, weights_only=True)
    assert (single - start).abs().max() > 1e-3
    torch.testing.assert_close(double, single, rtol=1e-4, atol=1e-6)
