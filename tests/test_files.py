"""Files the library writes (datasets, checkpoints, records) are shared-drive friendly."""
import os
import stat

from ptcourse.files import atomic_write


def test_atomic_write_gives_new_files_the_usual_permissions(tmp_path):
    """A TA fills PTCOURSE_DATA on a shared drive: students must be able to read what it wrote.

    (``tempfile.mkstemp`` creates 0600 files; renamed as they are, the cache would be private.)
    """
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "x.bin", lambda f: f.write(b"data"))
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "x.bin").stat().st_mode)
    assert mode == 0o644, oct(mode)
    assert (tmp_path / "x.bin").read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temporary file left behind
