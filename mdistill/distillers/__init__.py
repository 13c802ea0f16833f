"""Distillation methods; importing this package registers every one of them."""
from ..registry import DISTILLERS
from .base import Distiller, kd_loss, probe_features
from .teachers import build_teacher_source
from . import vanilla, kd, fitnet, at, rkd, crd, advkd  # noqa: F401  (registration)
from . import dist, nkd, ctkd, mlkd  # noqa: F401  (registration: logit methods since DKD)
from . import cc, fsp, ab, ft  # noqa: F401  (registration: RepDistiller's CC, FSP, AB, FT)
from . import nst, pkt, sp, kdsvd, vid  # noqa: F401  (registration: mdistiller's feature methods)
from . import dkd, reviewkd, ofd  # noqa: F401  (registration: DKD, ReviewKD, OFD)
from . import crld, distplus, srd, skd  # noqa: F401  (registration: methods since 2023)
from . import wttm, wkd, catkd, ickd  # noqa: F401  (registration: methods since 2023)
from . import ofa, deit  # noqa: F401  (registration: across architectures)

__all__ = ["DISTILLERS", "Distiller", "build_distiller", "kd_loss", "probe_features"]


def build_distiller(cfg, student, teacher=None, data_info=None, batch_rows=0):
    """Build the method named by ``cfg.DISTILLER.TYPE`` and its teacher source.

    Args:
        cfg: the experiment config.
        student: the student model.
        teacher: the teacher model (None for methods with ``requires_teacher = False``),
            or a list of teachers in DISTILLER.TEACHERS order: the method is built
            with the DISTILLER.FEATURE_TEACHER one, and served by all of them as
            DISTILLER.TEACHER_REDUCE says (:func:`~mdistill.distillers.teachers.build_teacher_source`).
        data_info: the training data's description (``num_classes``,
            ``train_targets``, ``image_size``), e.g. a
            :class:`mdistill.data.DatasetSplits`.
        batch_rows: the per-process training batch size (teacher forwards are
            padded to it).

    Raises:
        UserError: the method name is unknown (the valid ones are listed), or its
            teachers cannot serve what it reads.
    """
    method = DISTILLERS.get(cfg.DISTILLER.TYPE)
    if not method.requires_teacher:
        return method.from_config(cfg, student, None, data_info)
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    feature_index = cfg.DISTILLER.FEATURE_TEACHER if len(teachers) > 1 else 0
    distiller = method.from_config(cfg, student, teachers[feature_index], data_info)
    distiller.set_teacher_source(build_teacher_source(
        distiller, teachers, cfg.DISTILLER.TEACHER_REDUCE, feature_index,
        batch_rows=batch_rows))
    return distiller
