"""Config: YAML + dotted overrides, one-line errors naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rayssl.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load() -> None:
    for path in (ROOT / "configs").glob("*.yaml"):
        assert isinstance(load_config(path), Config)


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(ROOT / "configs/fashion_mnist.yaml",
                      ["objective.mode=center", "train.epochs=3", "augment.global_crop_scale=[0.3, 1.0]"])
    assert cfg.objective.mode == "center" and cfg.train.epochs == 3.0
    assert cfg.augment.global_crop_scale == (0.3, 1.0)
    assert cfg.flat()["objective.mode"] == "center"


@pytest.mark.parametrize("override, field", [
    ("objective.teacher_temperature=-0.1", "objective.teacher_temperature"),
    ("objective.student_temperature=0", "objective.student_temperature"),
    ("objective.num_clusters=1", "objective.num_clusters"),
    ("objective.mode=dino", "objective.mode"),
    ("scaling.num_workers=0", "scaling.num_workers"),
    ("train.batch_size=-4", "train.batch_size"),
    ("optim.teacher_momentum=1.5", "optim.teacher_momentum"),
    ("augment.local_crop_scale=[0.5, 0.2]", "augment.local_crop_scale"),
    ("model.backbone=vgg", "model.backbone"),
    ("objective.prior_momentum=1", "objective.prior_momentum"),
    ("augment.local_crop_size=32", "augment.local_crop_size"),  # across fields: larger than the global crop
    ("optim.min_lr=0.1", "optim.min_lr"),
    ("data.deterministic=true", "data.deterministic"),  # needs data.decode_on=worker
    ("monitor.patience=0", "monitor.patience"),
    ("train.skip_nonfinite=-1", "train.skip_nonfinite"),
])
def test_invalid_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message


def test_unknown_key_suggests_the_known_one() -> None:
    with pytest.raises(ConfigError, match=r"objective.tempreature: unknown key \(did you mean objective.teacher_temperature\?\)"):
        load_config(None, ["objective.tempreature=0.04"])
    with pytest.raises(ConfigError, match="override 'novalue'"):
        load_config(None, ["novalue"])


def test_bad_yaml_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_job_prints_one_line_error_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/pretrain.py"), "objective.num_clusters=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: objective.num_clusters: Input should be greater than or equal to 2 (got 1)"]


def test_help_carries_tuning_advice() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/pretrain.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "objective.teacher_temperature" in proc.stdout


@pytest.mark.parametrize("given, missing", [("access_key_id", "secret_access_key"),
                                            ("secret_access_key", "access_key_id")])
@pytest.mark.parametrize("options", ["for_data", "for_runs"])
def test_one_s3_key_alone_names_the_missing_one(given: str, missing: str, options: str) -> None:
    from rayssl.data.storage import S3Options

    build = getattr(S3Options, options)
    cfg = load_config(None, [f"data.{given}=s3cr3t-value"])
    with pytest.raises(ConfigError) as err:
        build(cfg.data)
    message = str(err.value)
    assert message.startswith(f"data.{missing}: not set while data.{given} is")
    assert "\n" not in message and "s3cr3t" not in message
    assert not build(load_config(None, []).data).has_keys  # neither: the AWS chain


def test_invalid_secret_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.secret_access_key=12345678"])  # YAML reads an int
    assert str(err.value).startswith("data.secret_access_key:") and "12345678" not in str(err.value)


def test_secrets_in_uris_are_masked() -> None:
    from rayssl.config import mask_uri

    cfg = load_config(None, ["tracking.uri=https://alice:pa55word@mlflow.example.com/?token=t0k3n&x=1",
                             "data.endpoint_url=https://s3.example.com/b?X-Amz-Signature=s1gn&X-Amz-Credential=cr3d"])
    text = str(cfg.redacted()) + str(cfg.flat())
    assert "pa55word" not in text and "t0k3n" not in text and "s1gn" not in text and "cr3d" not in text
    assert cfg.flat()["tracking.uri"] == "https://alice:***@mlflow.example.com/?token=***&x=1"
    assert mask_uri("see http://h/p?monkey=banana") == "see http://h/p?monkey=banana"  # a name like 'key' is not a secret


def test_set_dotted_creates_sections_and_refuses_a_value_on_the_way() -> None:
    from rayssl.config import set_dotted

    data = {"train": {"epochs": 2}}
    set_dotted(data, "train.batch_size", 64)
    set_dotted(data, "objective.mode", "center")
    set_dotted(data, "top", 1)
    assert data == {"train": {"epochs": 2, "batch_size": 64}, "objective": {"mode": "center"}, "top": 1}
    with pytest.raises(ConfigError, match=r"^train\.epochs\.x: epochs is not a section$"):
        set_dotted(data, "train.epochs.x", 1)
    with pytest.raises(ConfigError, match=r"^train\.epochs\.x: epochs is not a section$"):
        load_config(None, ["train.epochs=2", "train.epochs.x=1"])


def test_loading_a_config_does_not_import_torch() -> None:
    code = ("import sys, rayssl.config; rayssl.config.load_config(sys.argv[1], ['objective.mode=center']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs/fashion_mnist.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
