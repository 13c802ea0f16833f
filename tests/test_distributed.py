"""DistributedDataParallel on CPU with gloo and two processes."""
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT, tiny_opts
from mdistill.engine.launch import shutdown

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
    shutdown()


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


def _node_worker(rank, world, port, base):
    """A process of a 2-node job: rank 0 alone on node 0, ranks 1 and 2 on node 1."""
    node, local_rank = (0, 0) if rank == 0 else (1, rank - 1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import time
    from mdistill.config import load_cfg
    from mdistill.data.synthetic import build_synthetic
    from mdistill.engine.builder import load_dataset_once_per_node
    from mdistill.registry import DATASETS

    def node_dataset(root=None, download=False):
        """Synthetic data that 'downloads' into root first, noting who did."""
        done = os.path.join(root, "downloaded")
        if not os.path.exists(done):
            with open(os.path.join(base, "downloads.txt"), "a") as handle:
                handle.write(f"{os.path.basename(root)} rank{rank}\n")
            time.sleep(0.5)                 # a download takes a while
            open(done, "w").close()
        return build_synthetic(num_train=16, num_test=8, num_classes=4)

    DATASETS.register("node_probe", node_dataset)
    node_root = os.path.join(base, f"node{node}")
    os.makedirs(node_root, exist_ok=True)
    cfg = load_cfg(None, ["DATASET.TYPE", "node_probe", "DATASET.ROOT", node_root,
                          "DEVICE", "cpu"])
    data = load_dataset_once_per_node(cfg)
    assert len(data.train) == 16
    shutdown()


def test_each_node_downloads_the_dataset_once_by_its_local_rank_0(tmp_path):
    _spawn(_node_worker, 3, str(tmp_path))
    lines = sorted((tmp_path / "downloads.txt").read_text().splitlines())
    # Global rank 1 is node 1's local rank 0; rank 2 only reads what it wrote.
    assert lines == ["node0 rank0", "node1 rank1"]


def _logged_run_worker(rank, world, port, opts, run_dir, out_path):
    """One epoch through the real Trainer writing its run folder; then whether every
    process holds rank 0's BatchNorm statistics."""
    _join(rank, world, port)
    from mdistill.config import load_cfg
    from mdistill.engine.builder import build_experiment
    from mdistill.engine.trainer import Trainer
    experiment = build_experiment(load_cfg(CONFIG, opts))
    trainer = Trainer(experiment, run_dir=run_dir if rank == 0 else None,
                      log=lambda text: None)
    trainer.train()
    same = [_gather_equal(buffer.detach().clone().float()) for buffer in trainer.forward_buffers]
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"same": same}, handle)
    shutdown()


def test_two_processes_log_the_accuracy_of_the_saved_student(cifar_root, teacher_file,
                                                             tmp_path):
    import subprocess
    import sys
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TEACHER", "resnet20", "DISTILLER.STUDENT",
                     "resnet8", "DISTILLER.TEACHER_WEIGHTS", teacher_file, "SOLVER.EPOCHS", "1")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    from mdistill.config import load_cfg
    (run_dir / "config.yaml").write_text(load_cfg(CONFIG, opts).dump())    # for eval.py
    out = tmp_path / "result.json"
    _spawn(_logged_run_worker, 2, opts, str(run_dir), str(out))
    assert all(json.loads(out.read_text())["same"])
    with open(run_dir / "metrics.jsonl") as handle:
        (logged,) = [json.loads(line)["test"] for line in handle]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools/eval.py"),
                             str(run_dir / "student_best"), "--device", "cpu", "--json",
                             str(tmp_path / "eval.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((tmp_path / "eval.json").read_text())
    assert row["top1"] == logged["top1"]
    # The loss tells BatchNorm statistics apart even where no prediction flips.
    assert row["loss"] == pytest.approx(logged["loss"], rel=1e-5)


STEPS, BATCH, NEGATIVES = 2, 16, 16


def _fixed_batches(method):
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(STEPS):
        batch = {"image": torch.randn(BATCH, 3, 32, 32, generator=generator),
                 "target": torch.randint(0, 100, (BATCH,), generator=generator)}
        if method == "CRD":     # 160 training images in the fixture
            batch["index"] = torch.randperm(160, generator=generator)[:BATCH]
            negatives = torch.randint(0, 160, (BATCH, NEGATIVES), generator=generator)
            batch["contrastive_index"] = torch.cat([batch["index"][:, None], negatives], 1)
        batches.append(batch)
    return batches


def _train_share(opts, method, rank=0, world=1):
    """Two steps on this process's share of fixed batches, the student's BatchNorm in
    eval mode (per-process batch statistics differ from whole-batch ones by design).
    Returns the student's parameters and the method's buffers, flattened."""
    from mdistill.config import load_cfg
    from mdistill.engine.builder import build_experiment
    from mdistill.engine.trainer import Trainer
    experiment = build_experiment(load_cfg(CONFIG, opts))
    trainer = Trainer(experiment, run_dir=None, log=lambda text: None)
    trainer.start_epoch(1)
    distiller = experiment.distiller
    distiller.student.eval()
    for batch in _fixed_batches(method):
        assert trainer.run_step({key: value[rank::world] for key, value in batch.items()})
    tensors = list(distiller.student.parameters()) + [
        buffer for name, buffer in distiller.named_buffers() if "memory" in name]
    return torch.cat([tensor.detach().reshape(-1).float() for tensor in tensors])


def _share_worker(rank, world, port, opts, method, out_path):
    _join(rank, world, port)
    state = _train_share(opts, method, rank, world)
    if rank == 0:
        torch.save(state, out_path)
    shutdown()


@pytest.mark.parametrize("method,extra", [
    ("KD", []),
    ("CRD", ["CRD.NCE.K", str(NEGATIVES), "CRD.FEAT.DIM", "16"]),
])
def test_two_processes_with_half_a_batch_take_the_step_of_one_process(
        cifar_root, teacher_file, tmp_path, method, extra):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", method, "DISTILLER.TEACHER",
                     "resnet20", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                     teacher_file, "SOLVER.BATCH_SIZE", str(BATCH), "SOLVER.DETERMINISTIC",
                     "True", *extra)
    torch.set_num_threads(1)
    single = _train_share(opts, method)
    out = tmp_path / "two.pt"
    _spawn(_share_worker, 2, opts, method, str(out))
    double = torch.load(out, weights_only=True)
    start = _train_share(opts + ["SOLVER.LR", "1e-12"], method)   # the steps moved the weights
    assert (single - start).abs().max() > 1e-3
    # A gradient summed over processes instead of averaged would be twice as large.
    torch.testing.assert_close(double, single, rtol=1e-4, atol=1e-6)


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests here run their one-process reference with one thread, like the workers;
    later modules (the SIGKILL test compares against subprocesses) need the default."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
