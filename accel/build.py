"""Compile-on-first-use for the C kernels (gru_cell.c, topk.c), loaded with ctypes.

Why C at all: some CPU hot spots are chains of elementwise work between matrix products (a GRU
cell per time step) or per-element decisions (a running top-k per query). Torch runs each link of
such a chain as its own pass over memory, with its own dispatch; one C loop does the whole chain
in one pass. The matrix products around them stay in torch.

A source is compiled with the system C compiler (`cc`, or $CC) and -march=native into a cache
folder ($AOQ_KERNEL_CACHE, default ~/.cache/aoq-pipeline/kernels). The file name carries a hash
of the source, the compiler, the flags and the CPU's model and feature list, so a home folder
shared by cluster nodes of different CPUs gets one library per kind. The library is written to a
temporary name and renamed, so concurrent jobs never load half a file. A compiler that does not
finish within COMPILE_TIMEOUT seconds counts as failed.
Callers treat a failed build (or the switch `AOQ_NO_ACCEL=1`) as "no kernel" and use their torch
path: the kernels' vector code is chosen at compile time (AVX-512, AVX2, or plain loops), so any
processor the compiler knows gets a working build.
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
CFLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=gnu99")
COMPILE_TIMEOUT = 120  # seconds; a first build takes about 2 s here


def cache_dir():
    return Path(os.environ.get("AOQ_KERNEL_CACHE", Path.home() / ".cache" / "aoq-pipeline" / "kernels"))


def compiler():
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_signature():
    """The CPU's model and feature flags (Linux), so -march=native builds are never shared wrongly."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() + platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def library_path(source, prefix, directory=None, cflags=CFLAGS):
    """Where the library of `source` is (or would be) cached for this compiler, flags and CPU;
    None without a compiler."""
    cc = compiler()
    if cc is None:
        return None
    key = hashlib.sha256(
        Path(source).read_bytes() + " ".join([cc, *cflags]).encode() + cpu_signature().encode()
    ).hexdigest()[:16]
    return (Path(directory) if directory is not None else cache_dir()) / f"{prefix}_{key}.so"


def build_library(source, prefix, directory=None, cflags=CFLAGS):
    """Compile `source` (if not cached) into `directory` and return the library path.

    Raises RuntimeError when there is no compiler or the compiler fails (its message included).
    """
    cc, source = compiler(), Path(source)
    target = library_path(source, prefix, directory, cflags)
    if target is None:
        raise RuntimeError("no C compiler found (set $CC)")
    if target.exists():
        return target
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        try:
            proc = subprocess.run(
                [cc, *cflags, "-o", tmp, str(source), "-lm"],
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"compiling {source} took over {COMPILE_TIMEOUT} s; gave up") from None
        except OSError as err:  # the compiler could not be started
            raise RuntimeError(f"running {cc} failed: {err}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {source} failed:\n{proc.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library(source, prefix, bind, cflags=CFLAGS):
    """`bind(ctypes.CDLL)` of the compiled `source`, or None (logged once per source) if it cannot
    be built here. Built at most once per process; asked again, it answers from memory."""
    key = (str(source), prefix, cflags)
    if key not in _LOADED:
        try:
            _LOADED[key] = bind(ctypes.CDLL(str(build_library(source, prefix, cflags=cflags))))
        except (OSError, RuntimeError) as err:
            log.warning("native kernels of %s unavailable, using the torch path: %s", Path(source).name, err)
            _LOADED[key] = None
    return _LOADED[key]


_LOADED = {}
