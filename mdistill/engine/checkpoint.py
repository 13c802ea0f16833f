"""Checkpoints: written atomically, loaded without running pickled code."""
import io
import os
import pickle
import re

import torch

from ..errors import UserError


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` so that a crash at any moment leaves either
    the old file or the new one, never half of one.

    The bytes go to a temporary file in the same folder, are flushed and
    fsynced, and the file is renamed over ``path`` (atomic on POSIX).

    Raises:
        UserError: the folder is not writable or the disk is full; the
            previous checkpoint is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        with open(temporary, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise UserError(f"cannot write checkpoint {path}: {error.strerror or error}") from None


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint with ``weights_only=True``: tensors and plain Python
    containers only, so a crafted file cannot run code.

    Raises:
        UserError: the file is missing, is not a checkpoint, or holds objects
            other than tensors and plain data.
    """
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only names the global it blocked (e.g. "GLOBAL posix.system"): that is a
        # file trying to run code. Anything else is a file that is not a checkpoint.
        blocked = re.search(r"GLOBAL (\S+)", str(error))
        if blocked:
            raise UserError(f"refusing to load {path}: it asks to run {blocked.group(1)}, and "
                            f"checkpoints may hold only tensors and plain data") from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint "
                        f"({_reason(error)})") from None
    except Exception as error:  # noqa: BLE001  (any parse failure means "not a checkpoint")
        raise UserError(f"{path} is not a readable PyTorch checkpoint "
                        f"({_reason(error)})") from None


def _reason(error):
    """The most telling line of a loader's error message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed",
                                                             "Check the documentation",
                                                             "Please file an issue"))]
    return ((useful or lines or [type(error).__name__])[0])[:160]


def extract_state_dict(checkpoint, path="checkpoint"):
    """The model weights inside ``checkpoint``.

    Accepts mdistiller/RepDistiller files (``{"model": state_dict}``), our
    student files (the same), our run checkpoints (``{"model": distiller
    state}``, whose ``student.*`` entries are taken) and bare state dicts.
    A ``module.`` prefix (DataParallel) is removed.
    """
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    state = checkpoint.get("model", checkpoint.get("state_dict", checkpoint))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no model weights (expected a 'model' state dict)")
    state = {key[7:] if key.startswith("module.") else key: value for key, value in state.items()}
    if any(key.startswith("student.") for key in state):
        state = {key[8:]: value for key, value in state.items() if key.startswith("student.")}
    return state


def load_model_weights(model, state, arch, path):
    """Load ``state`` into ``model`` strictly, or raise a UserError naming the
    architecture and the first mismatching keys. A model with an
    ``adapt_state_dict`` method (torchvision and timm wrappers) first maps
    foreign key names to its own."""
    adapt = getattr(model, "adapt_state_dict", None)
    if callable(adapt):
        state = adapt(state)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [key for key in expected if key in state
                   and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            details.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong_shape:
            key = wrong_shape[0]
            details.append(f"shape of {key} is {tuple(state[key].shape)}, "
                           f"{arch} needs {tuple(expected[key].shape)}")
        raise UserError(f"{path} does not hold {arch} weights: {'; '.join(details)}")
    model.load_state_dict(state, strict=True)
