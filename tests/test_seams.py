"""Where features meet: each finding of the review that combined them, proved.

DOT under the fp16 scaler with channels_last gradients; a step the scaler skips
commits nothing; methods with stages under DDP when a stage trains only some
parameters; update rules a stage cannot use; the teacher cache exact for any
dataset size; one all-reduce per DDP step; torchvision weights offline.
"""
import copy
import json
import os
import urllib.error

import pytest
import torch
from torch import nn

from conftest import tiny_opts
from mdistill.config import load_cfg
from mdistill.engine import trainer as trainer_module
from mdistill.engine.builder import build_experiment, load_teacher
from mdistill.engine.update_rules import UPDATE_RULES
from mdistill.errors import UserError
from mdistill.models import build_model
from test_distillers import CONFIG, make_trainer, two_steps
from test_step_protocol import Solver
from test_teacher_cache import run_kd

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------- DOT, fp16, channels_last
def dot_problem():
    """A channels_last conv net (its weight gradients are channels_last too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    model.to(memory_format=torch.channels_last)
    image = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    return model, image


def dot_losses(model, image, kd_scale=1.0):
    logits = model(image)
    return {"loss_ce": nn.functional.cross_entropy(logits, torch.tensor([0, 3])),
            "loss_kd": kd_scale * logits.pow(2).mean()}


@pytest.mark.parametrize("kd_scale, taken", [(1.0, True), (3e38, False)])
def test_dot_under_a_gradient_scaler_with_channels_last_gradients(kd_scale, taken):
    # The review's crash: DOT wrote into grad.view(-1) of a channels_last gradient to
    # force the scaler's skip, and read the scaler's private scale.
    rule = UPDATE_RULES.get("dot")(Solver)
    model, image = dot_problem()
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer = rule.build_optimizer(model.parameters())
    assert rule.backward_and_step(dot_losses(model, image, kd_scale), optimizer, scaler) is taken
    if taken:
        # Unscaling by a power of two is exact: the same step as without a scaler.
        plain = torch.amp.GradScaler("cpu", enabled=False)
        reference_optimizer = rule.build_optimizer(reference.parameters())
        assert rule.backward_and_step(dot_losses(reference, image), reference_optimizer, plain)
        for mine, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
        assert scaler.get_scale() == 2.0 ** 10
    else:
        # The distillation gradient overflowed: nothing moved, the scale halved.
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
        assert scaler.get_scale() == 2.0 ** 9
        assert not optimizer.state or all("momentum_buffer" not in state
                                          for state in optimizer.state.values())


# ------------------------------------------------- a skipped step commits nothing
@pytest.mark.parametrize("method", ["CRD", "ADVKD"])
def test_a_step_the_scaler_skips_commits_nothing(method, cifar_root, teacher_file, tmp_path):
    # The review found CRD's memory, ADVKD's discriminator step and global_step moving
    # for a step that fp16's scaler skipped. A scale of 2**127 overflows any loss.
    trainer = make_trainer(method, cifar_root, teacher_file, tmp_path / "run")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    distiller = trainer.distiller
    before = copy.deepcopy(distiller.state_dict())
    assert two_steps(trainer)[0] is None
    after = distiller.state_dict()
    moved = [key for key in before if not torch.equal(before[key], after[key])]
    assert moved == [] and trainer.global_step == 0 and trainer.meter.scaler_skips >= 1
    # With a sane scale the same trainer takes its steps, and commits them.
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    assert all(values is not None for values in two_steps(trainer))
    assert trainer.global_step == 2
    state = distiller.state_dict()
    committed = "memory_student" if method == "CRD" else "discriminator.net.0.weight"
    key = next(key for key in state if key.startswith(committed.rsplit(".", 1)[0]))
    assert not torch.equal(before[key], state[key])


# ----------------------------------------------------------- stages, DDP, DOT
def test_ft_without_an_init_stage_trains_under_two_processes(cifar_root, teacher_file,
                                                             tmp_path):
    # FT.INIT_EPOCHS 0 (documented as valid): one stage, whose parameters leave out the
    # paraphraser; DDP was told nothing unused (it counted stages) and failed at step 2.
    import torch.multiprocessing as mp
    from test_distributed import free_port
    from test_stages import _ddp_stage_worker
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", "FT", "DISTILLER.TEACHER",
                     "resnet20", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                     teacher_file, "SOLVER.EPOCHS", "1", "FT.INIT_EPOCHS", "0")
    threads = torch.get_num_threads()
    try:
        mp.start_processes(_ddp_stage_worker, args=(2, free_port(), opts, str(tmp_path / "done")),
                           nprocs=2, join=True, start_method="spawn")
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for path in tmp_path.rglob("metrics.jsonl") for line in open(path)]
    assert [record["stage"] for record in records] == ["distill"]


@pytest.mark.parametrize("method", ["FSP", "AB", "FT"])
def test_dot_is_refused_for_a_stage_without_the_task_loss(method, cifar_root, teacher_file,
                                                          tmp_path):
    opts = tiny_opts(cifar_root, tmp_path, "DISTILLER.TYPE", method, "DISTILLER.TEACHER",
                     "resnet20", "DISTILLER.STUDENT", "resnet8", "DISTILLER.TEACHER_WEIGHTS",
                     teacher_file, "SOLVER.TRAINER", "dot")
    with pytest.raises(UserError) as error:
        build_experiment(load_cfg(CONFIG, opts))
    assert str(error.value) == (f"SOLVER.TRAINER dot: {method}'s 'init' stage has no task loss "
                                f"(loss_ce) for DOT's second momentum; use SOLVER.TRAINER base")


# ----------------------------------------------------- the cache, any dataset size
def test_the_teacher_cache_is_exact_when_the_last_batch_has_one_row(cifar_root, teacher_file,
                                                                     tmp_path):
    # 160 images in batches of 53: the last has 1 row, which a 1-row forward computes
    # through other kernels (other bits) than a full batch. The live teacher now pads
    # it to the batch's rows as the cache does, so the three runs end identical.
    batch = ["SOLVER.BATCH_SIZE", "53", "SOLVER.EPOCHS", "1"]
    live, history, _ = run_kd(cifar_root, teacher_file, tmp_path, "live", *batch)
    cache = str(tmp_path / "cache")
    cold, _, _ = run_kd(cifar_root, teacher_file, tmp_path, "cold", *batch,
                        "DISTILLER.TEACHER_CACHE", cache)
    warm, warm_history, _ = run_kd(cifar_root, teacher_file, tmp_path, "warm", *batch,
                                   "DISTILLER.TEACHER_CACHE", cache)
    assert warm_history[0]["teacher_cache"]["teacher_rows"] == 0
    for name, student in (("cold", cold), ("warm", warm)):
        assert all(torch.equal(live[key], student[key]) for key in live), name


# ------------------------------------------------------- one all-reduce per step
def test_a_distributed_step_reduces_once_for_finiteness_and_stop(cifar_root, teacher_file,
                                                                 tmp_path, monkeypatch):
    trainer = make_trainer("KD", cifar_root, teacher_file, tmp_path / "run")
    reduced = []
    monkeypatch.setattr(trainer_module, "is_distributed", lambda: True)
    monkeypatch.setattr(trainer_module, "all_reduce_sum", lambda t: reduced.append(t) or t)
    monkeypatch.setattr(trainer_module, "get_world_size", lambda: 1)
    two_steps(trainer)
    assert len(reduced) == 2 and not trainer.stop_requested()
    assert len(reduced) == 2            # asking costs no further reduction
    trainer.stop_signal = 15            # a signal on this process: seen after the next step
    two_steps(trainer)
    assert trainer.stop_requested() and len(reduced) == 4


# ------------------------------------------------------------- offline weights
def test_torchvision_teacher_weights_offline_name_the_file(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = load_cfg(os.path.join(os.path.dirname(CONFIG), "../imagenet/r34_r18/kd.yaml"))
    assert not cfg.DISTILLER.TEACHER_WEIGHTS
    with pytest.raises(UserError) as error:
        load_teacher(build_model("ResNet34", 1000, dataset="imagenet"), cfg)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "resnet34-b627a593.pth" in message and "DISTILLER.TEACHER_WEIGHTS" in message


# ------------------------------------------------------------ data, once per node
@pytest.mark.parametrize("rank, local_rank, builds_after", [(0, 0, 0), (2, 0, 1), (1, 1, 2),
                                                            (3, 1, 2)])
def test_the_global_first_process_prepares_the_data_before_other_nodes(
        rank, local_rank, builds_after, monkeypatch):
    # Two nodes of two processes on a shared filesystem: rank 0 downloads first, then
    # the other node's first process (which finds the files), then everyone else.
    from mdistill.engine import builder
    barriers, built_at = [], []
    monkeypatch.setattr(builder, "get_world_size", lambda: 4)
    monkeypatch.setattr(builder, "get_rank", lambda: rank)
    monkeypatch.setattr(builder, "get_local_rank", lambda: local_rank)
    monkeypatch.setattr(builder, "barrier", lambda: barriers.append(1))
    monkeypatch.setattr(builder, "build_configured_dataset", lambda cfg: built_at.append(
        len(barriers)) or "data")
    monkeypatch.setattr(builder, "apply_split_options", lambda data, *args: data)
    assert builder.load_dataset_once_per_node(load_cfg(CONFIG)) == "data"
    assert built_at == [builds_after] and len(barriers) == 2
