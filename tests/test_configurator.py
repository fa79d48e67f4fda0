"""configurator.py: config files, then --key=value overrides, each checked against the defaults."""
import pytest

from configurator import configure

DEFAULTS = {"stage": 2, "vision_lr": 5e-6, "compile": False, "dataset": "lmms-lab/LLaVA-ReCap-558K", "stages": []}


def test_config_file_then_overrides(tmp_path):
    config = tmp_path / "stage1.py"
    config.write_text("stage = 1\nvision_lr = 0.0\ndataset = 'coco'\n")
    got = configure(dict(DEFAULTS), [str(config), "--stage=3", "--compile=True", "--dataset=synthetic"])
    assert got == {**DEFAULTS, "stage": 3, "vision_lr": 0.0, "compile": True, "dataset": "synthetic"}


def test_an_override_wins_wherever_it_stands(tmp_path):
    config = tmp_path / "stage1.py"
    config.write_text("stage = 1\n")
    assert configure(dict(DEFAULTS), ["--stage=3", str(config)])["stage"] == 3


def test_an_int_is_accepted_for_a_float_setting():
    got = configure(dict(DEFAULTS), ["--vision_lr=0"])
    assert got["vision_lr"] == 0.0 and isinstance(got["vision_lr"], float)


def test_literals_are_parsed():
    got = configure(dict(DEFAULTS), ["--stages=[{'stage': 0}, {'stage': 1}]"])
    assert got["stages"] == [{"stage": 0}, {"stage": 1}]


def test_a_config_file_may_import_and_compute(tmp_path):
    """Names bound by imports (a module, a constant) are the file's helpers, not settings: no error."""
    config = tmp_path / "stage1.py"
    config.write_text("import os.path\nfrom math import pi\nvision_lr = pi * 1e-6\n"
                      "dataset = os.path.join('data', 'recap')\n")
    settings = configure(dict(DEFAULTS), [str(config)])
    assert settings["vision_lr"] == pytest.approx(3.14159e-6) and settings["dataset"] == "data/recap"
    assert "pi" not in settings and "os" not in settings


def test_unknown_key_is_named():
    with pytest.raises(KeyError, match="unknown setting 'visoin_lr'"):
        configure(dict(DEFAULTS), ["--visoin_lr=1e-5"])


def test_unknown_key_in_a_config_file_is_named(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("micro_bach = 8\n")
    with pytest.raises(KeyError, match=r"bad\.py: unknown setting 'micro_bach'"):
        configure(dict(DEFAULTS), [str(config)])


@pytest.mark.parametrize("override", ["--stage=2.5", "--compile=1", "--stage=True", "--vision_lr=fast", "--stages=3",
                                      "--stage=None"])
def test_wrong_type_is_named(override):
    with pytest.raises(TypeError, match=override[2:].split("=")[0]):
        configure(dict(DEFAULTS), [override])


def test_override_must_have_a_value():
    with pytest.raises(ValueError, match="--key=value"):
        configure(dict(DEFAULTS), ["--stage"])


def test_stage_overrides_are_checked_too():
    from configurator import merged
    assert merged(DEFAULTS, {"stage": 0}, "stages[0]")["stage"] == 0
    with pytest.raises(KeyError, match=r"stages\[1\]: unknown setting 'lr'"):
        merged(DEFAULTS, {"lr": 1.0}, "stages[1]")


def test_an_override_given_as_two_arguments_is_named_not_read_as_a_config_file():
    with pytest.raises(ValueError, match=r"override '--stage' must look like --key=value"):
        configure(dict(DEFAULTS), ["--stage", "3"])
