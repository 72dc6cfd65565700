"""Faults the tests inject where the code meets the disk."""
import contextlib


def disk_full_midway(atomic_write, keep):
    """`atomic_write` whose file takes `keep(data)` of what is first written, then fails as a full
    disk does: what the code under test leaves behind is then on disk to be checked."""
    @contextlib.contextmanager
    def opened(path, *args, **kwargs):
        with atomic_write(path, *args, **kwargs) as fh:
            class Full:
                def write(self, data):
                    fh.write(keep(data))
                    fh.flush()
                    raise OSError(28, "No space left on device")

                def __getattr__(self, name):
                    return getattr(fh, name)
            yield Full()
    return opened
