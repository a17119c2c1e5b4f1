"""The built-in synthetic faces: splits, pair sets, determinism, cache and export."""
import os

import numpy as np
import pytest

from virface.data import synthetic
from virface.data.synthetic import (PAIR_SET_NAMES, ROLE_LABELED, ROLE_UNLABELED, ROLE_VAL,
                                    SyntheticSpec, build_synthetic, draw_identity, draw_nuisance,
                                    draw_yaw, export_synthetic, identity_index, load_synthetic,
                                    render_faces, stack_traits)
from virface.errors import ConfigError, DataError

# 5 x 4 labeled, 7 unlabeled ids with 1-3 images, 20 val ids (2 per fold), 40 pairs per set.
TINY = dict(image_size=16, n_labeled_ids=5, images_per_labeled_id=4, n_unlabeled_ids=7,
            unlabeled_images_per_id=(1, 3), n_val_ids=20, val_pairs=40, profile_prob=0.5)


@pytest.fixture(scope="module")
def tiny():
    return build_synthetic(SyntheticSpec(**TINY))


def all_arrays(faces):
    out = [faces.labeled.images, faces.labeled.labels, faces.unlabeled.images, faces.unlabeled.labels]
    for ps in faces.pair_sets.values():
        out += [ps.images.numpy(), ps.issame]
    return out


def test_same_spec_gives_identical_arrays(tiny):
    again = build_synthetic(SyntheticSpec(**TINY))
    for a, b in zip(all_arrays(tiny), all_arrays(again)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_another_seed_gives_other_images(tiny):
    other = build_synthetic(SyntheticSpec(**{**TINY, "seed": 1}))
    assert not np.array_equal(tiny.labeled.images, other.labeled.images)
    assert not np.array_equal(tiny.pair_sets["synth_lfw"].images, other.pair_sets["synth_lfw"].images)


def test_split_sizes_and_labels(tiny):
    assert tiny.labeled.name == "synthetic:labeled" and tiny.unlabeled.name == "synthetic:unlabeled"
    assert tiny.labeled.images.shape == (20, 16, 16, 3) and tiny.labeled.images.dtype == np.uint8
    assert tiny.labeled.num_classes == 5
    assert np.array_equal(np.bincount(tiny.labeled.labels), [4, 4, 4, 4, 4])
    # Every unlabeled identity has 1..3 images, so all 7 appear.
    counts = np.bincount(tiny.unlabeled.labels)
    assert tiny.unlabeled.num_classes == 7 and counts.min() >= 1 and counts.max() <= 3
    assert len(tiny.unlabeled) == counts.sum() == len(tiny.unlabeled_yaw)
    assert tiny.labeled.read(0).shape == (3, 16, 16)


def test_roles_use_disjoint_identities(tiny):
    labeled, unlabeled = set(tiny.labeled.classes), set(tiny.unlabeled.classes)
    val = set(np.concatenate(list(tiny.val_identities.values())))
    assert labeled == set(identity_index(ROLE_LABELED, np.arange(5)))
    assert unlabeled == set(identity_index(ROLE_UNLABELED, np.arange(7)))
    assert val <= set(identity_index(ROLE_VAL, np.arange(20)))
    assert not labeled & unlabeled and not labeled & val and not unlabeled & val


def test_growing_the_labeled_split_keeps_the_other_splits(tiny):
    bigger = build_synthetic(SyntheticSpec(**{**TINY, "n_labeled_ids": 6}))
    assert np.array_equal(bigger.labeled.images[:20], tiny.labeled.images)
    assert np.array_equal(bigger.unlabeled.images, tiny.unlabeled.images)
    for name in PAIR_SET_NAMES:
        assert np.array_equal(bigger.pair_sets[name].images, tiny.pair_sets[name].images)


def test_pair_sets_are_ordered_fold_by_fold_same_half_first(tiny):
    assert list(tiny.pair_sets) == ["synth_lfw", "synth_cfp_ff", "synth_cfp_fp"]
    fold_pattern = [True, True, False, False]          # 40 pairs / 10 folds = 2 same + 2 different
    for name, ps in tiny.pair_sets.items():
        assert ps.name == name and len(ps) == 40 and ps.images.shape == (80, 3, 16, 16)
        assert ps.issame.tolist() == fold_pattern * 10
        ids = tiny.val_identities[name]
        assert np.array_equal(ids[0::2] == ids[1::2], ps.issame)
        # 20 val identities: each fold has its own 2, as LFW's folds have their own people.
        fold_ids = [set(ids[8 * f:8 * f + 8]) for f in range(10)]
        assert all(len(f) <= 2 for f in fold_ids)
        assert len(set().union(*fold_ids)) == sum(len(f) for f in fold_ids)


def test_pair_poses(tiny):
    def profile(yaw):
        return np.abs(yaw) >= 45

    fp, ff, lfw = (tiny.val_yaw[n] for n in ("synth_cfp_fp", "synth_cfp_ff", "synth_lfw"))
    assert not profile(fp[0::2]).any() and profile(fp[1::2]).all()
    assert np.abs(fp[0::2]).max() <= 30
    assert np.abs(fp[1::2]).min() >= 60 and np.abs(fp[1::2]).max() <= 80
    assert not profile(ff).any()
    assert profile(lfw).any() and not profile(lfw).all()     # profile_prob 0.5: a mix


def test_profile_prob_sets_the_training_poses():
    spec = dict(TINY, n_unlabeled_ids=3, n_val_ids=2, val_pairs=20)
    frontal = build_synthetic(SyntheticSpec(**{**spec, "profile_prob": 0.0}))
    side = build_synthetic(SyntheticSpec(**{**spec, "profile_prob": 1.0}))
    assert (np.abs(frontal.labeled_yaw) <= 30).all() and (np.abs(frontal.unlabeled_yaw) <= 30).all()
    assert (np.abs(side.labeled_yaw) >= 60).all() and (np.abs(side.unlabeled_yaw) >= 60).all()


def test_background_comes_from_the_image_stream_only():
    # Same image draws, four different identities: the corners (background) are identical,
    # while the face differs. Blur and occluders are off so nothing smears into the corners.
    rng = np.random.default_rng(3)
    nuisance = draw_nuisance(rng, draw_yaw(rng, np.zeros(1, bool)), occlusion_prob=0.0)
    nuisance.update(blur=np.zeros(1, np.float32), scale=np.full(1, 0.9, np.float32),
                    tx=np.zeros(1, np.float32), ty=np.zeros(1, np.float32))
    nuisance = {k: np.repeat(v, 4, axis=0) for k, v in nuisance.items()}
    traits = stack_traits([draw_identity(0, identity) for identity in (1, 2, 3, 4)])
    images = render_faces(traits, nuisance, 32)
    corners = images[:, [0, 0, -1], [0, -1, 0]]          # top-left, top-right, bottom-left
    assert (corners == corners[:1]).all()
    assert len({images[i, 8:24, 8:24].tobytes() for i in range(4)}) == 4


def test_background_colour_does_not_predict_identity():
    # Fraction of the corner colour's variance explained by identity (one-way ANOVA R^2). With 12
    # identities x 8 images and no identity information it is about 11/95 = 0.12 by chance;
    # a background drawn from the identity's stream would give close to 1.
    faces = build_synthetic(SyntheticSpec(**{**TINY, "n_labeled_ids": 12, "images_per_labeled_id": 8,
                                             "n_unlabeled_ids": 0, "n_val_ids": 2, "val_pairs": 20}))
    corner = faces.labeled.images[:, 0, 0].astype(float)
    labels = faces.labeled.labels
    means = np.stack([corner[labels == c].mean(0) for c in range(12)])[labels]
    r2 = ((means - corner.mean(0)) ** 2).sum() / ((corner - corner.mean(0)) ** 2).sum()
    assert r2 < 0.35


@pytest.mark.parametrize("field, value", [
    ("image_size", 24), ("image_size", 0), ("seed", -1), ("n_labeled_ids", 1),
    ("images_per_labeled_id", 0), ("n_unlabeled_ids", -1), ("unlabeled_images_per_id", (0, 2)),
    ("unlabeled_images_per_id", (3, 1)), ("unlabeled_images_per_id", (1,)), ("n_val_ids", 1),
    ("val_pairs", 30), ("val_pairs", 0), ("profile_prob", 1.5), ("occlusion_prob", -0.1),
    ("supersample", 0), ("n_labeled_ids", 2.5)])
def test_invalid_spec_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        SyntheticSpec(**{field: value})


def test_spec_from_dict_rejects_unknown_keys_and_takes_lists():
    with pytest.raises(ConfigError, match="num_ids"):
        SyntheticSpec.from_dict({"num_ids": 8})
    spec = SyntheticSpec.from_dict({"unlabeled_images_per_id": [2, 4]})
    assert spec.unlabeled_images_per_id == (2, 4)


def test_cache_round_trip(tmp_path, monkeypatch):
    spec = SyntheticSpec(**TINY)
    first = load_synthetic(spec, cache_dir=str(tmp_path))
    # One file under its hashed name; no temporary file left behind.
    assert os.listdir(tmp_path) == [os.path.basename(synthetic.cache_path(spec, str(tmp_path)))]

    def no_build(_spec):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(synthetic, "build_synthetic", no_build)
    cached = load_synthetic(spec, cache_dir=str(tmp_path))
    for a, b in zip(all_arrays(first), all_arrays(cached)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert np.array_equal(first.labeled.classes, cached.labeled.classes)
    for name in PAIR_SET_NAMES:
        assert np.array_equal(first.val_yaw[name], cached.val_yaw[name])
        assert np.array_equal(first.val_identities[name], cached.val_identities[name])


def test_cache_key_changes_with_any_field():
    base = SyntheticSpec(**TINY)
    assert base.cache_key() == SyntheticSpec(**TINY).cache_key()
    assert base.cache_key() != SyntheticSpec(**{**TINY, "occlusion_prob": 0.2}).cache_key()


def test_corrupt_cache_file_is_rebuilt(tmp_path, tiny):
    spec = SyntheticSpec(**TINY)
    path = synthetic.cache_path(spec, str(tmp_path))
    with open(path, "wb") as f:
        f.write(b"not a zip file")
    faces = load_synthetic(spec, cache_dir=str(tmp_path))
    assert np.array_equal(faces.labeled.images, tiny.labeled.images)
    assert os.path.getsize(path) > 1000


def test_export_is_read_back_by_the_real_readers(tmp_path, tiny):
    from virface.data.loading import open_image_source
    from virface.evaluation.verification import load_bin

    paths = export_synthetic(tiny, str(tmp_path / "out"))
    for split, source in (("labeled", tiny.labeled), ("unlabeled", tiny.unlabeled)):
        for key in (f"{split}_rec", f"{split}_meta"):
            back = open_image_source(paths[key])
            assert len(back) == len(source) and back.num_classes == source.num_classes
            got = sorted((int(back.classes[back.labels[i]]), back.read(i).numpy().tobytes())
                         for i in range(len(back)))
            want = sorted((int(source.classes[source.labels[i]]), source.read(i).numpy().tobytes())
                          for i in range(len(source)))
            assert got == want
    for name, ps in tiny.pair_sets.items():
        assert paths[name] == str(tmp_path / "out" / "val" / f"{name}.bin")
        back = load_bin(paths[name])
        assert np.array_equal(back.images.numpy(), ps.images.numpy())
        assert np.array_equal(back.issame, ps.issame)


def test_export_refuses_a_non_empty_folder(tmp_path, tiny):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder"):
        export_synthetic(tiny, str(tmp_path))
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_an_image_does_not_depend_on_its_batch():
    # 70 rows span two render batches; the optional traits (glasses, beard, occluders) of the
    # other rows change which layers a batch draws, but never a row's own pixels.
    rng = np.random.default_rng(5)
    traits = stack_traits([draw_identity(0, i) for i in range(70)])
    nuisance = draw_nuisance(rng, draw_yaw(rng, rng.random(70) < 0.5), occlusion_prob=0.5)
    together = render_faces(traits, nuisance, 16)
    for row in (0, 3, 66):
        alone = render_faces({k: v[row:row + 1] for k, v in traits.items()},
                             {k: v[row:row + 1] for k, v in nuisance.items()}, 16)
        assert np.array_equal(alone[0], together[row])


def test_spec_accepts_numpy_integers_as_plain_ints():
    spec = SyntheticSpec(**{**TINY, "seed": np.int64(3), "unlabeled_images_per_id": [np.int64(1), 2]})
    assert type(spec.seed) is int and spec.unlabeled_images_per_id == (1, 2)
    assert len(spec.cache_key()) == 20
