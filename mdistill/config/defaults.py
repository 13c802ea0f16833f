"""Every config key, declared once with its default and what it means.

Key names follow mdistiller's ``mdistiller/engine/cfg.py`` so its YAML files
load unchanged; keys it lacks (DATASET.ROOT, SOLVER.AMP, ...) are ours.
"""
from yacs.config import CfgNode as CN

_C = CN()

# ---------------------------------------------------------------- experiment
_C.EXPERIMENT = CN()
# Runs land in LOG.PREFIX/PROJECT/NAME/.
_C.EXPERIMENT.PROJECT = "distill"
# Run folder name; empty picks a readable one (method, teacher, student, seed).
_C.EXPERIMENT.NAME = ""
# Free-form tag kept from mdistiller (it named runs by it); shown in hparams.
_C.EXPERIMENT.TAG = "default"
# Seed for model init, data order and augmentation.
_C.EXPERIMENT.SEED = 0

# ------------------------------------------------------------------- dataset
_C.DATASET = CN()
# cifar100 | cifar10 | mnist | fashion_mnist | kmnist | svhn | stl10 |
# imagefolder | imagenet | digits | synthetic
_C.DATASET.TYPE = "cifar100"
# Folder holding cifar-100-python/, imagenet/{train,val}, torchvision's layout of
# the other sets (FashionMNIST/raw/, ...), or train/ and val/ for imagefolder.
_C.DATASET.ROOT = "./data"
# Download the dataset (CIFAR, MNIST family, SVHN, STL-10) when its files are missing.
_C.DATASET.DOWNLOAD = True
# Network input side for imagefolder and torchvision's sets; 0: the data's own
# (28 px padded to 32; imagefolder: the first image's side up to 32, else 224).
_C.DATASET.IMAGE_SIZE = 0
# Per-channel normalisation in [0, 1] units; empty: the training split's own
# statistics (the published ones for CIFAR-100 and ImageNet).
_C.DATASET.MEAN = []
_C.DATASET.STD = []
# Train on this many images of each class (0: all), a stratified seeded draw.
_C.DATASET.TRAIN_PER_CLASS = 0
# Or on this share of each class (1.0: all).
_C.DATASET.TRAIN_FRACTION = 1.0
# Seed of the training subset and of the validation split; the run's seed does
# not change them, so runs of several seeds see the same images.
_C.DATASET.SUBSET_SEED = 0
# Share of each class of the training split held out for validation: the
# "best" checkpoint is chosen on it, and the test set only reports (0: none).
_C.DATASET.VAL_FRACTION = 0.0
# DataLoader worker processes (folder datasets; in-memory ones need none).
_C.DATASET.NUM_WORKERS = 2
# The modern recipe (engine/recipe.py), applied to each training batch on the
# device before the forward; the teacher sees the same images as the student.
# Resize the images to this side (bilinear, antialiased as torchvision), for
# training and evaluation, e.g. to a pretrained teacher's resolution (0: off).
_C.DATASET.RESIZE = 0
# Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) through timm's Mixup,
# one draw per batch; the task loss then uses the mixed soft targets. Refused
# for methods that read the hard labels beyond their cross-entropy.
_C.DATASET.MIXUP = CN()
# Beta(ALPHA, ALPHA) of the mixing weight (0: mixup off; timm's ImageNet recipes 0.8).
_C.DATASET.MIXUP.ALPHA = 0.0
# Probability of mixing a batch at all.
_C.DATASET.MIXUP.PROB = 1.0
# With both on: probability that a mixed batch uses CutMix instead of mixup.
_C.DATASET.MIXUP.SWITCH_PROB = 0.5
_C.DATASET.CUTMIX = CN()
# Beta(ALPHA, ALPHA) of the kept area (0: CutMix off; timm's ImageNet recipes 1.0).
_C.DATASET.CUTMIX.ALPHA = 0.0
_C.DATASET.TEST = CN()
# Global evaluation batch size.
_C.DATASET.TEST.BATCH_SIZE = 64
# Options of the synthetic dataset (smoke tests, benchmarks).
_C.DATASET.SYNTHETIC = CN()
_C.DATASET.SYNTHETIC.NUM_TRAIN = 1024
_C.DATASET.SYNTHETIC.NUM_TEST = 256
_C.DATASET.SYNTHETIC.NUM_CLASSES = 100
_C.DATASET.SYNTHETIC.IMAGE_SIZE = 32

# ----------------------------------------------------------------- distiller
_C.DISTILLER = CN()
# Method name in the DISTILLERS registry (NONE trains the student alone).
_C.DISTILLER.TYPE = "NONE"
# Model names (CIFAR or ImageNet family, picked by DATASET.TYPE), or any
# torchvision:<name> or timm:<name> classifier.
_C.DISTILLER.TEACHER = "ResNet50"
_C.DISTILLER.STUDENT = "resnet32"
# Teacher checkpoint path; empty means mdistiller's layout
# download_ckpts/cifar_teachers/<TEACHER>_vanilla/ckpt_epoch_240.pth, or
# torchvision's pretrained weights on ImageNet.
_C.DISTILLER.TEACHER_WEIGHTS = ""
# Several teachers at once (ours): their model names; empty: DISTILLER.TEACHER
# alone. With a list, DISTILLER.TEACHER and TEACHER_WEIGHTS are not used.
_C.DISTILLER.TEACHERS = []
# One checkpoint path per entry of TEACHERS, in order (an entry "" or an empty
# list: each teacher's default, as for TEACHER_WEIGHTS). A key of its own
# because config values keep their type: TEACHER_WEIGHTS stays one string, so
# mdistiller's YAML files and single-teacher runs read as before.
_C.DISTILLER.TEACHERS_WEIGHTS = []
# How methods that use only the teachers' logits (KD, DKD, DIST, ...) combine
# them: mean_probs (distil from the average of the teachers' softened
# predictions at the method's temperature) | mean_loss (one loss per teacher,
# averaged).
_C.DISTILLER.TEACHER_REDUCE = "mean_probs"
# Index into TEACHERS of the teacher whose features feature methods (FitNet,
# CRD, ...) use; they use that teacher alone.
_C.DISTILLER.FEATURE_TEACHER = 0
# Folder of the exact teacher-logits cache (ours; empty: off). Methods that use
# only the teacher's logits, with CIFAR-style crop+flip augmentation, read each
# (sample, view)'s logits from a file there once computed; files are keyed by
# teacher weights, training images, augmentation and precision, and may be
# shared by concurrent runs (engine/teacher_cache.py).
_C.DISTILLER.TEACHER_CACHE = ""
# torchvision:/timm: teacher: the library's pretrained weights (from its local
# cache, or downloaded), used when TEACHER_WEIGHTS is empty; the classifier is
# new when the number of classes differs.
_C.DISTILLER.TEACHER_PRETRAINED = False
# The same for the student (e.g. to fine-tune a teacher with DISTILLER.TYPE NONE).
_C.DISTILLER.STUDENT_PRETRAINED = False

# ------------------------------------------------------------------- model
_C.MODEL = CN()
# torchvision:/timm: models: adapt the stem to 32 px inputs (first conv at
# stride 1, no max-pool); zoo models are built for their family already.
_C.MODEL.SMALL_INPUT = False

# -------------------------------------------------------------------- solver
_C.SOLVER = CN()
# Update rule (engine/update_rules.py): base (one backward of the summed
# losses) | crd (mdistiller's name for CRD's trainer; the same as base here) |
# dot (Distillation-Oriented Trainer, SGD only) | crd_dot (DOT with CRD).
_C.SOLVER.TRAINER = "base"
# DOT: the distillation gradient's momentum is MOMENTUM + DELTA, the task
# gradient's MOMENTUM - DELTA (mdistiller: 0.075 CIFAR, 0.09 ImageNet).
_C.SOLVER.DOT = CN()
_C.SOLVER.DOT.DELTA = 0.075
# Global batch size, split over the processes of a distributed run.
_C.SOLVER.BATCH_SIZE = 64
_C.SOLVER.EPOCHS = 240
# Base learning rate.
_C.SOLVER.LR = 0.05
# multistep (mdistiller: LR x LR_DECAY_RATE at each stage) | cosine
_C.SOLVER.LR_SCHEDULER = "multistep"
# Epochs at which the multistep schedule decays the learning rate.
_C.SOLVER.LR_DECAY_STAGES = [150, 180, 210]
_C.SOLVER.LR_DECAY_RATE = 0.1
_C.SOLVER.WEIGHT_DECAY = 0.0001
_C.SOLVER.MOMENTUM = 0.9
# Optimizer of the student and the method's modules: SGD | Adam | AdamW
_C.SOLVER.TYPE = "SGD"
# Mixed precision: none | bf16 | fp16 (fp16 needs CUDA; uses a GradScaler).
_C.SOLVER.AMP = "none"
# Train in the channels_last memory format.
_C.SOLVER.CHANNELS_LAST = False
# torch.compile the student and the teacher.
_C.SOLVER.COMPILE = False
# Convert BatchNorm to SyncBatchNorm in distributed runs.
_C.SOLVER.SYNC_BN = False
# Deterministic algorithms, so two runs with one seed give identical losses.
_C.SOLVER.DETERMINISTIC = False
# How many steps with a non-finite loss may be skipped before the run stops
# (0: stop at the first one).
_C.SOLVER.SKIP_NONFINITE_STEPS = 0
# The modern recipe (engine/recipe.py, engine/schedule.py, engine/update_rules.py).
# Label smoothing of the task loss's targets (0: off; timm's recipes 0.1).
_C.SOLVER.LABEL_SMOOTHING = 0.0
# Linear warm-up: the schedule's rate times epoch / WARMUP_EPOCHS over the final
# stage's first WARMUP_EPOCHS epochs (0: off).
_C.SOLVER.WARMUP_EPOCHS = 0
# Warm up per optimizer step instead of per epoch.
_C.SOLVER.WARMUP_PER_ITER = False
# Clip the gradients' global norm to this value (0: off); refused with DOT.
_C.SOLVER.CLIP_GRAD = 0.0
# No weight decay on 1-d parameters (norms' weights, biases), as timm's
# param_groups_weight_decay.
_C.SOLVER.NO_DECAY_NORM_BIAS = False
# An exponential moving average of the student's weights (timm's ModelEmaV3),
# updated after each accepted step and evaluated beside it every epoch.
_C.SOLVER.EMA = CN()
_C.SOLVER.EMA.ENABLE = False
# Its decay per step (timm's default for ImageNet recipes).
_C.SOLVER.EMA.DECAY = 0.9998
# timm's decay warm-up: 1 - (1 + step) ** (-2/3), capped at DECAY.
_C.SOLVER.EMA.WARMUP = False

# -------------------------------------------------------------------- device
# auto (CUDA when available) | cpu | cuda | cuda:N
_C.DEVICE = "auto"

# ----------------------------------------------------------------------- log
_C.LOG = CN()
# Log per-iteration losses every this many steps.
_C.LOG.TENSORBOARD_FREQ = 500
# When stderr is not a terminal (SLURM, nohup, redirected logs) and so shows no
# progress bar, print a progress line (step, loss, lr, images/s) every this many
# steps; 0: never. Not in mdistiller (RepDistiller's --print_freq, default 100).
_C.LOG.PRINT_FREQ = 100
# Keep an epoch_<N> checkpoint every this many epochs.
_C.LOG.SAVE_CHECKPOINT_FREQ = 40
# Also write the resumable checkpoint every this many iterations (0: off).
_C.LOG.SAVE_EVERY_N_ITERS = 0
# Root folder of all runs.
_C.LOG.PREFIX = "./output"
# Also log to Weights & Biases (a warning when wandb is not installed).
_C.LOG.WANDB = False

# ----------------------------------------------------------------- methods
# Vanilla knowledge distillation (Hinton et al. 2015).
_C.KD = CN()
_C.KD.TEMPERATURE = 4.0
_C.KD.LOSS = CN()
_C.KD.LOSS.CE_WEIGHT = 0.1
_C.KD.LOSS.KD_WEIGHT = 0.9
# Logit standardization (Sun et al. 2024): KD on per-sample z-scores of both
# models' logits; TEMPERATURE is then the base temperature (the authors: 2 or
# 3) and LOSS.KD_WEIGHT 9.
_C.KD.LOGIT_STAND = False

# FitNets hints (Romero et al. 2015).
_C.FITNET = CN()
# Index into feats["feats"] used as the hint.
_C.FITNET.HINT_LAYER = 2
# Kept for mdistiller's YAML files; shapes are probed from the models.
_C.FITNET.INPUT_SIZE = (32, 32)
_C.FITNET.LOSS = CN()
_C.FITNET.LOSS.CE_WEIGHT = 1.0
_C.FITNET.LOSS.FEAT_WEIGHT = 100.0

# Attention transfer (Zagoruyko & Komodakis 2017).
_C.AT = CN()
_C.AT.P = 2
_C.AT.LOSS = CN()
_C.AT.LOSS.CE_WEIGHT = 1.0
_C.AT.LOSS.FEAT_WEIGHT = 1000.0

# Relational KD (Park et al. 2019).
_C.RKD = CN()
_C.RKD.DISTANCE_WEIGHT = 25.0
_C.RKD.ANGLE_WEIGHT = 50.0
_C.RKD.LOSS = CN()
_C.RKD.LOSS.CE_WEIGHT = 1.0
_C.RKD.LOSS.FEAT_WEIGHT = 1.0
_C.RKD.PDIST = CN()
_C.RKD.PDIST.EPSILON = 1e-12
_C.RKD.PDIST.SQUARED = False

# Contrastive representation distillation (Tian et al. 2020).
_C.CRD = CN()
# exact: the positive is the sample itself; relax: a same-class sample.
_C.CRD.MODE = "exact"
_C.CRD.FEAT = CN()
# Embedding width.
_C.CRD.FEAT.DIM = 128
# Input widths; ignored (probed from the models' pooled features), kept so
# mdistiller's YAML files load.
_C.CRD.FEAT.STUDENT_DIM = 256
_C.CRD.FEAT.TEACHER_DIM = 256
_C.CRD.LOSS = CN()
_C.CRD.LOSS.CE_WEIGHT = 1.0
_C.CRD.LOSS.FEAT_WEIGHT = 0.8
_C.CRD.NCE = CN()
# Negatives per sample.
_C.CRD.NCE.K = 16384
# Momentum of the memory-bank update.
_C.CRD.NCE.MOMENTUM = 0.5
_C.CRD.NCE.TEMPERATURE = 0.07

# Adversarial KD: a discriminator tells teacher logits from student logits.
_C.ADVKD = CN()
_C.ADVKD.TEMPERATURE = 4.0
_C.ADVKD.LOSS = CN()
_C.ADVKD.LOSS.CE_WEIGHT = 0.1
_C.ADVKD.LOSS.KD_WEIGHT = 0.9
# Weight of the student's adversarial loss after warm-up.
_C.ADVKD.LOSS.ADV_WEIGHT = 0.5
# The adversarial weight ramps linearly from 0 over this many epochs.
_C.ADVKD.ADV_WARMUP_EPOCHS = 20
# What the discriminator sees: logits | probs | feature (pooled feature
# through a linear adapter to the number of classes).
_C.ADVKD.INPUT = "logits"
# bce | lsgan | hinge
_C.ADVKD.GAN_LOSS = "bce"
# Discriminator steps per student step.
_C.ADVKD.D_STEPS = 1
# Target for "real" in the discriminator loss (< 1: one-sided smoothing).
_C.ADVKD.REAL_LABEL = 1.0
_C.ADVKD.DISC = CN()
_C.ADVKD.DISC.HIDDEN = [256, 128]
_C.ADVKD.DISC.SPECTRAL_NORM = False
_C.ADVKD.DISC_OPT = CN()
_C.ADVKD.DISC_OPT.LR = 1e-4
_C.ADVKD.DISC_OPT.BETAS = (0.5, 0.999)
_C.ADVKD.DISC_OPT.WEIGHT_DECAY = 0.0

# Decoupled KD (Zhao et al. 2022): KD split into target-class (TCKD) and
# non-target-class (NCKD) terms.
_C.DKD = CN()
_C.DKD.CE_WEIGHT = 1.0
# Weight of TCKD.
_C.DKD.ALPHA = 1.0
# Weight of NCKD (mdistiller's per-pair values are in configs/cifar100/dkd/).
_C.DKD.BETA = 8.0
# Softmax temperature; both terms are scaled by T^2.
_C.DKD.T = 4.0
# The DKD loss ramps up linearly over this many epochs.
_C.DKD.WARMUP = 20
# Logit standardization (Sun et al. 2024): DKD on per-sample z-scores of the
# logits; T is then the base temperature and ALPHA, BETA include the KD weight
# (the authors multiply both by it, e.g. 9 and 9 * 8).
_C.DKD.LOGIT_STAND = False

# Knowledge review (Chen et al. 2021): attention-based fusion of the student's
# levels, hierarchical context loss against the teacher's. Defaults fit
# resnet32x4 -> resnet8x4; the lists are checked against the models.
_C.REVIEWKD = CN()
_C.REVIEWKD.CE_WEIGHT = 1.0
_C.REVIEWKD.REVIEWKD_WEIGHT = 1.0
# The review loss ramps up linearly over this many epochs.
_C.REVIEWKD.WARMUP_EPOCHS = 20
# Sizes of the student's levels, deepest (the pooled feature, 1) first.
_C.REVIEWKD.SHAPES = [1, 8, 16, 32]
# Sizes of the teacher's levels they are compared with, deepest first.
_C.REVIEWKD.OUT_SHAPES = [1, 8, 16, 32]
# Channels of the student's levels, shallowest first (the pooled width last).
_C.REVIEWKD.IN_CHANNELS = [64, 128, 256, 256]
# Channels of the teacher's levels, shallowest first.
_C.REVIEWKD.OUT_CHANNELS = [64, 128, 256, 256]
# Width of the fused maps: min(MAX_MID_CHANNEL, IN_CHANNELS[-1]).
_C.REVIEWKD.MAX_MID_CHANNEL = 512
# Fuse the student's pre-ReLU maps (preact_feats) instead of feats.
_C.REVIEWKD.STU_PREACT = False

# Overhaul of feature distillation (Heo et al. 2019): partial L2 between a
# connector on the student's pre-ReLU maps and the teacher's, with margins
# from the teacher's BN statistics.
_C.OFD = CN()
_C.OFD.LOSS = CN()
_C.OFD.LOSS.CE_WEIGHT = 1.0
_C.OFD.LOSS.FEAT_WEIGHT = 0.001
_C.OFD.CONNECTOR = CN()
# Kernel size of the connectors' convolution.
_C.OFD.CONNECTOR.KERNEL_SIZE = 1
# The statistics the teacher's BatchNorms normalise with: "batch" (the batch's,
# as the authors' code and mdistiller run the teacher, in train mode; its running
# statistics stay untouched) or "eval" (its running statistics).
_C.OFD.TEACHER_BN = "batch"

# Neuron selectivity transfer (Huang & Wang 2017): polynomial-kernel MMD per stage.
_C.NST = CN()
_C.NST.LOSS = CN()
_C.NST.LOSS.CE_WEIGHT = 1.0
_C.NST.LOSS.FEAT_WEIGHT = 50.0

# Probabilistic knowledge transfer (Passalis & Tefas 2018) on pooled features.
_C.PKT = CN()
_C.PKT.LOSS = CN()
_C.PKT.LOSS.CE_WEIGHT = 1.0
_C.PKT.LOSS.FEAT_WEIGHT = 30000.0

# Similarity-preserving KD (Tung & Mori 2019) on the last feature map.
_C.SP = CN()
_C.SP.LOSS = CN()
_C.SP.LOSS.CE_WEIGHT = 1.0
_C.SP.LOSS.FEAT_WEIGHT = 3000.0

# SVD-based self-supervised KD (Lee et al. 2018).
_C.KDSVD = CN()
# Singular vectors of the teacher transferred per stage.
_C.KDSVD.K = 1
_C.KDSVD.LOSS = CN()
_C.KDSVD.LOSS.CE_WEIGHT = 1.0
_C.KDSVD.LOSS.FEAT_WEIGHT = 1.0

# Variational information distillation (Ahn et al. 2019).
_C.VID = CN()
_C.VID.LOSS = CN()
_C.VID.LOSS.CE_WEIGHT = 1.0
_C.VID.LOSS.FEAT_WEIGHT = 1.0
# Floor added to the learned per-channel variances.
_C.VID.EPS = 1e-5
# The variances' initial value.
_C.VID.INIT_PRED_VAR = 5.0
# Kept for mdistiller's YAML files; shapes are probed from the models.
_C.VID.INPUT_SIZE = (32, 32)

# DIST (Huang et al. 2022): Pearson-correlation relations of the predictions,
# per sample (inter-class) and per class (intra-class). Defaults: the
# authors' CIFAR-100 setting (their ImageNet setting is TAU 1).
_C.DIST = CN()
# Softmax temperature; the loss is scaled by TAU^2.
_C.DIST.TAU = 4.0
# Weight of the inter-class (per-sample) relation term.
_C.DIST.BETA = 1.0
# Weight of the intra-class (per-class) relation term.
_C.DIST.GAMMA = 1.0
_C.DIST.LOSS = CN()
_C.DIST.LOSS.CE_WEIGHT = 1.0
_C.DIST.LOSS.KD_WEIGHT = 2.0

# NKD (Yang et al. 2023): the teacher's target probability as a soft target,
# plus the renormalised non-target distributions. Defaults: the authors' nkd.py.
_C.NKD = CN()
# Temperature of the non-target term (scaled by TEMPERATURE^2).
_C.NKD.TEMPERATURE = 1.0
# Weight of the non-target term.
_C.NKD.GAMMA = 1.5
_C.NKD.LOSS = CN()
_C.NKD.LOSS.CE_WEIGHT = 1.0
# Multiplies both NKD terms (the authors add them unweighted).
_C.NKD.LOSS.KD_WEIGHT = 1.0

# CTKD (Li et al. 2023): KD at a learnable global temperature
# T = T_START + T_END * sigmoid(theta), trained through a gradient-reversal
# layer whose strength rises by cosine from 0 to MAX_LAMBDA over the first
# LAMBDA_EPOCHS epochs. Defaults: the authors' CIFAR-100 script.
_C.CTKD = CN()
_C.CTKD.T_START = 1.0
_C.CTKD.T_END = 20.0
_C.CTKD.MAX_LAMBDA = 1.0
_C.CTKD.LAMBDA_EPOCHS = 10
_C.CTKD.LOSS = CN()
_C.CTKD.LOSS.CE_WEIGHT = 0.1
_C.CTKD.LOSS.KD_WEIGHT = 0.9

# MLKD (Jin et al. 2023): KD at five temperatures on a weak and a strong
# (RandAugment + Cutout) view, plus batch- and class-level prediction
# correlations, as the authors' KD_ours.py. Defaults: their cfg.py (KD.*).
_C.MLKD = CN()
# The first of the temperatures (T, 3, 5, 2, 6); with LOGIT_STAND the base temperature.
_C.MLKD.TEMPERATURE = 4.0
_C.MLKD.LOSS = CN()
# Weight of each view's cross-entropy.
_C.MLKD.LOSS.CE_WEIGHT = 0.1
# Weight of every distillation term (with LOGIT_STAND the authors use 9 or 6).
_C.MLKD.LOSS.KD_WEIGHT = 0.9
# Logit standardization (Sun et al. 2024) of the KD terms' logits.
_C.MLKD.LOGIT_STAND = False
# RandAugment ops applied to each image of the strong view.
_C.MLKD.AUGMENT_OPS = 2

# CC (Peng et al. 2019) as RepDistiller benchmarks it: linear embeddings of
# both pooled features, products of neighbouring samples' embedding gaps.
_C.CC = CN()
# Width of the two embeddings.
_C.CC.FEAT_DIM = 128
_C.CC.LOSS = CN()
_C.CC.LOSS.CE_WEIGHT = 1.0
_C.CC.LOSS.FEAT_WEIGHT = 0.02

# RepDistiller's two-stage methods: an initialisation stage of INIT_EPOCHS
# (RepDistiller's --init_epochs 30) at a constant learning rate, then
# SOLVER.EPOCHS of distillation.
# FSP (Yim et al. 2017): the init stage matches the teachers' FSP matrices
# (stem and stages; equal channels needed), then cross-entropy alone.
_C.FSP = CN()
_C.FSP.INIT_EPOCHS = 30
_C.FSP.LOSS = CN()
_C.FSP.LOSS.CE_WEIGHT = 1.0
# AB (Heo et al. 2019): the init stage trains the student and per-stage
# connectors on the activation-boundary loss, then cross-entropy alone.
_C.AB = CN()
_C.AB.INIT_EPOCHS = 30
# Margin of the boundary loss.
_C.AB.MARGIN = 1.0
_C.AB.LOSS = CN()
_C.AB.LOSS.CE_WEIGHT = 1.0
# FT (Kim et al. 2018): the init stage trains a paraphraser of the teacher's
# last map, then the student and a translator learn its factors.
_C.FT = CN()
_C.FT.INIT_EPOCHS = 30
# The init stage's learning rate: RepDistiller uses 0.01 for ResNet and WRN
# students and SOLVER.LR for the others.
_C.FT.INIT_LR = 0.01
# The factors' share of the teacher's channels (k).
_C.FT.RATE = 0.5
_C.FT.LOSS = CN()
_C.FT.LOSS.CE_WEIGHT = 1.0
_C.FT.LOSS.FEAT_WEIGHT = 200.0

# WTTM (Zheng & Yang, ICLR 2024; zkxufo/TTM distiller_zoo/wttm.py): KL from the
# teacher's power-transformed prediction p_t^GAMMA / U (U = sum_j p_t^GAMMA) to
# the student's plain softmax, each sample weighted by U. Defaults: the one WTTM
# setting the authors' README shows (--ttm_l 0.2 with weight 4, added to CRD);
# their per-pair values are in the paper's appendix A.4, not in the repository.
_C.WTTM = CN()
# The power gamma (the authors' --ttm_l; KD's 1 / T).
_C.WTTM.GAMMA = 0.2
_C.WTTM.LOSS = CN()
# Weight of the cross-entropy (the authors' -r).
_C.WTTM.LOSS.CE_WEIGHT = 1.0
# Weight of the WTTM term (-b, or -a when added to another loss).
_C.WTTM.LOSS.KD_WEIGHT = 4.0

# WKD (Lv et al., NeurIPS 2024; JiamingLv/WKD). WKD-L: NKD's target term plus the
# discrete Wasserstein distance (Sinkhorn) between the non-target class
# distributions at TEMPERATURE over a class-to-class cost. WKD-F: the Wasserstein
# distance between diagonal Gaussians (per-channel mean and std, per grid cell)
# of the projected student map and the teacher's. Defaults: the authors' cfg.py.
_C.WKD = CN()
_C.WKD.LOSS = CN()
_C.WKD.LOSS.CE_WEIGHT = 1.0
# Weight of WKD-L's Wasserstein term (0: WKD-L off and the teacher's logits unread).
_C.WKD.LOSS.WKD_LOGIT_WEIGHT = 1.0
# Weight of WKD-F (0: off, no projector, the teacher's maps unread).
_C.WKD.LOSS.WKD_FEAT_WEIGHT = 1.0
# Both weights decay by cosine to 0 between this epoch and SOLVER.EPOCHS (the
# authors' default 0 decays over the whole run; >= SOLVER.EPOCHS: never).
_C.WKD.LOSS.COSINE_DECAY_EPOCH = 0
# Softmax temperature of the Wasserstein term (its target term is at 1).
_C.WKD.TEMPERATURE = 4.0
# The cost between classes: fc, 1 - cosine similarity of the teacher's classifier
# rows (the authors' "fc" option), computed once per teacher and kept beside its
# checkpoint. Their published configs use linear-CKA costs of the teacher's
# features over the training set, which mdistill does not compute.
_C.WKD.COST_MATRIX = "fc"
# The cost C becomes 1 - exp(-SHARPEN * C) (0: unchanged).
_C.WKD.COST_MATRIX_SHARPEN = 1.0
_C.WKD.SINKHORN = CN()
# Entropic regularisation: the kernel is exp(-C / LAMBDA).
_C.WKD.SINKHORN.LAMBDA = 0.05
_C.WKD.SINKHORN.ITER = 10
# Added to the variances before their square root (WKD-F).
_C.WKD.EPS = 0.00001
# Index into feats["feats"] of both models' map for WKD-F (the authors' cfg says
# 4, ImageNet ResNets' last map; their CIFAR configs -1, the same map there).
_C.WKD.HINT_LAYER = -1
# Weight of the means' term against the standard deviations' term (WKD-F).
_C.WKD.MEAN_COV_RATIO = 2.0
# WKD-F fits one Gaussian per cell of a SPATIAL_GRID x SPATIAL_GRID grid.
_C.WKD.SPATIAL_GRID = 4

# SDD (Wei et al., CVPR 2024; shicaiwei123/SDD-CVPR2024): a switch on KD, DKD and
# NKD. The last pre-pool map of both models is average-pooled to M x M cells for
# each M in SCALES; every cell goes through the model's own classifier and the
# method's loss is averaged over all cells, complementary ones weighted.
_C.SDD = CN()
# Apply SDD to DISTILLER.TYPE KD, DKD or NKD (SD-KD, SD-DKD, SD-NKD).
_C.SDD.ENABLE = False
# Grid sizes (the authors' --M), starting with 1, the global region: [1, 2]
# for teacher and student of one family, [1, 2, 4] across families.
_C.SDD.SCALES = [1, 2]
# Weight of a complementary region (the teacher right on it but wrong globally,
# or the reverse); the others weigh 1 (2 in the authors' code).
_C.SDD.COMPLEMENTARY_WEIGHT = 2.0
# NKD's warm-up: both NKD terms ramp up over this many epochs (0: none, as NKD's
# authors; SD-NKD's authors use 20, their DKD.WARMUP).
_C.NKD.WARMUP = 0

# CAT-KD (Guo et al., CVPR 2023; GzyAftermath/CAT-KD CAT_KD.py): class activation
# maps (the classifier's weights as a 1x1 conv, no bias, on the last pre-pool
# map), average-pooled to CAM_RESOLUTION, MSE between student and teacher.
# Defaults: the authors' cfg.py; per-pair beta in configs/cifar100/catkd/.
_C.CAT_KD = CN()
# L2-normalise each pooled map over its cells before the MSE.
_C.CAT_KD.IF_NORMALIZE = True
_C.CAT_KD.LOSS = CN()
_C.CAT_KD.LOSS.CE_WEIGHT = 1.0
# beta, the weight of the CAT loss.
_C.CAT_KD.LOSS.CAT_loss_weight = 400.0
# Side of the pooled class activation maps.
_C.CAT_KD.LOSS.CAM_RESOLUTION = 2

# ICKD (Liu et al., ICCV 2021; ADLab-AutoDrive/ICKD Cifar100/, torchdistill's
# ChSimLoss): the student's last map through a 1x1 conv + BN to the teacher's
# width; per sample, the channel Gram matrices' rows are L2-normalised and their
# squared difference summed, divided by channels x batch. Defaults: the authors'
# CIFAR-100 README ("ICKD-C (Ours)": -r 1 -a 1 -b 2.5, kd_T 4).
_C.ICKD = CN()
# Temperature of the KD term.
_C.ICKD.TEMPERATURE = 4.0
_C.ICKD.LOSS = CN()
_C.ICKD.LOSS.CE_WEIGHT = 1.0
# Weight of the inter-channel correlation term (-b).
_C.ICKD.LOSS.FEAT_WEIGHT = 2.5
# Weight of KD (-a; 0 is the README's "ICKD-C (w/o KL)", the teacher's logits unread).
_C.ICKD.LOSS.KD_WEIGHT = 1.0

# OFA-KD (Hao et al. 2023; Hao840/OFAKD train.py's --ofa-* and --*-loss-weight
# defaults): branches from student stages into the logit space, and the loss
# -sum((p_t + 1_y)^EPS - 1_y) log p_s against the teacher's logits.
_C.OFA = CN()
# Student stages with a branch, numbered from 1 over its maps besides the stem;
# [] is every one (the authors' 1 2 3 4 on their four-stage students).
_C.OFA.STAGES = []
# Target-enhancement exponent (1: plain soft targets; the authors' README runs
# DeiT-T -> ResNet18 with 1.5).
_C.OFA.EPS = 1.0
# Softmax temperature of the OFA loss (not multiplied back as T^2).
_C.OFA.TEMPERATURE = 1.0
# Weight of the branches' OFA losses, summed over branches.
_C.OFA.LOSS_WEIGHT = 1.0
# Weight of the cross-entropy on the labels.
_C.OFA.CE_WEIGHT = 1.0
# Weight of the OFA loss on the student's own logits.
_C.OFA.KD_WEIGHT = 1.0

# DeiT (Touvron et al. 2021; facebookresearch/deit): a student with a
# distillation token; loss (1 - ALPHA) CE(class head) + ALPHA distillation(head
# of the token); evaluated on the mean of the two heads.
_C.DEIT = CN()
# hard: CE against the teacher's argmax (the authors' best); soft: KL at TAU.
_C.DEIT.MODE = "hard"
# Weight of the distillation head's loss.
_C.DEIT.ALPHA = 0.5
# Temperature of the soft mode.
_C.DEIT.TAU = 1.0

# --- methods since 2023: WTTM, WKD, SDD, CAT-KD, ICKD (sections above this line)

# CRLD (Zhang et al. 2024): within-view and cross-view KD on a weak and a strong
# (RandAugment + Cutout) view, masked by the teacher's confidence, plus both
# views' cross-entropy. Defaults: the authors' cfg.py (CRLD.*).
_C.CRLD = CN()
# Weight of each view's cross-entropy.
_C.CRLD.CE_WEIGHT = 1.0
# Weight of the within-view KD terms (student weak/strong vs teacher weak/strong).
_C.CRLD.WV_WEIGHT = 2.0
# Weight of the cross-view KD terms (student strong vs teacher weak and the reverse).
_C.CRLD.CV_WEIGHT = 0.5
# Softmax temperature of every KD term (scaled by TEMPERATURE^2).
_C.CRLD.TEMPERATURE = 4.0
# A sample counts in the within-view terms when the teacher's top probability
# on the weak view is at least TAU_W ...
_C.CRLD.TAU_W = 0.9
# ... and in the cross-view terms when it is at least TAU_S on the strong view.
_C.CRLD.TAU_S = 0.2
# RandAugment ops applied to each image of the strong view (the authors' RandAugment(2, 10)).
_C.CRLD.AUGMENT_OPS = 2

# DIST+ (Huang et al. 2025) as torchdistill's DISTPlusLoss: DIST's logit
# relations plus channel and spatial relations of the last stage maps (equal
# shapes needed). Defaults: torchdistill's sample config (ImageNet r34 -> r18).
_C.DISTPLUS = CN()
# Softmax temperature of the logit terms (scaled by TAU^2).
_C.DISTPLUS.TAU = 1.0
# Weight of the inter-class (per-sample) logit relation.
_C.DISTPLUS.BETA = 2.0
# Weight of the intra-class (per-class) logit relation.
_C.DISTPLUS.GAMMA = 2.0
# Weight of the channel relation of the last maps (0: off).
_C.DISTPLUS.IOTA = 1.0
# Weight of the spatial relation of the last maps (0: off).
_C.DISTPLUS.KAPPA = 1.0
_C.DISTPLUS.LOSS = CN()
_C.DISTPLUS.LOSS.CE_WEIGHT = 1.0
# Multiplies every DIST+ term.
_C.DISTPLUS.LOSS.KD_WEIGHT = 2.0

# SRD (Miles & Mikolajczyk 2024): a linear projector on the student's pooled
# feature, log of the summed |difference|^EXPONENT of the batch-standardized
# projected student and teacher features, plus KD. Defaults: the authors'
# ImageNet code.
_C.SRD = CN()
# Softmax temperature of the KD term (scaled by TEMPERATURE^2).
_C.SRD.TEMPERATURE = 1.0
# Power of the feature distance.
_C.SRD.EXPONENT = 4.0
# Variance floor of the batch standardization (the authors' BatchNorm1d eps).
_C.SRD.EPS = 1e-4
_C.SRD.LOSS = CN()
_C.SRD.LOSS.CE_WEIGHT = 1.0
_C.SRD.LOSS.KD_WEIGHT = 1.0
_C.SRD.LOSS.FEAT_WEIGHT = 2.0

# SKD (Jeong et al. 2026) as torchdistill's SKDInstanceLoss and SKDDirectionLoss:
# KL at TEMPERATURE (no T^2) and the Mahalanobis norm of the difference of the
# logits' Gram matrices. Defaults: torchdistill's (sample config ImageNet r34 -> r18).
_C.SKD = CN()
# Softmax temperature of the instance term.
_C.SKD.TEMPERATURE = 4.0
# Tikhonov factor added to the direction term's covariance diagonal.
_C.SKD.TIKHONOV = 0.1
_C.SKD.LOSS = CN()
# torchdistill's sample config trains without the labels.
_C.SKD.LOSS.CE_WEIGHT = 0.0
_C.SKD.LOSS.INSTANCE_WEIGHT = 1.0
_C.SKD.LOSS.DIRECTION_WEIGHT = 1.0

# --- methods since 2023: CRLD, DIST+, SRD, SKD (sections above this line)


def get_cfg():
    """Return a fresh, mutable copy of the defaults."""
    return _C.clone()
