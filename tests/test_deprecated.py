"""Deprecated config keys (``rayssl.config.DEPRECATED``): an old name keeps working for one
release under its new name, with one notice; old and new together are an error."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from rayssl.config import DEPRECATED, Config, ConfigError, DeprecatedKeyWarning, load_config

NOTICE = "eval.centre is deprecated: use eval.center (eval.centre will be removed in the next release)"


def notices(call) -> tuple[object, list[str]]:
    """``call()``'s result and the messages of the deprecation notices it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, DeprecatedKeyWarning)]


def test_the_old_centre_key_maps_to_center() -> None:
    assert DEPRECATED["eval.centre"] == "eval.center"
    assert "center" in Config.model_fields["eval"].annotation.model_fields
    assert "centre" not in Config.model_fields["eval"].annotation.model_fields


def test_old_key_in_yaml_gives_the_new_config_with_one_notice(tmp_path: Path) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text("eval:\n  centre: false\n  knn_k: 5\n")
    new.write_text("eval:\n  center: false\n  knn_k: 5\n")
    cfg, seen = notices(lambda: load_config(old))
    assert seen == [NOTICE]
    assert cfg == load_config(new) and cfg.eval.center is False
    assert "eval.center" in cfg.flat() and "eval.centre" not in cfg.flat()  # the MLflow param's name


def test_old_key_as_override_gives_the_new_config_with_one_notice() -> None:
    cfg, seen = notices(lambda: load_config(None, ["eval.centre=false", "eval.centre=false"]))
    assert seen == [NOTICE]
    assert cfg == load_config(None, ["eval.center=false"]) and cfg.eval.center is False
    _, seen = notices(lambda: load_config(None, ["eval.center=false"]))
    assert seen == []


def test_old_key_in_a_stored_config_is_read(tmp_path: Path) -> None:
    # an older run's checkpoint holds its config as a mapping with the old name
    stored = Config().model_dump(mode="json")
    del stored["eval"]["center"]
    stored["eval"]["centre"] = False
    cfg, seen = notices(lambda: load_config(None, ["eval.knn_k=7"], base=stored))
    assert seen == [NOTICE] and cfg.eval.center is False and cfg.eval.knn_k == 7
    cfg, seen = notices(lambda: Config.model_validate(stored))
    assert seen == [NOTICE] and cfg.eval.center is False
    assert "centre" in stored["eval"]  # the caller's mapping is left as it was


def test_a_later_override_wins_over_the_file_under_either_name(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  centre: false\n")
    assert notices(lambda: load_config(path, ["eval.center=true"]))[0].eval.center is True
    path.write_text("eval:\n  center: false\n")
    assert notices(lambda: load_config(path, ["eval.centre=true"]))[0].eval.center is True


@pytest.mark.parametrize("overrides", [["eval.centre=false", "eval.center=true"],
                                       ["eval.center=true", "eval.centre=false"]])
def test_old_and_new_key_together_is_one_line_error(overrides: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "eval.centre" in message and "eval.center" in message and "\n" not in message


def test_old_and_new_key_in_one_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("eval:\n  centre: false\n  center: true\n")
    with pytest.raises(ConfigError, match=r"^eval.centre and eval.center are both set") as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_other_typos_are_still_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"^eval.centr: unknown key \(did you mean eval.center\?\)$"):
        load_config(None, ["eval.centr=false"])
    with pytest.raises(ConfigError, match=r"^eval.knn_kk: unknown key"):
        load_config(None, ["eval.knn_kk=5"])


def test_old_key_in_a_sweep_space_searches_the_new_one() -> None:
    from rayssl.tune import check_space

    base = Config().model_dump(mode="json", round_trip=True)
    space, seen = notices(lambda: check_space({"eval.centre": {"choice": [True, False]}}, base))
    assert space == {"eval.center": ("choice", [True, False])} and seen == [NOTICE]
    with pytest.raises(ConfigError, match=r"^space.eval.centre and space.eval.center are both set"):
        check_space({"eval.centre": {"choice": [True]}, "eval.center": {"choice": [False]}}, base)


TEST_LIMIT_NOTICE = ("data.test_limit is deprecated: use data.eval_limit "
                     "(data.test_limit will be removed in the next release)")


def test_the_old_test_limit_key_maps_to_eval_limit() -> None:
    assert DEPRECATED["data.test_limit"] == "data.eval_limit"
    fields = Config.model_fields["data"].annotation.model_fields
    assert "eval_limit" in fields and "test_limit" not in fields


def test_old_test_limit_is_read_with_one_notice(tmp_path: Path) -> None:
    cfg, seen = notices(lambda: load_config(None, ["data.test_limit=256", "data.test_limit=256"]))
    assert seen == [TEST_LIMIT_NOTICE] and cfg == load_config(None, ["data.eval_limit=256"])
    assert cfg.data.eval_limit == 256
    assert "data.eval_limit" in cfg.flat() and "data.test_limit" not in cfg.flat()  # the MLflow param's name
    path = tmp_path / "old.yaml"
    path.write_text("data:\n  test_limit: 100\n")
    cfg, seen = notices(lambda: load_config(path))
    assert seen == [TEST_LIMIT_NOTICE] and cfg.data.eval_limit == 100
    stored = Config().model_dump(mode="json")  # an older run's checkpoint config
    del stored["data"]["eval_limit"]
    stored["data"]["test_limit"] = 64
    cfg, seen = notices(lambda: Config.model_validate(stored))
    assert seen == [TEST_LIMIT_NOTICE] and cfg.data.eval_limit == 64
    _, seen = notices(lambda: load_config(None, ["data.eval_limit=256"]))
    assert seen == []


@pytest.mark.parametrize("overrides", [["data.test_limit=256", "data.eval_limit=128"],
                                       ["data.eval_limit=128", "data.test_limit=256"]])
def test_old_and_new_limit_together_is_one_line_error(overrides: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "data.test_limit" in message and "data.eval_limit" in message and "\n" not in message
    path = tmp_path / "both.yaml"
    path.write_text("data:\n  test_limit: 256\n  eval_limit: 128\n")
    with pytest.raises(ConfigError, match=r"^data.test_limit and data.eval_limit are both set"):
        load_config(path)


def test_old_test_limit_in_a_sweep_space_searches_eval_limit() -> None:
    from rayssl.tune import check_space

    base = Config().model_dump(mode="json", round_trip=True)
    space, seen = notices(lambda: check_space({"data.test_limit": {"choice": [100, 200]}}, base))
    assert space == {"data.eval_limit": ("choice", [100, 200])} and seen == [TEST_LIMIT_NOTICE]
