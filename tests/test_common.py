"""common/: the version rules the exporter and the local server share; declared setting bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataclasses import dataclass

from common.configlib import ConfigError, check_bounds, field, parse_config
from common.versions import MAX_VERSION, numeric_versions, version_tuple


def test_version_folders_follow_the_strict_rule(tmp_path):
    for name in ("1", "3", "10", str(MAX_VERSION), str(MAX_VERSION + 1), "01", "007", "\u0663",
                 "-1", "1.0", ".tmp-export-4", "latest"):
        (tmp_path / name).mkdir()
    (tmp_path / "5").write_text("a file, not a version folder")
    assert numeric_versions(tmp_path) == [1, 3, 10, MAX_VERSION]


def test_a_missing_or_non_folder_base_path_holds_no_versions(tmp_path):
    assert numeric_versions(tmp_path / "absent") == []
    (tmp_path / "file").write_text("")
    assert numeric_versions(tmp_path / "file") == []


def test_an_unreadable_base_path_holds_no_versions(tmp_path, monkeypatch):
    base = tmp_path / "base"
    (base / "1").mkdir(parents=True)

    def refuse(self):  # as a folder without read permission answers (root would read it anyway)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", refuse)
    assert numeric_versions(base) == []


def test_version_tuple_reads_major_minor_patch():
    assert version_tuple("2.21.0-rc1") == (2, 21, 0)
    assert version_tuple("12.5") == (12, 5, 0)
    assert version_tuple("2.20.1") < version_tuple("2.21.0")
    for bad in ("", "latest", "12"):
        with pytest.raises(ValueError, match="not a version number"):
            version_tuple(bad)


@dataclass(frozen=True)
class Bounded:
    """Settings that declare their bounds on the field, as every stage's config does."""

    count: int = field(1, "at least one", at_least=1)
    timeout: float = field(5.0, "strictly positive", above=0)
    wait_ms: float = field(2.0, "a window", at_least=0, at_most=1000)
    share: float = field(0.5, "a fraction above zero", above=0, at_most=1)
    limit: int = field(0, "0 = none", at_least=0, bounds_note="0 = none")
    dropout: float = field(0.0, "a fraction below one", at_least=0, below=1)
    ceiling: int = field(3, "at most nine", at_most=9)
    optional: int | None = field(None, "unset is not checked", at_least=1)


@pytest.mark.parametrize("changes, message", [
    ({"count": 0}, "--count must be >= 1, got 0"),
    ({"timeout": 0.0}, "--timeout must be > 0, got 0.0"),
    ({"wait_ms": -1.0}, "--wait-ms must be in [0, 1000], got -1.0"),
    ({"wait_ms": 1000.5}, "--wait-ms must be in [0, 1000], got 1000.5"),
    ({"share": 0.0}, "--share must be in (0, 1], got 0.0"),
    ({"limit": -5}, "--limit must be >= 0 (0 = none), got -5"),
    ({"optional": 0}, "--optional must be >= 1, got 0"),
    ({"dropout": 1.0}, "--dropout must be in [0, 1), got 1.0"),
    ({"ceiling": 10}, "--ceiling must be <= 9, got 10"),
    ({"count": 0, "limit": -5}, "--count must be >= 1, got 0"),  # the first in declaration order
])
def test_check_bounds_names_the_setting_its_bound_and_the_value(changes, message):
    with pytest.raises(ConfigError) as caught:
        check_bounds(Bounded(**changes))
    assert str(caught.value) == message


def test_values_on_the_bounds_and_unset_optionals_pass():
    check_bounds(Bounded(count=1, timeout=1e-9, wait_ms=0.0, share=1.0, limit=0, optional=None,
                         dropout=0.999, ceiling=9))
    check_bounds(Bounded(wait_ms=1000.0))


def test_check_bounds_takes_the_callers_error_and_names():
    class FileError(ValueError):
        pass

    with pytest.raises(FileError, match=r"^batching.txt: count must be >= 1, got -2$"):
        check_bounds(Bounded(count=-2), FileError, name=lambda field_name: f"batching.txt: {field_name}")


def test_parse_config_checks_the_declared_bounds_without_a_validate(capsys):
    assert parse_config(Bounded, ["--count", "3"]).count == 3
    with pytest.raises(SystemExit) as exited:
        parse_config(Bounded, ["--share", "1.5"])
    assert exited.value.code == 2
    assert "--share must be in (0, 1], got 1.5" in capsys.readouterr().err


STAGE_MODULES = ("model.cluster", "model.bench", "model.bench_multiworker", "model.train", "export.pipeline",
                 "serving.query", "serving.config_files", "serving.bench", "serving.settings", "serving.demo",
                 "pi.smoke", "pi.bench_mobile")


def _bounded_configs():
    """(class, field, a value out of its bounds) for every stage config field that declares bounds."""
    import dataclasses
    import importlib

    from common.configlib import BOUNDS

    for module_name in STAGE_MODULES:
        module = importlib.import_module(module_name)
        for cls in vars(module).values():
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module_name):
                continue
            for f in dataclasses.fields(cls):
                at_least, above, at_most, below = (f.metadata.get(key) for key in BOUNDS)
                low = at_least if at_least is not None else above
                if low is not None:
                    yield pytest.param(cls, f.name, low - 1, id=f"{cls.__name__}.{f.name}")
                elif at_most is not None or below is not None:
                    high = at_most if at_most is not None else below
                    yield pytest.param(cls, f.name, high + 1, id=f"{cls.__name__}.{f.name}")


@pytest.mark.parametrize("cls, name, bad", list(_bounded_configs()))
def test_every_stage_config_checks_its_declared_bounds_in_validate(cls, name, bad):
    """parse_config and configlib.replace run validate() alone when a config has one, so each
    stage's validate() must check the bounds its fields declare."""
    config = cls(**{name: bad})
    if not hasattr(config, "validate"):
        pytest.fail(f"{cls.__name__} declares bounds but has no validate()")
    with pytest.raises(ValueError, match=name.replace("_", "[-_]")):
        config.validate()
