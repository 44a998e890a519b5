"""Opening .npy files memory-mapped, with every way a file can be unreadable (missing, empty, cut
short, not an array) reported as one InputError naming it."""

import numpy as np

from pipeline_steps.common.errors import InputError


def open_npy(path):
    """`path` memory-mapped read-only (never read whole)."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise InputError(f"{path}: file is missing") from None
    except EOFError:
        raise InputError(f"{path}: not a readable .npy array (the file is empty or cut short)") from None
    except (ValueError, OSError) as err:
        raise InputError(f"{path}: not a readable .npy array ({' '.join(str(err).split())})") from None
