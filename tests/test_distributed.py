"""DistributedDataParallel on CPU with gloo and two processes."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, tiny_opts

CONFIG = os.path.join(ROOT, "configs/cifar100/kd.yaml")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _gather_equal(tensor):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return all(torch.equal(parts[0], part) for part in parts[1:])


def _sync_worker(rank, world, port, opts, out_path):
    """Train through the real Trainer, checking after every step that all ranks agree."""
    _join(rank, world, port)
    from mdistill.config import load_cfg
    from mdistill.engine.builder import build_experiment
    from mdistill.engine.evaluate import evaluate
    from mdistill.engine.trainer import Trainer
    cfg = load_cfg(CONFIG, opts)
    experiment = build_experiment(cfg)
    trainer = Trainer(experiment, run_dir=None, log=lambda text: None)
    student = experiment.distiller.student
    checks = []

    def check(phase):
        if phase == "step":
            flat = torch.cat([p.detach().reshape(-1) for p in student.parameters()])
            checks.append(_gather_equal(flat))

    trainer.phase_hook = check
    trainer.train()
    distiller = experiment.distiller
    buffers = {name: _gather_equal(buffer.detach().clone())
               for name, buffer in distiller.named_buffers() if name.startswith("memory")
               or "memory" in name}
    test = evaluate(distiller.forward_test, experiment.test_loader, experiment.device)
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"checks": checks, "buffers": buffers, "test": test,
                       "steps": trainer.global_step}, handle)
    dist.barrier()
    dist.destroy_process_group()


def _spawn(target, world, *args):
    mp.start_processes(target, args=(world, free_port(), *args), nprocs=world, join=True,
                       start_method="spawn")


@pytest.mark.parametrize("method,extra", [
    ("KD", []),
    ("CRD", ["CRD.NCE.K", "32", "CRD.FEAT.DIM", "16"]),
])
def test_two_processes_hold_identical_weights_after_every_step(cifar_root, teacher_file,
                                                               tmp_path, method, extra):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", method, "DISTILLER.TEACHER",
                     "resnet20", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                     teacher_file, "SOLVER.EPOCHS", "1", *extra)
    out = tmp_path / "result.json"
    _spawn(_sync_worker, 2, opts, str(out))
    result = json.loads(out.read_text())
    # 160 images, global batch 32 -> 16 per process, 5 steps per epoch.
    assert result["steps"] == 5 and result["checks"] == [True] * 5
    if method == "CRD":
        assert result["buffers"] and all(result["buffers"].values())
    # Evaluation over two shards counts every test image exactly once.
    assert result["test"]["count"] == 80


def _train_worker(rank, world, port, config, opts, resume):
    _join(rank, world, port)
    from mdistill.engine.launch import shutdown, train
    train(config, opts, resume=resume)
    shutdown()


def test_checkpoint_resumes_under_one_or_two_processes(cifar_root, teacher_file, tmp_path):
    from mdistill.engine.launch import train
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                     "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file, "EXPERIMENT.NAME",
                     "ddp", "SOLVER.EPOCHS", "1")
    _spawn(_train_worker, 2, CONFIG, opts, None)                     # epoch 1 on 2 processes
    run_dir = str(tmp_path / "cifar100_baselines" / "ddp")
    _, history = train(CONFIG, opts + ["SOLVER.EPOCHS", "2"], resume=run_dir)    # epoch 2 on 1
    assert [record["epoch"] for record in history] == [1, 2]
    _spawn(_train_worker, 2, CONFIG, opts + ["SOLVER.EPOCHS", "3"], run_dir)    # epoch 3 on 2
    state = torch.load(os.path.join(run_dir, "latest"), weights_only=True)
    # 5 steps per epoch on either world size: the global batch is the same.
    assert state["epoch"] == 3 and state["global_step"] == 15
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        assert [json.loads(line)["epoch"] for line in handle] == [1, 2, 3]


def test_indivisible_batch_is_a_clear_error(cifar_root, teacher_file, tmp_path):
    from mdistill.engine.builder import per_process_batch
    from mdistill.errors import UserError
    with pytest.raises(UserError, match="SOLVER.BATCH_SIZE 33 must be a multiple of the number "
                                        "of processes \\(2\\)"):
        per_process_batch(33, 2)
    with pytest.raises(UserError, match="SOLVER.BATCH_SIZE 1 must be a multiple"):
        per_process_batch(1, 2)
