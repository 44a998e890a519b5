"""Tests for pipeline_steps.make_demo_data (synthetic SCAN-precomp data set)."""

import collections
import json
import re

import numpy as np
import pytest

from pipeline_steps.make_demo_data import main

SPLITS = ("train", "dev", "test", "testall")
SMALL = [
    "--n-train",
    "150",
    "--n-dev",
    "20",
    "--n-test",
    "12",
    "--n-testall-per-fold",
    "3",
    "--img-dim",
    "16",
]
IMAGES = {"train": 150, "dev": 20, "test": 12, "testall": 15}


def _generate(out, *extra, seed=0):
    main(["--out", str(out), "--seed", str(seed), *SMALL, *extra])
    return out


def _caps(out, split):
    return (out / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()


def _words(caption):
    return re.findall(r"[a-z]+", caption.lower())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _generate(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def meta(data):
    return json.loads((data / "demo_meta.json").read_text(encoding="utf-8"))


def test_files_shapes_and_dtypes(data, meta):
    expected = {f"{s}_{kind}" for s in SPLITS for kind in ("ims.npy", "caps.txt")}
    assert {p.name for p in data.iterdir()} == expected | {"demo_meta.json"}
    for split in SPLITS:
        ims = np.load(data / f"{split}_ims.npy")
        assert ims.shape == (IMAGES[split], 36, 16) and ims.dtype == np.float32
        assert ims.min() >= 0 and ims.max() > 0  # ReLU-like, not all zero
        assert len(_caps(data, split)) == 5 * IMAGES[split]
        assert meta["splits"][split]["images"] == IMAGES[split]
        assert len(meta["splits"][split]["scenes"]) == IMAGES[split]
    assert meta["sizes"]["testall"] == 5 * 3 and meta["seed"] == 0 and meta["img_dim"] == 16


def test_dev_rows_per_caption(data, tmp_path):
    out = _generate(tmp_path, "--dev-rows-per-caption")
    dev = np.load(out / "dev_ims.npy")
    assert dev.shape[0] == len(_caps(out, "dev")) == 5 * IMAGES["dev"]
    groups = dev.reshape(IMAGES["dev"], 5, 36, 16)
    assert (groups == groups[:, :1]).all()
    # The repeated rows are exactly the per-image rows, and other splits are untouched.
    assert np.array_equal(groups[:, 0], np.load(data / "dev_ims.npy"))
    assert (out / "test_ims.npy").read_bytes() == (data / "test_ims.npy").read_bytes()
    assert json.loads((out / "demo_meta.json").read_text())["splits"]["dev"]["rows"] == dev.shape[0]


def test_deterministic_in_seed(data, tmp_path):
    same = _generate(tmp_path / "same")
    other = _generate(tmp_path / "other", seed=1)
    for path in data.iterdir():
        assert (same / path.name).read_bytes() == path.read_bytes(), path.name
    for name in ("train_ims.npy", "train_caps.txt", "testall_ims.npy"):
        assert (other / name).read_bytes() != (data / name).read_bytes(), name


def test_partial_caption_lengths_and_rare_words(tmp_path):
    data = _generate(tmp_path, "--caption-detail", "0")
    caps = _caps(data, "train") + _caps(data, "dev")
    lengths = np.array([len(c.split()) for c in caps])
    assert ((lengths >= 8) & (lengths <= 15)).mean() > 0.95
    assert len(set(caps)) > 0.8 * len(caps)  # five varied captions, not one repeated
    counts = collections.Counter(w for c in caps for w in _words(c))
    rare = [w for w, n in counts.items() if n <= 3]
    common = [w for w, n in counts.items() if n >= 4]
    assert len(rare) >= 3 and len(common) >= 30  # a count >= 4 vocabulary threshold matters


def test_captions_mention_only_their_scene_objects(data, meta):
    word_to_class = {w: cls for cls, words in meta["lexicon"]["objects"].items() for w in words}
    for split in ("train", "test"):
        caps = _caps(data, split)
        for k, scene in enumerate(meta["splits"][split]["scenes"]):
            own = {obj[0] for obj in scene["objects"]}
            for cap in caps[5 * k : 5 * k + 5]:
                mentioned = {word_to_class[w] for w in _words(cap) if w in word_to_class}
                assert mentioned and mentioned <= own, (cap, own)


def _concepts(caption, meta_lexicon):
    """Object classes, colours and sizes a caption names (by the generator's own tables)."""
    from pipeline_steps.make_demo_data import COLOURS, SIZES

    text = " " + " ".join(_words(caption)) + " "
    found = set()
    for kind, table in (("class", meta_lexicon), ("colour", COLOURS), ("size", SIZES)):
        for key, words in table.items():
            words = words if kind == "class" else words[0] + words[1]
            if any(f" {w} " in text for w in words):
                found.add((kind, key))
    return found


def test_full_descriptions_name_every_object_with_its_colour_and_size(data, meta):
    lexicon = meta["lexicon"]["objects"]
    caps = _caps(data, "train")
    for k, scene in enumerate(meta["splits"]["train"]["scenes"]):
        own = {("class", o[0]) for o in scene["objects"]}
        own |= {("colour", o[1]) for o in scene["objects"]} | {("size", o[2]) for o in scene["objects"]}
        for cap in caps[5 * k : 5 * k + 5]:
            assert _concepts(cap, lexicon) == own, (cap, scene)
            assert 8 <= len(cap.split()) <= 34


def test_caption_detail_sets_the_share_of_full_descriptions(tmp_path):
    """With detail 0.5 about half the captions name every object; with 0 few do."""
    shares = {}
    for detail in ("0", "0.5"):
        out = _generate(tmp_path / detail, "--caption-detail", detail)
        meta = json.loads((out / "demo_meta.json").read_text())
        lexicon, caps = meta["lexicon"]["objects"], _caps(out, "train")
        full = []
        for k, scene in enumerate(meta["splits"]["train"]["scenes"]):
            classes = {("class", o[0]) for o in scene["objects"]}
            colours = {("colour", o[1]) for o in scene["objects"]}
            full += [classes | colours <= _concepts(c, lexicon) for c in caps[5 * k : 5 * k + 5]]
        shares[detail] = np.mean(full)
        assert meta["knobs"]["caption_detail"] == float(detail)
    # A partial caption names every object with its colour only by chance (2 objects, both coloured).
    assert shares["0"] < 0.2 and 0.4 < shares["0.5"] < 0.7


@pytest.mark.parametrize("near_duplicates", [0.0, 1.0, 3.0])
def test_near_duplicates_is_the_mean_number_of_variants(tmp_path, near_duplicates):
    out = _generate(tmp_path, "--n-train", "1500", "--near-duplicates", str(near_duplicates))
    info = json.loads((out / "demo_meta.json").read_text())["splits"]["train"]
    families = collections.Counter(info["family"])
    # Families cut by the n-image limit are rare; the Poisson mean's standard error is ~0.05.
    variants = np.mean([size - 1 for size in families.values()])
    assert abs(variants - near_duplicates) < 0.15 + 0.05 * near_duplicates


def test_variants_differ_from_base_in_duplicate_changes_things(tmp_path):
    out = _generate(tmp_path, "--duplicate-changes", "2")
    info = json.loads((out / "demo_meta.json").read_text())["splits"]["train"]
    bases = {f: s for f, s, c in zip(info["family"], info["scenes"], info["change"]) if c == "base"}
    checked = 0
    for fam, scene, change in zip(info["family"], info["scenes"], info["change"]):
        if change != "base" and fam in bases:
            base = bases[fam]
            objs = sum(a != b for o, p in zip(scene["objects"], base["objects"]) for a, b in zip(o, p))
            rels = sum(r != q for r, q in zip(scene["relations"], base["relations"]))
            assert objs + rels == 2 and len(change.split("+")) == 2, change
            assert len({o[0] for o in scene["objects"]}) == len(scene["objects"])  # classes stay distinct
            checked += 1
    assert checked > 10


def test_near_duplicate_families_are_close_in_feature_space(data, meta):
    info = meta["splits"]["train"]
    family = np.array(info["family"])
    sizes = collections.Counter(family.tolist())
    assert max(sizes.values()) >= 2 and 1 < len(sizes) < len(family)
    # Relatives sit at scattered positions, not in consecutive blocks.
    assert (family[1:] == family[:-1]).mean() < 0.3
    pooled = np.load(data / "train_ims.npy").mean(axis=1)
    dist = np.linalg.norm(pooled[:, None] - pooled[None], axis=-1)
    same = (family[:, None] == family[None]) & ~np.eye(len(family), dtype=bool)
    different = family[:, None] != family[None]
    assert dist[same].mean() < 0.8 * dist[different].mean()


def test_variants_differ_from_base_in_one_thing(meta):
    info = meta["splits"]["train"]
    bases = {f: s for f, s, c in zip(info["family"], info["scenes"], info["change"]) if c == "base"}
    checked = 0
    for fam, scene, change in zip(info["family"], info["scenes"], info["change"]):
        if change == "base" or fam not in bases:
            continue
        base = bases[fam]
        objs = sum(a != b for o, p in zip(scene["objects"], base["objects"]) for a, b in zip(o, p))
        rels = sum(r != q for r, q in zip(scene["relations"], base["relations"]))
        assert scene["setting"] == base["setting"] and objs + rels == 1, change
        checked += 1
    assert checked > 10


@pytest.mark.parametrize(
    "bad",
    [
        ["--n-train", "0"],
        ["--n-dev", "-3"],
        ["--n-test", "many"],
        ["--img-dim", "4"],
        ["--n-testall-per-fold", "0"],
        ["--seed", "-1"],
        ["--caption-detail", "1.5"],
        ["--near-duplicates", "-1"],
        ["--duplicate-changes", "0"],
    ],
)
def test_bad_arguments_exit_cleanly(tmp_path, bad, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out), *bad])
    assert exc.value.code == 2 and "error" in capsys.readouterr().err
    assert not out.exists()


def test_out_is_required():
    with pytest.raises(SystemExit):
        main(["--seed", "0"])


NOISE_SIZES = ["--n-train", "12", "--n-dev", "4", "--n-test", "4", "--n-testall-per-fold", "2"]
NOISE_SIZES += ["--img-dim", "16"]


def _features(tmp_path, name, *extra):
    main(["--out", str(tmp_path / name), *NOISE_SIZES, *extra])
    return np.load(tmp_path / name / "train_ims.npy")


def test_the_default_data_is_unchanged_by_the_feature_noise_knob(tmp_path):
    """The default's bytes (digest computed with the generator before --feature-noise existed),
    with the knob absent and set to 1."""
    import hashlib

    before = "86ed7df72f30e7b654ef770969c8a3480f3abe89b151cbf4508c2a6d5673d01c"
    for name, extra in (("absent", ()), ("one", ("--feature-noise", "1"))):
        main(["--out", str(tmp_path / name), *NOISE_SIZES, *extra])
        content = (tmp_path / name / "train_ims.npy").read_bytes() + (
            tmp_path / name / "test_ims.npy"
        ).read_bytes()
        assert hashlib.sha256(content).hexdigest() == before, name


def test_feature_noise_scales_the_noise_terms_linearly(tmp_path):
    """The same random draws at every noise level, so before the ReLU a feature is A + noise * B:
    wherever the noiseless and the full-noise features are both positive, the half-noise one is
    exactly their mean; and less noise brings each image nearer to its noiseless features."""
    clean, half, full = (_features(tmp_path, str(n), "--feature-noise", str(n)) for n in (0.0, 0.5, 1.0))
    both = (clean > 0) & (full > 0)
    assert both.mean() > 0.2
    np.testing.assert_allclose(half[both], (clean[both] + full[both]) / 2, rtol=1e-5, atol=1e-5)
    assert np.abs(half - clean).mean() < np.abs(full - clean).mean()
