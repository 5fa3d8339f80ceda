"""hpctrain.checkpoint.layout: names, tracker atomicity, latest complete checkpoint."""
import datetime

import pytest

from hpctrain.checkpoint import layout


def test_names_and_tracker(tmp_path):
    assert layout.iter_dir_name(100) == "iter_0000100"
    assert layout.iter_dir_name("release") == "release"
    with pytest.raises(FileNotFoundError):
        layout.write_tracker(tmp_path, 5)  # no iter dir yet
    layout.checkpoint_dir(tmp_path, 5).mkdir()
    assert layout.find_latest(tmp_path) is None  # interrupted save: no tracker
    assert layout.holds_checkpoint(tmp_path)
    layout.write_tracker(tmp_path, 5)
    ref = layout.find_latest(tmp_path)
    assert ref.iteration == 5 and not ref.release and ref.path.name == "iter_0000005"
    assert not list(tmp_path.glob(".*tmp*"))
    (tmp_path / layout.TRACKER).write_text("garbage")
    with pytest.raises(ValueError, match="tracker"):
        layout.find_latest(tmp_path)


def test_versions(tmp_path):
    t = datetime.datetime(2026, 1, 2, 3, 4, 5)
    v0 = layout.new_version_dir(tmp_path, now=t)
    assert v0.name == "v0-20260102-030405"
    v1 = layout.new_version_dir(tmp_path, now=t)
    assert v1.name.startswith("v1-")
    (v0 / "release").mkdir()
    layout.write_tracker(v0, "release")
    (v1 / "iter_0000010").mkdir()  # v1 incomplete -> v0 wins
    ref = layout.find_latest(tmp_path)
    assert ref.root == v0 and ref.release and ref.iteration == 0
    layout.write_tracker(v1, 10)
    assert layout.require_latest(tmp_path).root == v1
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        layout.require_latest(tmp_path / "nothing")
