"""Config: defaults, YAML merging, _BASE_, overrides and the errors users see."""
import pytest

from mdistill.config import (config_differences, default_run_name, get_cfg, load_cfg,
                             parse_overrides)
from mdistill.errors import UserError

MDISTILLER_KD_YAML = """
EXPERIMENT:
  NAME: ""
  TAG: "kd,res32x4,res8x4"
  PROJECT: "cifar100_baselines"
DISTILLER:
  TYPE: "KD"
  TEACHER: "resnet32x4"
  STUDENT: "resnet8x4"
SOLVER:
  BATCH_SIZE: 64
  EPOCHS: 240
  LR: 0.05
  LR_DECAY_STAGES: [150, 180, 210]
  LR_DECAY_RATE: 0.1
  WEIGHT_DECAY: 0.0005
  MOMENTUM: 0.9
  TYPE: "SGD"
KD:
  TEMPERATURE: 4
  LOSS:
    CE_WEIGHT: 0.1
    KD_WEIGHT: 0.9
"""


def write(path, text):
    path.write_text(text)
    return str(path)


def test_get_cfg_returns_independent_copies():
    first = get_cfg()
    first.SOLVER.LR = 123.0
    assert get_cfg().SOLVER.LR == 0.05


def test_mdistiller_yaml_loads_unchanged(tmp_path):
    cfg = load_cfg(write(tmp_path / "kd.yaml", MDISTILLER_KD_YAML))
    assert cfg.DISTILLER.TYPE == "KD"
    assert cfg.SOLVER.WEIGHT_DECAY == 0.0005
    assert cfg.SOLVER.LR_DECAY_STAGES == [150, 180, 210]
    # An integer in YAML for a float key is accepted and kept a float.
    assert cfg.KD.TEMPERATURE == 4.0 and isinstance(cfg.KD.TEMPERATURE, float)
    assert cfg.is_frozen()


def test_base_inheritance_and_cli_overrides(tmp_path):
    write(tmp_path / "base.yaml", "SOLVER:\n  LR: 0.1\n  EPOCHS: 10\nKD:\n  TEMPERATURE: 2\n")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path / "sub" / "child.yaml",
                  "_BASE_: ../base.yaml\nSOLVER:\n  EPOCHS: 20\nDISTILLER:\n  TYPE: KD\n")
    cfg = load_cfg(child, ["SOLVER.LR_DECAY_STAGES", "[5, 8]", "DATASET.DOWNLOAD", "false",
                           "KD.TEMPERATURE", "3.5"])
    assert cfg.SOLVER.LR == 0.1              # from the base
    assert cfg.SOLVER.EPOCHS == 20           # the child wins over its base
    assert cfg.KD.TEMPERATURE == 3.5         # the command line wins over both
    assert cfg.SOLVER.LR_DECAY_STAGES == [5, 8]
    assert cfg.DATASET.DOWNLOAD is False


def test_unknown_key_names_it_and_the_closest_keys(tmp_path):
    path = write(tmp_path / "bad.yaml", "SOLVER:\n  LEARNING_RATE: 0.1\n")
    with pytest.raises(UserError, match=r"unknown config key SOLVER\.LEARNING_RATE; "
                                        r"closest valid keys: SOLVER\.LR_"):
        load_cfg(path)
    with pytest.raises(UserError, match=r"unknown config key KD\.TEMPERTURE.*KD\.TEMPERATURE"):
        load_cfg(None, ["KD.TEMPERTURE", "4"])


def test_wrong_type_is_a_one_line_error():
    with pytest.raises(UserError) as error:
        load_cfg(None, ["SOLVER.EPOCHS", "many"])
    assert str(error.value) == "config key SOLVER.EPOCHS must be an integer (like 240), got 'many'"
    with pytest.raises(UserError, match="SOLVER.LR_DECAY_STAGES"):
        load_cfg(None, ["SOLVER.LR_DECAY_STAGES", "[10, x]"])


def test_choice_values_list_the_valid_ones():
    with pytest.raises(UserError, match=r"SOLVER.AMP: 'fp8'; valid: .*bf16"):
        load_cfg(None, ["SOLVER.AMP", "fp8"])


def test_base_cycle_and_missing_and_invalid_files(tmp_path):
    write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(UserError, match="_BASE_ cycle"):
        load_cfg(str(tmp_path / "a.yaml"))
    with pytest.raises(UserError, match="config file not found: .*nope.yaml"):
        load_cfg(str(tmp_path / "nope.yaml"))
    bad = write(tmp_path / "bad.yaml", "SOLVER:\n  LR: [0.1\n")
    with pytest.raises(UserError, match="bad.yaml line .* is not valid YAML"):
        load_cfg(bad)


def test_odd_override_list_is_an_error():
    with pytest.raises(UserError, match="'SOLVER.LR' has no value"):
        parse_overrides(["SOLVER.LR"])


def test_default_run_name_and_config_differences():
    cfg = load_cfg(None, ["DISTILLER.TYPE", "KD", "DISTILLER.TEACHER", "resnet32x4",
                          "DISTILLER.STUDENT", "resnet8x4", "EXPERIMENT.SEED", "3"])
    assert default_run_name(cfg, ["SOLVER.LR", "0.1", "LOG.PREFIX", "/tmp/x"]) == \
        "kd,resnet32x4,resnet8x4,seed3,LR=0.1"
    # A switch turned on is named with the method, so SD-KD and KD runs differ.
    opts = ["DISTILLER.TYPE", "KD", "SDD.ENABLE", "True"]
    name = default_run_name(load_cfg(None, opts), opts)
    assert name.startswith("kd+sdd,") and "ENABLE" not in name
    other = load_cfg(None, ["DISTILLER.TYPE", "KD", "SOLVER.EPOCHS", "5", "SOLVER.LR", "0.2"])
    assert config_differences(load_cfg(None, ["DISTILLER.TYPE", "KD"]), other) == ["SOLVER.LR"]


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 parses "1e-4" as a string; users write learning rates so.
    cfg = load_cfg(None, ["SOLVER.LR", "1e-4", "SOLVER.WEIGHT_DECAY", "5E-4"])
    assert cfg.SOLVER.LR == 1e-4 and cfg.SOLVER.WEIGHT_DECAY == 5e-4
    path = tmp_path / "lr.yaml"
    path.write_text("SOLVER:\n  LR: 2e-3\n")
    assert load_cfg(str(path)).SOLVER.LR == 2e-3
    with pytest.raises(UserError, match="SOLVER.LR must be a number"):
        load_cfg(None, ["SOLVER.LR", "fast"])
