"""Reading a split row by row does not pile the file's pages into the process's resident set."""

import numpy as np

from pipeline_steps.data.precomp import ImageFeatures, SplitInfo


def rss_file_kib():
    """Resident file-backed memory of this process (Linux), in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


def read_all(features, batch=64):
    total = 0.0
    for start in range(0, len(features), batch):
        total += float(features.rows(np.arange(start, min(start + batch, len(features))))[:, 0, 0].sum())
    return total


def test_reading_every_row_keeps_resident_memory_bounded(tmp_path):
    n, dim = 2000, 512  # 2000 x 36 x 512 float32 = 147 MB on disk
    path = tmp_path / "train_ims.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 36, dim))
    array[:, 0, 0] = np.arange(n)
    array.flush()
    del array
    info = SplitInfo("train", n, 5 * n, 1, dim)
    file_kib = path.stat().st_size // 1024

    released = ImageFeatures(tmp_path, info, release_every_bytes=16 << 20)
    before = rss_file_kib()
    assert read_all(released) == sum(range(n))  # every row was read, and the right one
    growth_released = rss_file_kib() - before
    released.release_pages()

    kept = ImageFeatures(tmp_path, info, release_every_bytes=1 << 62)
    before = rss_file_kib()
    read_all(kept)
    growth_kept = rss_file_kib() - before

    assert growth_kept > file_kib // 2  # without releasing, the file piles up in RSS
    assert growth_released < file_kib // 4  # with it, at most about one release interval stays
