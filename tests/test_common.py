"""common/: the version rules the exporter and the local server share."""

from __future__ import annotations

from pathlib import Path

import pytest

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
