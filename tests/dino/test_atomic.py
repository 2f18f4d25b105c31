"""dino.atomic: the one way outputs are written (temp file next to the target, then os.replace)."""
import os
import stat

import pytest

from dino.atomic import atomic_temp_dir, atomic_temp_path, atomic_write


def test_atomic_write_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "out" / "report.json"
    for fsync in (False, True):
        with atomic_write(target, fsync=fsync) as tmp:
            assert os.path.dirname(tmp) == str(target.parent) and target.exists() == fsync  # old one untouched
            with open(tmp, "w") as f:
                f.write(f"v{int(fsync)}")
        assert target.read_text() == f"v{int(fsync)}"
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_write(target, fsync=True) as tmp:
            with open(tmp, "w") as f:
                f.write("partial")
            raise RuntimeError("killed half way")
    assert target.read_text() == "v1"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temp file left


def test_atomic_temp_paths_get_normal_permissions(tmp_path):
    """mkstemp/mkdtemp are private (0600/0700); results must stay readable by a lab's group after the rename."""
    old = os.umask(0o022)
    try:
        f = atomic_temp_path(tmp_path / "sub" / "report.json")
        d = atomic_temp_dir(tmp_path / "data")
    finally:
        os.umask(old)
    assert os.path.dirname(f) == str(tmp_path / "sub") and os.path.getsize(f) == 0
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
    assert d.parent == tmp_path and stat.S_IMODE(os.stat(d).st_mode) == 0o755
