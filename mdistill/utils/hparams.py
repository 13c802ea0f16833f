"""The settings that tell runs apart, for TensorBoard's HPARAMS tab."""


def run_hparams(cfg):
    """The settings that tell runs apart, for the HPARAMS tab."""
    params = {"method": cfg.DISTILLER.TYPE, "teacher": cfg.DISTILLER.TEACHER,
              "student": cfg.DISTILLER.STUDENT, "dataset": cfg.DATASET.TYPE,
              "seed": cfg.EXPERIMENT.SEED, "tag": cfg.EXPERIMENT.TAG,
              "lr": cfg.SOLVER.LR, "batch_size": cfg.SOLVER.BATCH_SIZE,
              "epochs": cfg.SOLVER.EPOCHS, "weight_decay": cfg.SOLVER.WEIGHT_DECAY,
              "optimizer": cfg.SOLVER.TYPE, "scheduler": cfg.SOLVER.LR_SCHEDULER,
              "amp": cfg.SOLVER.AMP,
              # The modern recipe (engine/recipe.py), off by default.
              "mixup": cfg.DATASET.MIXUP.ALPHA, "cutmix": cfg.DATASET.CUTMIX.ALPHA,
              "label_smoothing": cfg.SOLVER.LABEL_SMOOTHING, "resize": cfg.DATASET.RESIZE,
              "ema": cfg.SOLVER.EMA.ENABLE,
              "ema_decay": cfg.SOLVER.EMA.DECAY if cfg.SOLVER.EMA.ENABLE else 0.0,
              "warmup_epochs": cfg.SOLVER.WARMUP_EPOCHS, "clip_grad": cfg.SOLVER.CLIP_GRAD}
    section = cfg.get(cfg.DISTILLER.TYPE)
    if section is not None:
        params.update(_flat_params(section, cfg.DISTILLER.TYPE + "."))
    return params


def _flat_params(node, prefix):
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flat_params(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat[prefix + key] = ",".join(str(item) for item in value)
        else:
            flat[prefix + key] = value
    return flat
