"""Files: atomic writes (a kill at any moment leaves either the old file or the new one, never half) and
their SHA-256."""
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path):
    """Yield a temporary path in the same folder; rename it over `path` on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # the permissions open() would give, not mkstemp's owner-only 0600
    try:
        yield tmp
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_open(path, mode='w'):
    """open() for writing, atomically replacing `path` when the block ends without error."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f


def write_text(path, text):
    with atomic_open(path) as f:
        f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + '\n')


def save_png(fig, path, dpi, **savefig):
    """A matplotlib figure laid out, written atomically as a PNG, and closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=dpi, **savefig)
    plt.close(fig)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 24), b''):
            digest.update(block)
    return digest.hexdigest()
