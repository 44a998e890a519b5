"""Small builders shared by several test files."""
import torch

from pipeline_steps import make_demo_data, prepare_data


def make_prepared_demo(root, seed, n_train, n_dev, n_test, splits, img_dim=16):
    """A tiny generated dataset and its prepared folder under `root`: (data, prepared)."""
    data, prepared = root / "demo_precomp", root / "prepared"
    make_demo_data.main(["--out", str(data), "--seed", str(seed), "--n-train", str(n_train),
                         "--n-dev", str(n_dev), "--n-test", str(n_test), "--n-testall-per-fold", "4",
                         "--img-dim", str(img_dim)])
    prepare_data.main(["--data", str(data), "--out", str(prepared), "--img-dim", str(img_dim),
                       "--splits", *splits])
    return data, prepared


def random_caption_batch(vocab_size, seed=1, batch=6, max_len=9, extra_pad=2):
    """Random ids with random lengths (1 included), zero-padded, `extra_pad` columns wider than
    the longest caption."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0] = 1
    ids = torch.randint(1, vocab_size, (batch, int(lengths.max()) + extra_pad), generator=g)
    ids[torch.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0
    return ids, lengths


def random_images(img_dim, seed=2, batch=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 36, img_dim, generator=g)
