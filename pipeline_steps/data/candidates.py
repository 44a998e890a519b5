"""The one check of an offline candidate file (docs/data.md), used by adopt_candidates (the
authors' files) and by training (whatever file it is given): 2-D int32, one row per training
image (i2t) or caption (t2i), enough columns for what AOQ draws, every id in range, and no row
listing one of its anchor's own positives (i2t: the image's 5 captions; t2i: the caption's image),
which would be a positive used as a negative. Only the columns AOQ draws from are read, a block
of rows at a time."""

import logging

import numpy as np

from pipeline_steps.common.npy import open_npy
from pipeline_steps.data.precomp import CAPTIONS_PER_IMAGE, DataError

BLOCK_ROWS = 65536
log = logging.getLogger(__name__)


def caption_of_image(image_rows, captions):
    """i2t: a caption is the row image's own when caption // 5 is that image."""
    return captions // CAPTIONS_PER_IMAGE == image_rows


def image_of_caption(caption_rows, images):
    """t2i: an image is the row caption's own when it is caption // 5."""
    return images == caption_rows // CAPTIONS_PER_IMAGE


def t2i_columns(offline_size):
    """Columns of the t2i file that offline_size n draws from: image rank n // 5 < ceil(n / 5)."""
    return -(-offline_size // CAPTIONS_PER_IMAGE)


def checked_candidates(path, direction, n_images, offline_size, own_positives="refuse"):
    """The file at `path` (direction "i2t" or "t2i") memory-mapped, after checking the columns
    that `offline_size` draws from; raises DataError naming the file, the row and the problem.
    An anchor's own positive among its candidates is refused (`own_positives="refuse"`, adopting
    the authors' files) or counted and logged as a warning ("warn", training: the file may be
    one a user made on purpose)."""
    columns = offline_size if direction == "i2t" else t2i_columns(offline_size)
    n_captions = n_images * CAPTIONS_PER_IMAGE
    rows, n_targets, is_own, anchor = (
        (n_images, n_captions, caption_of_image, "image")
        if direction == "i2t"
        else (n_captions, n_images, image_of_caption, "caption")
    )
    array = open_npy(path)
    if array.ndim != 2 or array.dtype != np.int32:
        raise DataError(f"{path}: expected a 2-D int32 array, found {array.dtype} {array.shape}")
    if array.shape[0] != rows:
        raise DataError(
            f"{path}: expected {rows} rows (one per training {anchor}) for this training split, "
            f"found shape {array.shape}"
        )
    if array.shape[1] < columns:
        raise DataError(
            f"{path}: offline_size {offline_size} draws from the first {columns} columns, "
            f"but the file holds {array.shape[1]}"
        )
    found, first = 0, None
    for start in range(0, rows, BLOCK_ROWS):
        block = np.asarray(array[start : start + BLOCK_ROWS, :columns])
        bad = np.argwhere((block < 0) | (block >= n_targets))
        if len(bad):
            row, col = bad[0]
            raise DataError(
                f"{path}: row {start + row} column {col} holds id {block[row, col]}, outside [0, {n_targets})"
            )
        own = np.argwhere(is_own(np.arange(start, start + len(block))[:, None], block))
        if len(own) and own_positives == "refuse":
            row, col = own[0]
            raise DataError(
                f"{path}: row {start + row} lists its own positive ({block[row, col]}) in column {col}"
            )
        if len(own):
            first = first if found else (start + own[0][0], own[0][1])
            found += len(own)
    if found:
        log.warning(
            "%s: %d candidates among the first %d columns are their anchor's own positives (first: "
            "row %d column %d); AOQ will use them as negatives",
            path,
            found,
            columns,
            *first,
        )
    return array
