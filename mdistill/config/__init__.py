"""Config: defaults, YAML files with ``_BASE_`` inheritance, command-line overrides.

Example::

    cfg = load_cfg("configs/cifar100/kd.yaml", ["SOLVER.LR", "0.1"])
    cfg.SOLVER.LR  # 0.1, and cfg is frozen
"""
import os
import sys

import yaml
from yacs.config import CfgNode as CN

from ..errors import UserError, closest_first, unknown_choice
from .defaults import get_cfg

__all__ = ["get_cfg", "load_cfg", "merge_overrides", "validate_cfg", "default_run_name", "cfg_from_text", "flatten_cfg", "CN"]

# Values that are not model, dataset or method names (those are checked by
# their registries when built) but must be one of a few words.
CHOICES = {
    "SOLVER.TYPE": ("SGD", "Adam", "AdamW"),
    "SOLVER.LR_SCHEDULER": ("multistep", "cosine"),
    "SOLVER.AMP": ("none", "bf16", "fp16"),
    "CRD.MODE": ("exact", "relax"),
    "ADVKD.INPUT": ("logits", "probs", "feature"),
    "ADVKD.GAN_LOSS": ("bce", "lsgan", "hinge"),
    "DISTILLER.TEACHER_REDUCE": ("mean_probs", "mean_loss"),
    "OFD.TEACHER_BN": ("batch", "eval"),
}

# Keys a resumed run may change; anything else must match the saved config.
RESUMABLE_KEYS = ("SOLVER.EPOCHS", "DATASET.NUM_WORKERS", "DATASET.ROOT", "DATASET.DOWNLOAD",
                  "DATASET.TEST.BATCH_SIZE", "DEVICE", "LOG.TENSORBOARD_FREQ",
                  "LOG.SAVE_CHECKPOINT_FREQ", "LOG.SAVE_EVERY_N_ITERS", "LOG.WANDB",
                  "LOG.PRINT_FREQ",
                  "SOLVER.SKIP_NONFINITE_STEPS", "SOLVER.COMPILE", "DISTILLER.TEACHER_CACHE")

# Keys declared only so mdistiller's YAML files load: they change nothing, so a
# value other than the default gets a warning saying why (see warn_ignored_keys).
_PROBED = "the shapes are probed from the models at the dataset's image size"
IGNORED_KEYS = {
    "FITNET.INPUT_SIZE": _PROBED,
    "VID.INPUT_SIZE": _PROBED,
    "CRD.FEAT.STUDENT_DIM": "the embedding's input width is probed from the student's "
                            "pooled feature",
    "CRD.FEAT.TEACHER_DIM": "the embedding's input width is probed from the teacher's "
                            "pooled feature",
}
_warned_ignored = set()


def _all_keys(node, prefix=""):
    keys = []
    for key, value in node.items():
        if isinstance(value, CN):
            keys += _all_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


def _type_name(value):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list"}.get(type(value), type(value).__name__)


def _coerce(key, default, value):
    """Return ``value`` converted to the type of ``default`` or raise UserError."""
    wrong = UserError(f"config key {key} must be {_type_name(default)} "
                      f"(like {default!r}), got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise wrong
    if isinstance(default, (int, float)):
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot ("1e-4") as strings.
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if isinstance(default, int) and not float(value).is_integer():
            raise wrong
        return type(default)(value)
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise wrong
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise wrong
        if default:
            item = default[0]
            value = [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
        return type(default)(value)
    return value


def _merge(node, values, prefix=""):
    if not isinstance(values, dict):
        raise UserError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, "
                        f"got {values!r}")
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in node:
            valid = closest_first(full, _all_keys(node, prefix), limit=3)
            raise UserError(f"unknown config key {full}; closest valid keys: {', '.join(valid)}")
        if isinstance(node[key], CN):
            if not isinstance(value, dict):
                raise UserError(f"config key {full} is a section with keys "
                                f"{', '.join(sorted(node[key]))}, got {value!r}")
            _merge(node[key], value, full + ".")
        else:
            node[key] = _coerce(full, node[key], value)


def _read_yaml(path, stack=()):
    """Read ``path`` and the ``_BASE_`` files it inherits, base first."""
    path = os.path.abspath(path)
    if path in stack:
        chain = " -> ".join(os.path.relpath(p) for p in stack + (path,))
        raise UserError(f"_BASE_ cycle in config files: {chain}")
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {os.path.relpath(path)}")
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"config file {os.path.relpath(path)}{where} is not valid YAML: "
                        f"{problem}") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {os.path.relpath(path)} must hold a mapping of keys")
    base = values.pop("_BASE_", None)
    if base is None:
        return [values]
    bases = base if isinstance(base, list) else [base]
    chain = []
    for item in bases:
        chain += _read_yaml(os.path.join(os.path.dirname(path), item), stack + (path,))
    return chain + [values]


def parse_overrides(opts):
    """Turn ``["SOLVER.LR", "0.1", ...]`` into ``{"SOLVER.LR": 0.1, ...}``."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise UserError(f"overrides come as KEY VALUE pairs; {opts[-1]!r} has no value")
    parsed = {}
    for key, text in zip(opts[::2], opts[1::2]):
        try:
            parsed[key] = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            parsed[key] = text
    return parsed


def merge_overrides(cfg, overrides):
    """Apply ``{"A.B": value}`` overrides to the unfrozen ``cfg``."""
    for key, value in overrides.items():
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(cfg, nested)


def validate_cfg(cfg):
    """Check the values that must be one of a fixed set of words, and ranges."""
    for key, valid in CHOICES.items():
        section, name = key.rsplit(".", 1)
        value = cfg
        for part in section.split("."):
            value = value[part]
        if value[name] not in valid:
            raise unknown_choice(f"value for {key}:", value[name], valid)
    positive = {"SOLVER.BATCH_SIZE": cfg.SOLVER.BATCH_SIZE, "SOLVER.EPOCHS": cfg.SOLVER.EPOCHS,
                "DATASET.TEST.BATCH_SIZE": cfg.DATASET.TEST.BATCH_SIZE,
                "LOG.TENSORBOARD_FREQ": cfg.LOG.TENSORBOARD_FREQ, "SOLVER.LR": cfg.SOLVER.LR}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key {key} must be positive, got {value}")
    device = cfg.DEVICE
    if device not in ("auto", "cpu", "cuda") and not (
            device.startswith("cuda:") and device[5:].isdigit()):
        raise UserError(f"config key DEVICE must be auto, cpu, cuda or cuda:N, got {device!r}")


def warn_ignored_keys(cfg, warn=None):
    """Warn about each key of IGNORED_KEYS that ``cfg`` sets to a value other
    than its default, once per key and value in a process.

    Args:
        cfg: a config.
        warn: called with the line; by default printed to stderr as
            ``warning: ...`` by the first process of a distributed run only.

    Returns:
        The lines warned about this time.
    """
    if warn is None:
        def warn(text):
            if os.environ.get("RANK", "0") == "0":
                print(f"warning: {text}", file=sys.stderr)
    flat, defaults = flatten_cfg(cfg), flatten_cfg(get_cfg())
    lines = []
    for key, why in IGNORED_KEYS.items():
        if key not in defaults or flat[key] == defaults[key] or (key, repr(flat[key])) in \
                _warned_ignored:
            continue
        _warned_ignored.add((key, repr(flat[key])))
        lines.append(f"{key} is {flat[key]!r} but is ignored: {why} (the key is kept so "
                     f"mdistiller's YAML files load)")
        warn(lines[-1])
    return lines


def load_cfg(path=None, opts=None, freeze=True, warn_ignored=True):
    """Build the config of one experiment.

    Args:
        path: a YAML file; it may name ``_BASE_`` files (relative to itself)
            whose keys it overrides. None keeps the defaults.
        opts: ``[KEY, VALUE, ...]`` from the command line, applied last;
            values are parsed as YAML (``0.1``, ``true``, ``[30, 60]``).
        freeze: freeze the result.
        warn_ignored: warn about keys that are set but change nothing
            (:func:`warn_ignored_keys`).

    Returns:
        The merged, validated :class:`CfgNode`.

    Raises:
        UserError: unknown key, wrong type, unreadable file, ``_BASE_`` cycle,
            or a value outside its choices.
    """
    cfg = get_cfg()
    if path is not None:
        for values in _read_yaml(path):
            _merge(cfg, values)
    merge_overrides(cfg, parse_overrides(opts))
    validate_cfg(cfg)
    if warn_ignored:
        warn_ignored_keys(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def cfg_from_text(text):
    """A frozen config from YAML text (such as the copy inside a run checkpoint)."""
    cfg = get_cfg()
    _merge(cfg, yaml.safe_load(text) or {})
    cfg.freeze()
    return cfg


def default_run_name(cfg, opts=None):
    """A readable run folder name: method, teacher, student, seed and overrides.

    Example: ``kd,resnet32x4,resnet8x4,seed0,LR=0.1`` (several teachers:
    ``kd,resnet56+wrn_40_2,resnet20,...``; with SDD on: ``kd+sdd,...``).
    """
    method = cfg.DISTILLER.TYPE.lower()
    # Switches turned on (SDD.ENABLE) are part of the method: kd+sdd.
    method += "".join(f"+{section.lower()}" for section, node in cfg.items()
                      if isinstance(node, dict) and node.get("ENABLE") is True)
    if method == "none":
        parts = ["vanilla", cfg.DISTILLER.STUDENT]
    else:
        teacher = "+".join(cfg.DISTILLER.TEACHERS) or cfg.DISTILLER.TEACHER
        parts = [method, teacher, cfg.DISTILLER.STUDENT]
    parts.append(f"seed{cfg.EXPERIMENT.SEED}")
    skip = ("EXPERIMENT.", "LOG.", "DEVICE", "DATASET.ROOT", "DATASET.NUM_WORKERS",
            "DATASET.DOWNLOAD", "DISTILLER.TEACHER_WEIGHTS", "DISTILLER.TEACHERS")
    for key, value in parse_overrides(opts).items():
        if key.startswith(skip) or key in RESUMABLE_KEYS or key in (
                "DISTILLER.TYPE", "DISTILLER.TEACHER", "DISTILLER.STUDENT"):
            continue
        if key.count(".") == 1 and key.endswith(".ENABLE"):
            continue                # a switch: named with the method above
        if isinstance(value, (list, tuple)):
            value = "-".join(str(v) for v in value)
        parts.append(f"{key.split('.')[-1]}={value}")
    return ",".join(str(part).replace(os.sep, "_") for part in parts)


def config_differences(saved, current, ignore=RESUMABLE_KEYS):
    """Keys whose values differ between two configs, except ``ignore``."""
    saved_flat, current_flat = flatten_cfg(saved), flatten_cfg(current)
    return [key for key in sorted(set(saved_flat) | set(current_flat))
            if key not in ignore and saved_flat.get(key) != current_flat.get(key)]


def flatten_cfg(node, prefix=""):
    """``{"SOLVER.LR": 0.05, ...}`` from a config or nested dict (tuples become lists)."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, (CN, dict)):
            flat.update(flatten_cfg(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat
