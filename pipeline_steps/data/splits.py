"""Open a prepared split: memory-mapped features plus the cached caption ids."""

import json
from pathlib import Path

from pipeline_steps.data.precomp import ImageFeatures, SplitInfo
from pipeline_steps.data.text import CaptionIds


def read_manifest(prepared_dir):
    return json.loads((Path(prepared_dir) / "manifest.json").read_text(encoding="utf-8"))


def open_split(data_dir, prepared_dir, split):
    """Return (features, captions, info) of a split validated by the prepare_data step."""
    manifest = read_manifest(prepared_dir)
    if split not in manifest["splits"]:
        raise ValueError(
            f"{prepared_dir}/manifest.json: split {split!r} was not prepared "
            f"(prepared: {sorted(manifest['splits'])})"
        )
    fields = {k: v for k, v in manifest["splits"][split].items() if k in SplitInfo.__dataclass_fields__}
    info = SplitInfo(**fields)
    captions = CaptionIds(Path(prepared_dir) / f"{split}_ids.npz")
    return ImageFeatures(data_dir, info), captions, info
