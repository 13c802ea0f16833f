"""Distillation methods; importing this package registers every one of them."""
from ..registry import DISTILLERS
from .base import Distiller, kd_loss, probe_features
from . import vanilla, kd, fitnet, at, rkd, crd, advkd  # noqa: F401  (registration)
from . import dist, nkd, ctkd, mlkd  # noqa: F401  (registration: logit methods since DKD)
from . import cc, fsp, ab, ft  # noqa: F401  (registration: RepDistiller's CC, FSP, AB, FT)
from . import nst, pkt, sp, kdsvd, vid  # noqa: F401  (registration: mdistiller's feature methods)
from . import dkd, reviewkd, ofd  # noqa: F401  (registration: DKD, ReviewKD, OFD)

__all__ = ["DISTILLERS", "Distiller", "build_distiller", "kd_loss", "probe_features"]


def build_distiller(cfg, student, teacher=None, data_info=None):
    """Build the method named by ``cfg.DISTILLER.TYPE``.

    Args:
        cfg: the experiment config.
        student: the student model.
        teacher: the teacher model (None for methods with ``requires_teacher = False``),
            or a list of teachers in DISTILLER.TEACHERS order: the method is built
            with the DISTILLER.FEATURE_TEACHER one, then given all of them
            (:meth:`Distiller.set_teachers`, combined by DISTILLER.TEACHER_REDUCE).
        data_info: the training data's description (``num_classes``,
            ``train_targets``, ``image_size``), e.g. a
            :class:`mdistill.data.DatasetSplits`.

    Raises:
        UserError: the method name is unknown (the valid ones are listed).
    """
    method = DISTILLERS.get(cfg.DISTILLER.TYPE)
    if not method.requires_teacher:
        return method.from_config(cfg, student, None, data_info)
    if not isinstance(teacher, (list, tuple)):
        return method.from_config(cfg, student, teacher, data_info)
    distiller = method.from_config(cfg, student, teacher[cfg.DISTILLER.FEATURE_TEACHER],
                                   data_info)
    distiller.set_teachers(teacher, cfg.DISTILLER.TEACHER_REDUCE)
    return distiller
