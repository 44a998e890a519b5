"""Generate a small synthetic image-text dataset in the SCAN "precomp" layout.

Stands in for the real COCO/Flickr30K bottom-up-attention features so the whole pipeline can run
on a laptop. Each image is a scene of 2-4 objects (class, colour, size) with pairwise relations and
a setting; its 36 region features are noisy non-negative mixes of fixed per-concept prototype
vectors, and its 5 captions describe the same scene with varied templates, synonyms and a few rare
words. Scenes come in families of near-duplicates (an object, attribute or relation changed), so
hard negatives exist. Three knobs set how hard (docs/data.md): --near-duplicates (mean variants
per scene), --duplicate-changes (how many things a variant changes: its distance in feature and
caption space) and --caption-detail (the share of captions that name every object, attribute and
relation; the others describe part of the scene and so may describe other images equally well).

Outputs (in --out): {train,dev,test,testall}_ims.npy, float32 (rows, 36, img_dim); the matching
{split}_caps.txt, UTF-8, 5 consecutive lines per image; and demo_meta.json (seed, sizes, knobs,
dim, generator version, lexicon, and per split the family id, change kind and scene of every image).
testall holds 5 folds of --n-testall-per-fold consecutive images (COCO 1K protocol).
With --dev-rows-per-caption, dev_ims.npy repeats each image row 5 times (Flickr30K dev layout).
Everything is deterministic in --seed: reruns produce byte-identical files.

Example:
    python -m pipeline_steps.make_demo_data --out resources/demo --seed 0 --n-train 2000 \
        --n-dev 200 --n-test 200 --n-testall-per-fold 100 --img-dim 128
"""

import argparse
import json
from pathlib import Path

import numpy as np

from pipeline_steps.common.atomic import atomic_path, remove_stale_temporaries, write_text_atomic
from pipeline_steps.data.precomp import CAPTIONS_PER_IMAGE

GENERATOR_VERSION = "2"
N_REGIONS = 36

N_FOLDS = 5
SPLITS = ("train", "dev", "test", "testall")

# Tuned so a bag-of-words ridge proxy gets image->text R@1 well inside (chance, perfect).
INSTANCE_NOISE = 0.7  # shared by all regions of one object: averaging regions cannot remove it
REGION_NOISE = 1.0  # independent per region, like jittered detector boxes
P_RARE = 0.004  # rare synonyms: a handful of uses per split, so a vocab threshold matters


def _phrases(text):
    return [w.replace("_", " ") for w in text.split(",") if w]


def _lexicon(spec):
    """'key:common,words|rare,words ...' -> {key: (common, rare)}; '_' joins multi-word phrases."""
    out = {}
    for item in spec.split():
        key, words = item.split(":")
        common, _, rare = words.partition("|")
        out[key] = (_phrases(common), _phrases(rare))
    return out


OBJECTS = _lexicon("""
dog:dog,puppy|pooch cat:cat,kitten|feline horse:horse,pony|stallion cow:cow,calf|heifer
sheep:sheep,lamb|ewe bird:bird|fowl car:car,automobile|sedan bus:bus|omnibus
bicycle:bicycle,bike|velocipede motorcycle:motorcycle,motorbike|moped truck:truck,lorry|pickup
boat:boat|dinghy table:table,desk|workbench chair:chair,seat|stool bench:bench|pew
couch:couch,sofa|settee bed:bed|cot lamp:lamp|lantern bottle:bottle|flask cup:cup,mug|goblet
bowl:bowl|basin vase:vase|urn clock:clock|timepiece umbrella:umbrella|parasol ball:ball|orb
kite:kite|glider backpack:backpack,bag|knapsack suitcase:suitcase,luggage|valise
laptop:laptop,computer|notebook phone:phone,cellphone|handset book:book|tome toy:toy|plaything
pizza:pizza|flatbread cake:cake|gateau apple:apple|pippin skateboard:skateboard|longboard
""")
COLOURS = _lexicon("""
red:red|crimson,scarlet blue:blue|azure green:green|emerald yellow:yellow|golden
black:black|ebony white:white|ivory brown:brown|chestnut orange:orange|tangerine
pink:pink|rosy gray:gray,grey|ashen
""")
SIZES = _lexicon(
    "tiny:tiny|miniature small:small,little|petite large:large,big|sizable huge:huge,giant|colossal"
)
SETTINGS = _lexicon("""
park:in_the_park,at_the_park|in_a_meadow street:on_the_street,on_a_road|on_a_boulevard
kitchen:in_the_kitchen,in_a_kitchen|in_a_scullery beach:on_the_beach,at_the_shore|on_the_seashore
field:in_a_field,on_the_grass|in_a_pasture room:in_a_room,in_the_living_room|in_a_parlor
office:in_an_office,at_the_office|in_a_workplace garden:in_the_garden,in_a_backyard|in_an_orchard
lake:by_the_lake,near_the_water|by_a_lagoon snow:in_the_snow,on_a_snowy_hill|in_a_snowdrift
""")
RELATIONS = _lexicon(
    "on:on,on_top_of|atop next_to:next_to,beside|alongside under:under,below|"
    "beneath behind:behind|in_back_of near:near,close_to|nigh "
    "in_front_of:in_front_of|ahead_of"
)
# Objects this size cover this many of the 36 boxes (+0/1); 4 huge objects + 3 relation boxes
# still fit in 36 regions.
SIZE_REGIONS = {"tiny": 2, "small": 3, "large": 5, "huge": 7}
VERBS = ["is", "sits", "is sitting", "is standing", "rests", "is lying", "is placed"]
OPENERS = ["a photo of", "a picture of", "an image showing", "there is", "a view of", "a close up of"]
FILLERS = [
    "on a sunny day",
    "in this picture",
    "during the day",
    "in the photo",
    "on a cloudy afternoon",
    "in the daytime",
]


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _word(rng, entry):
    common, rare = entry
    return _pick(rng, rare) if rare and rng.random() < P_RARE else _pick(rng, common)


def _random_scene(rng):
    n_obj = int(rng.integers(2, 5))
    classes = rng.choice(len(OBJECTS), n_obj, replace=False)
    names = list(OBJECTS)
    objects = [[names[c], _pick(rng, list(COLOURS)), _pick(rng, list(SIZES))] for c in classes]
    relations = [[i, i + 1, _pick(rng, list(RELATIONS))] for i in range(n_obj - 1)]
    return {"setting": _pick(rng, list(SETTINGS)), "objects": objects, "relations": relations}


# What a near-duplicate may change: an object's class (0), colour (1) or size (2), or a relation.
OBJECT_SLOTS = {0: ("class", OBJECTS), 1: ("colour", COLOURS), 2: ("size", SIZES)}


def _variant(base, rng, changes=1):
    """Copy `base` with `changes` different things changed (each an object's class, colour or
    size, or a relation; fewer when the scene has fewer): the variant's distance from its base."""
    scene = json.loads(json.dumps(base))
    slots = [("object", i, s) for i in range(len(scene["objects"])) for s in OBJECT_SLOTS]
    slots += [("relation", r, 2) for r in range(len(scene["relations"]))]
    picked = rng.choice(len(slots), min(changes, len(slots)), replace=False)
    kinds = []
    for where, index, slot in (slots[k] for k in sorted(picked)):
        if where == "relation":
            rel = scene["relations"][index]
            rel[2] = _pick(rng, [r for r in RELATIONS if r != rel[2]])
            kinds.append("relation")
            continue
        obj = scene["objects"][index]
        kind, table = OBJECT_SLOTS[slot]
        # A new class must not duplicate another object's (nor the one this slot had in `base`).
        taken = {o[0] for o in scene["objects"]} | {base["objects"][index][0]} if slot == 0 else set()
        obj[slot] = _pick(rng, [v for v in table if v != base["objects"][index][slot] and v not in taken])
        kinds.append(kind)
    return scene, "+".join(kinds)


def make_scenes(n, rng, near_duplicates=1.3, changes=1):
    """n scenes grouped in families: a base scene and Poisson(`near_duplicates`) variants of it,
    each `changes` things away; shuffled so relatives are not adjacent."""
    scenes, family, change = [], [], []
    fam = 0
    while len(scenes) < n:
        base = _random_scene(rng)
        members = [(base, "base")] + [
            _variant(base, rng, changes) for _ in range(int(rng.poisson(near_duplicates)))
        ]
        for scene, kind in members:
            scenes.append(scene)
            family.append(fam)
            change.append(kind)
        fam += 1
    order = rng.permutation(len(scenes))[:n]
    return [scenes[i] for i in order], [family[i] for i in order], [change[i] for i in order]


def make_prototypes(seed, dim):
    rng = np.random.default_rng([seed, 1000])
    return {
        name: dict(zip(table, rng.standard_normal((len(table), dim)).astype(np.float32)))
        for name, table in (
            ("objects", OBJECTS),
            ("colours", COLOURS),
            ("sizes", SIZES),
            ("settings", SETTINGS),
            ("relations", RELATIONS),
        )
    }


def image_features(scene, protos, rng, out, noise=1.0):
    """Fill `out` (36, D) with ReLU'd region features for `scene`, in shuffled region order;
    `noise` scales both noise terms (1: the default data)."""
    dim = out.shape[1]
    k, bases = 0, []
    for cls, col, size in scene["objects"]:
        base = (
            protos["objects"][cls]
            + 0.6 * protos["colours"][col]
            + 0.4 * protos["sizes"][size]
            + INSTANCE_NOISE * noise * rng.standard_normal(dim)
        )
        n = SIZE_REGIONS[size] + int(rng.integers(2))
        out[k : k + n] = rng.uniform(0.6, 1.4, (n, 1)) * base + REGION_NOISE * noise * rng.standard_normal(
            (n, dim)
        )
        bases.append(base)
        k += n
    for i, j, rel in scene["relations"]:  # a union box sees both objects and their arrangement
        out[k] = (
            0.5 * (bases[i] + bases[j])
            + 0.7 * protos["relations"][rel]
            + REGION_NOISE * noise * rng.standard_normal(dim)
        )
        k += 1
    n_bg = N_REGIONS - k
    setting = (rng.random((n_bg, 1)) < 0.7) * protos["settings"][scene["setting"]]
    out[k:] = setting + REGION_NOISE * noise * rng.standard_normal((n_bg, dim))
    np.maximum(out, 0, out=out)
    out[:] = out[rng.permutation(N_REGIONS)]


def _noun_phrase(rng, obj, full=False):
    """'a big red dog'; size and colour are sometimes left out unless `full`."""
    cls, col, size = obj
    words = [_word(rng, SIZES[size])] if full or rng.random() < 0.35 else []
    if full or rng.random() < 0.55:
        words.append(_word(rng, COLOURS[col]))
    words.append(_word(rng, OBJECTS[cls]))
    art = "the" if rng.random() < 0.15 else ("an" if words[0][0] in "aeiou" else "a")
    return " ".join([art] + words)


def _draft(scene, rng):
    objs = scene["objects"]
    i, j, rel = scene["relations"][int(rng.integers(len(scene["relations"])))]
    a, b = _noun_phrase(rng, objs[i]), _noun_phrase(rng, objs[j])
    rel, where = _word(rng, RELATIONS[rel]), _word(rng, SETTINGS[scene["setting"]])
    kind = int(rng.integers(5))
    if kind == 0:
        parts = [a, _pick(rng, VERBS), rel, b] + ([where] if rng.random() < 0.6 else [])
    elif kind == 1:
        parts = [where + ",", a, _pick(rng, VERBS), rel, b]
    elif kind == 2:  # enumerate a subset of the objects, no relation
        idx = np.sort(rng.choice(len(objs), int(rng.integers(2, len(objs) + 1)), replace=False))
        nps = [_noun_phrase(rng, objs[t]) for t in idx]
        listed = ", ".join(nps[:-1]) + " and " + nps[-1]
        parts = [_pick(rng, OPENERS), listed] + ([where] if rng.random() < 0.5 else [])
    elif kind == 3:
        parts = [_pick(rng, OPENERS), a, where]
    else:
        parts = [_pick(rng, OPENERS), a, rel, b]
    if len(" ".join(parts).split()) < 8:
        parts.append(_pick(rng, FILLERS))
    return " ".join(parts)


def _full_description(scene, rng):
    """Every object with its size and colour, chained by its relations, and the setting: 'a big
    red dog on a small white table next to a tiny black cat in the park' (12-34 tokens)."""
    objs = scene["objects"]
    parts = [_pick(rng, OPENERS)] if rng.random() < 0.5 else []
    parts.append(_noun_phrase(rng, objs[0], full=True))
    for _, j, rel in scene["relations"]:  # a chain: object i relates to object i + 1
        parts += [_word(rng, RELATIONS[rel]), _noun_phrase(rng, objs[j], full=True)]
    parts.append(_word(rng, SETTINGS[scene["setting"]]))
    return " ".join(parts)


def make_caption(scene, rng, detail=1.0):
    """One caption of `scene`: with probability `detail` a full description, else one of 8-15
    whitespace tokens describing part of it (which may fit a near-duplicate, or a stranger, as
    well: a false negative for a loss that takes every other image's caption as negative)."""
    full = rng.random() < detail
    for _ in range(1 if full else 50):
        text = _full_description(scene, rng) if full else _draft(scene, rng)
        if full or 8 <= len(text.split()) <= 15:
            break
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + "." if rng.random() < 0.6 else text


def write_split(out_dir, split, n_images, seed, protos, dim, knobs, rows_per_caption=False):
    """Generate and write one split; return its demo_meta.json entry. `knobs`: near_duplicates,
    duplicate_changes, caption_detail, feature_noise."""
    split_idx = SPLITS.index(split)
    scenes, family, change = make_scenes(
        n_images,
        np.random.default_rng([seed, split_idx, 0]),
        knobs["near_duplicates"],
        knobs["duplicate_changes"],
    )
    # Separate generators per aspect so that editing caption code does not change features.
    feat_rng = np.random.default_rng([seed, split_idx, 1])
    cap_rng = np.random.default_rng([seed, split_idx, 2])
    ims = np.empty((n_images, N_REGIONS, dim), dtype=np.float32)
    captions = []
    for k, scene in enumerate(scenes):
        image_features(scene, protos, feat_rng, ims[k], knobs["feature_noise"])
        captions.extend(
            make_caption(scene, cap_rng, knobs["caption_detail"]) for _ in range(CAPTIONS_PER_IMAGE)
        )
    if rows_per_caption:
        ims = np.repeat(ims, CAPTIONS_PER_IMAGE, axis=0)
    with atomic_path(Path(out_dir) / f"{split}_ims.npy") as tmp:
        np.save(tmp, ims)
    write_text_atomic(Path(out_dir) / f"{split}_caps.txt", "\n".join(captions) + "\n")
    return {
        "images": n_images,
        "rows": int(ims.shape[0]),
        "family": family,
        "change": change,
        "scenes": scenes,
    }


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _number_in(low, high, high_included):
    """An argparse type: a float in [low, high] (or [low, high))."""

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low <= value <= high if high_included else low <= value < high):
            bracket = "]" if high_included else ")"
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}{bracket}, got {value}")
        return value

    return parse


_share = _number_in(0, 1, high_included=True)
_non_negative = _number_in(0, 100, high_included=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=_positive_int, default=2000, help="train images")
    p.add_argument("--n-dev", type=_positive_int, default=200, help="dev images")
    p.add_argument("--n-test", type=_positive_int, default=200, help="test images")
    p.add_argument(
        "--n-testall-per-fold",
        type=_positive_int,
        default=100,
        help=f"testall images per fold; testall holds {N_FOLDS} folds",
    )
    p.add_argument("--img-dim", type=_positive_int, default=128, help="region feature size")
    p.add_argument(
        "--dev-rows-per-caption",
        action="store_true",
        help="store one dev image row per caption (Flickr30K layout)",
    )
    p.add_argument(
        "--near-duplicates",
        type=_non_negative,
        default=1.3,
        help="mean number of near-duplicate variants of each scene (Poisson)",
    )
    p.add_argument(
        "--duplicate-changes",
        type=_positive_int,
        default=1,
        help="things (object class, colour, size, relation) a variant changes",
    )
    p.add_argument(
        "--caption-detail",
        type=_share,
        default=1.0,
        help="share of captions naming every object, attribute and relation",
    )
    p.add_argument(
        "--feature-noise",
        type=_non_negative,
        default=1.0,
        help="scale of the region features' noise (1: the default; lower: an easier, more separable set)",
    )
    args = p.parse_args(argv)
    if args.img_dim < 8:
        p.error(f"--img-dim must be >= 8, got {args.img_dim}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")  # numpy seeds must be non-negative
    return args


def main(argv=None):
    args = parse_args(argv)
    remove_stale_temporaries(
        Path(args.out) / "demo_meta.json",
        *(Path(args.out) / f"{s}_{kind}" for s in SPLITS for kind in ("ims.npy", "caps.txt")),
    )
    sizes = {
        "train": args.n_train,
        "dev": args.n_dev,
        "test": args.n_test,
        "testall": N_FOLDS * args.n_testall_per_fold,
    }
    protos = make_prototypes(args.seed, args.img_dim)
    knobs = {
        "near_duplicates": args.near_duplicates,
        "duplicate_changes": args.duplicate_changes,
        "caption_detail": args.caption_detail,
        "feature_noise": args.feature_noise,
    }
    meta = {
        "generator_version": GENERATOR_VERSION,
        "seed": args.seed,
        "img_dim": args.img_dim,
        "regions": N_REGIONS,
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "testall_folds": N_FOLDS,
        "dev_rows_per_caption": args.dev_rows_per_caption,
        "sizes": sizes,
        "knobs": knobs,
        "lexicon": {"objects": {k: v[0] + v[1] for k, v in OBJECTS.items()}},
        "splits": {},
    }
    for split in SPLITS:
        meta["splits"][split] = write_split(
            args.out,
            split,
            sizes[split],
            args.seed,
            protos,
            args.img_dim,
            knobs,
            rows_per_caption=(split == "dev" and args.dev_rows_per_caption),
        )
    write_text_atomic(args.out / "demo_meta.json", json.dumps(meta, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
