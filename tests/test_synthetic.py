"""The built-in synthetic faces: splits, pair sets, determinism, cache and export."""
import os

import numpy as np
import pytest

from virface.data import synthetic
from virface.data.synthetic import (FAMILY_SHARE, FAMILY_SIZE, LATENT_DIM, PAIR_SET_NAMES,
                                    ROLE_LABELED, ROLE_TEST, ROLE_UNLABELED, ROLE_VAL, TRAIT_RANGES,
                                    SyntheticSpec, build_synthetic, draw_identity, draw_nuisance,
                                    draw_training_yaw, draw_yaw, export_synthetic, identity_index, identity_traits,
                                    identity_latents, load_synthetic, render_faces, stack_traits,
                                    traits_from_latent)
from virface.errors import ConfigError, DataError

# 5 x 4 labeled, 7 unlabeled ids with 1-3 images, 20 val ids (2 per fold) and 40 pairs per set,
# 30 test ids (3 per fold) and 60 pairs per set.
TINY = dict(image_size=16, n_labeled_ids=5, images_per_labeled_id=4, n_unlabeled_ids=7,
            unlabeled_images_per_id=(1, 3), n_val_ids=20, val_pairs=40, n_test_ids=30,
            test_pairs=60, profile_prob=0.5)


@pytest.fixture(scope="module")
def tiny():
    return build_synthetic(SyntheticSpec(**TINY))


def all_arrays(faces):
    out = [faces.labeled.images, faces.labeled.labels, faces.unlabeled.images, faces.unlabeled.labels]
    for ps in [*faces.pair_sets.values(), *faces.test_pair_sets.values()]:
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
    assert not np.array_equal(tiny.test_pair_sets["synth_lfw"].images,
                              other.test_pair_sets["synth_lfw"].images)


def test_test_role_defaults_to_the_validation_sizes():
    spec = SyntheticSpec(n_val_ids=40, val_pairs=100)
    assert spec.n_test_ids == 40 and spec.test_pairs == 100
    assert SyntheticSpec(n_val_ids=40, n_test_ids=60).n_test_ids == 60


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
    test = set(np.concatenate(list(tiny.test_identities.values())))
    assert labeled == set(identity_index(ROLE_LABELED, np.arange(5)))
    assert unlabeled == set(identity_index(ROLE_UNLABELED, np.arange(7)))
    assert val <= set(identity_index(ROLE_VAL, np.arange(20))) and len(val) == 20
    assert test <= set(identity_index(ROLE_TEST, np.arange(30))) and len(test) == 30
    roles = [labeled, unlabeled, val, test]
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            assert not a & b


def trait_vector(traits: dict, row=None) -> bytes:
    """One identity's traits as bytes, comparable exactly: every trait, in name order."""
    pick = (lambda v: v) if row is None else (lambda v: v[row])
    return np.concatenate([np.ravel(pick(traits[k])).astype(np.float32) for k in sorted(traits)]).tobytes()


def test_every_held_out_image_has_its_own_identitys_traits_and_none_a_validation_ones(monkeypatch):
    # The renderer sees each image's traits; they must be those its identity index draws, so a
    # test pair set cannot show validation faces under test indices.
    rendered = []
    real_render = synthetic.render_faces

    def recording_render(traits, nuisance, size, *args, **kwargs):
        rendered.append({k: np.array(v) for k, v in traits.items()})
        return real_render(traits, nuisance, size, *args, **kwargs)

    monkeypatch.setattr(synthetic, "render_faces", recording_render)
    faces = build_synthetic(SyntheticSpec(**TINY))
    own = {}                                       # identity index -> its traits, drawn by index
    for role, n in ((ROLE_VAL, 20), (ROLE_TEST, 30)):
        traits = identity_traits(faces.spec.seed, role, np.arange(n))
        own.update({int(identity_index(role, k)): trait_vector(traits, k) for k in range(n)})
    val_traits = {own[int(i)] for i in identity_index(ROLE_VAL, np.arange(20))}
    assert len(val_traits) == 20
    # Pair sets render once each, all their images at once: 2 x 40 rows per validation set,
    # 2 x 60 per test set, in PAIR_SET_NAMES order.
    by_rows = {}
    for traits in rendered:
        by_rows.setdefault(len(traits["skin_tone"]), []).append(traits)
    for rows, identities in ((80, faces.val_identities), (120, faces.test_identities)):
        assert len(by_rows[rows]) == len(PAIR_SET_NAMES)
        for traits, name in zip(by_rows[rows], PAIR_SET_NAMES):
            assert [trait_vector(traits, r) for r in range(rows)] == [own[int(i)] for i in identities[name]]
    test_rows = {trait_vector(t, r) for t in by_rows[120] for r in range(120)}
    assert len(test_rows) == 30 and not test_rows & val_traits
    # The draw by index is the one identity traits come from anywhere (one identity at a time).
    first_test = int(identity_index(ROLE_TEST, 0))
    assert trait_vector(draw_identity(faces.spec.seed, first_test)) == own[first_test]


def test_test_pair_sets_are_their_own_images(tiny):
    assert list(tiny.test_pair_sets) == list(PAIR_SET_NAMES)
    for name in PAIR_SET_NAMES:
        val, test = tiny.pair_sets[name], tiny.test_pair_sets[name]
        assert test.name == name and len(test) == 60 and test.images.shape == (120, 3, 16, 16)
        val_images = {img.numpy().tobytes() for img in val.images}
        assert not any(img.numpy().tobytes() in val_images for img in test.images)


def test_growing_the_labeled_split_keeps_the_other_splits(tiny):
    bigger = build_synthetic(SyntheticSpec(**{**TINY, "n_labeled_ids": 6}))
    assert np.array_equal(bigger.labeled.images[:20], tiny.labeled.images)
    assert np.array_equal(bigger.unlabeled.images, tiny.unlabeled.images)
    for name in PAIR_SET_NAMES:
        assert np.array_equal(bigger.pair_sets[name].images, tiny.pair_sets[name].images)
        assert np.array_equal(bigger.test_pair_sets[name].images, tiny.test_pair_sets[name].images)


def test_growing_the_validation_role_keeps_the_test_pairs(tiny):
    bigger = build_synthetic(SyntheticSpec(**{**TINY, "n_val_ids": 40}))
    for name in PAIR_SET_NAMES:
        assert np.array_equal(bigger.test_pair_sets[name].images, tiny.test_pair_sets[name].images)
        assert not np.array_equal(bigger.pair_sets[name].images, tiny.pair_sets[name].images)


@pytest.mark.parametrize("role", ["val", "test"])
def test_pair_sets_are_ordered_fold_by_fold_same_half_first(tiny, role):
    sets, identities = ((tiny.pair_sets, tiny.val_identities) if role == "val"
                        else (tiny.test_pair_sets, tiny.test_identities))
    n_pairs, n_ids = (40, 20) if role == "val" else (60, 30)
    half = n_pairs // 20                       # per fold: `half` same pairs, then `half` different
    assert list(sets) == ["synth_lfw", "synth_cfp_ff", "synth_cfp_fp"]
    for name, ps in sets.items():
        assert ps.name == name and len(ps) == n_pairs and ps.images.shape == (2 * n_pairs, 3, 16, 16)
        assert ps.issame.tolist() == ([True] * half + [False] * half) * 10
        ids = identities[name]
        assert np.array_equal(ids[0::2] == ids[1::2], ps.issame)
        # Each fold has its own n_ids / 10 identities, as LFW's folds have their own people.
        per_fold = 4 * half
        fold_ids = [set(ids[per_fold * f:per_fold * (f + 1)]) for f in range(10)]
        assert all(len(f) <= n_ids // 10 for f in fold_ids)
        assert len(set().union(*fold_ids)) == sum(len(f) for f in fold_ids)


@pytest.mark.parametrize("role", ["val", "test"])
def test_pair_poses(tiny, role):
    def profile(yaw):
        return np.abs(yaw) >= 45

    yaws = tiny.val_yaw if role == "val" else tiny.test_yaw
    fp, ff, lfw = (yaws[n] for n in ("synth_cfp_fp", "synth_cfp_ff", "synth_lfw"))
    assert not profile(fp[0::2]).any() and profile(fp[1::2]).all()
    assert np.abs(fp[0::2]).max() <= 30
    assert np.abs(fp[1::2]).min() >= 60 and np.abs(fp[1::2]).max() <= 80
    assert not profile(ff).any() and np.abs(ff).max() <= 30
    assert profile(lfw).any() and not profile(lfw).all()     # profile_prob 0.5: a mix
    # ... drawn for every image as training poses are, not frontal-then-profile as CFP-FP's
    assert profile(lfw[0::2]).any() and not profile(lfw[1::2]).all()


def test_profile_prob_sets_the_training_poses():
    spec = dict(TINY, n_unlabeled_ids=3, n_val_ids=2, val_pairs=20, n_test_ids=2, test_pairs=20)
    frontal = build_synthetic(SyntheticSpec(**{**spec, "profile_prob": 0.0}))
    side = build_synthetic(SyntheticSpec(**{**spec, "profile_prob": 1.0}))
    assert (np.abs(frontal.labeled_yaw) < 45).all() and (np.abs(frontal.unlabeled_yaw) < 45).all()
    assert (np.abs(side.labeled_yaw) >= 45).all() and (np.abs(side.unlabeled_yaw) >= 45).all()
    assert (np.abs(side.labeled_yaw) <= 85).all()


def test_training_yaw_is_a_continuum_with_the_asked_profile_share():
    # 20,000 draws at profile_prob 0.2: 20 % in 45-85 degrees (binomial sd 0.3 %), the rest a
    # half-normal (sd 20) below 45, folded back in: every 5-degree bin from 0 to 85 is used.
    yaw = draw_training_yaw(np.random.default_rng(0), 20_000, 0.2)
    assert abs((np.abs(yaw) >= 45).mean() - 0.2) < 0.01
    assert abs((yaw > 0).mean() - 0.5) < 0.02
    counts, _ = np.histogram(np.abs(yaw), bins=np.arange(0, 90, 5))
    assert (counts > 100).all()
    # Half-normal sd 20 below 45: P(|x| < 20) = 0.683 of the 80 % frontal-ish draws (plus the
    # 2.4 % beyond 45 redrawn uniformly, 0.4 % of which lands below 20).
    assert abs((np.abs(yaw) < 20).mean() - 0.8 * (0.683 + 0.024 * 20 / 45)) < 0.015


def test_shallow_identities_are_posed_like_deep_ones():
    # Same nuisance distribution: the profile share and the yaw spread of the unlabeled images
    # match the labeled ones (and profile_prob), and shallow identities with 2-3 images include
    # frontal + profile pairs.
    faces = build_synthetic(SyntheticSpec(image_size=16, n_labeled_ids=40, images_per_labeled_id=10,
                                          n_unlabeled_ids=400, unlabeled_images_per_id=(2, 3),
                                          n_val_ids=2, val_pairs=20, n_test_ids=2, test_pairs=20,
                                          profile_prob=0.3))
    lab, unl = np.abs(faces.labeled_yaw), np.abs(faces.unlabeled_yaw)     # 400 and ~1000 images
    for yaw in (lab, unl):
        assert abs((yaw >= 45).mean() - 0.3) < 0.07          # 3 binomial sds at n = 400
    assert abs(np.median(lab) - np.median(unl)) < 8
    labels = faces.unlabeled.labels
    mixed = [c for c in range(faces.unlabeled.num_classes)
             if len(set((unl[labels == c] >= 45).tolist())) == 2]
    # P(a 2-3 image identity mixes poses) = 1 - 0.3^k - 0.7^k: 0.42 (k=2) to 0.63 (k=3).
    assert 0.3 * 400 < len(mixed) < 0.75 * 400


def test_identity_latents_are_standard_normal_and_families_share_half():
    # 4,000 identities = 1,000 families of 4. Per dimension: mean 0 (sd of the mean about
    # sqrt(0.5/1000 + 0.5/4000) = 0.025) and variance 1. Siblings' latents correlate by
    # FAMILY_SHARE (0.5), members of different families by 0.
    z = identity_latents(0, ROLE_LABELED, np.arange(4000))
    assert z.shape == (4000, LATENT_DIM) and FAMILY_SIZE == 4 and FAMILY_SHARE == 0.5
    assert np.abs(z.mean(0)).max() < 0.12 and np.abs(z.var(0) - 1).max() < 0.15
    siblings = (z[0::4] * z[1::4]).mean()
    strangers = (z[0:-4:4] * z[5::4]).mean()     # identity 4f and 4f+5: different families
    assert abs(siblings - 0.5) < 0.05 and abs(strangers) < 0.05
    # The latent is the identity's alone: the same k in another role or seed is someone else.
    assert not np.allclose(z[:4], identity_latents(0, ROLE_UNLABELED, np.arange(4)))
    assert not np.allclose(z[:4], identity_latents(1, ROLE_LABELED, np.arange(4)))


def test_traits_use_their_ranges():
    # The fixed map squashes each trait to about uniform over its range: over 3,000 identities
    # every plain trait stays inside its range and its 5-95 % quantiles span most of it
    # (0.9 of it for a uniform).
    traits = traits_from_latent(identity_latents(0, ROLE_VAL, np.arange(3000)))
    switches = {"hair_len", "beard", "glasses", "mark"}      # turned into shapes / on-off flags
    checked = 0
    for name, lo, hi in TRAIT_RANGES:
        if name in switches or name.startswith("region_"):
            continue
        values = traits[name]
        q5, q95 = np.quantile(values, [0.05, 0.95])
        assert lo - 1e-6 <= values.min() and values.max() <= hi + 1e-6, name
        assert q95 - q5 > 0.7 * (hi - lo), name
        checked += 1
    assert checked > 40
    for key in ("region_light", "region_red"):
        assert traits[key].shape == (3000, 18)


def test_no_single_latent_dimension_decides_a_trait():
    # Entangled: each trait mixes many latent dimensions (none explains more than 40 % of a
    # trait's variance) and each latent dimension moves most traits.
    z = identity_latents(0, ROLE_VAL, np.arange(3000))
    traits = traits_from_latent(z)
    plain = [n for n, _, _ in TRAIT_RANGES if n in traits and n not in ("hair_len", "beard", "glasses", "mark")]
    values = np.stack([traits[n] for n in plain], 1)
    corr = np.corrcoef(np.concatenate([z, values], 1).T)[:LATENT_DIM, LATENT_DIM:]
    assert (corr ** 2).max() < 0.4
    base = z[:1]
    moved = []
    for j in range(LATENT_DIM):
        nudged = base.copy()
        nudged[0, j] += 0.5
        after = traits_from_latent(nudged)
        before = traits_from_latent(base)
        moved.append(np.mean([abs(after[n][0] - before[n][0]) > 1e-3 * (hi - lo)
                              for n, lo, hi in TRAIT_RANGES if n in plain]))
    assert min(moved) > 0.5


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
        assert np.array_equal(first.test_yaw[name], cached.test_yaw[name])
        assert np.array_equal(first.test_identities[name], cached.test_identities[name])


def test_cache_key_changes_with_any_field():
    base = SyntheticSpec(**TINY)
    assert base.cache_key() == SyntheticSpec(**TINY).cache_key()
    assert base.cache_key() != SyntheticSpec(**{**TINY, "occlusion_prob": 0.2}).cache_key()
    assert base.cache_key() != SyntheticSpec(**{**TINY, "test_pairs": 80}).cache_key()


def test_a_cache_from_another_renderer_version_is_not_reused(tmp_path, monkeypatch):
    spec = SyntheticSpec(**TINY)
    monkeypatch.setattr(synthetic, "RENDERER_VERSION", 3)
    old_path = synthetic.cache_path(spec, str(tmp_path))
    with open(old_path, "wb") as f:
        f.write(b"pixels of renderer 3")
    monkeypatch.setattr(synthetic, "RENDERER_VERSION", 4)
    assert synthetic.cache_path(spec, str(tmp_path)) != old_path
    load_synthetic(spec, cache_dir=str(tmp_path))
    assert len(os.listdir(tmp_path)) == 2           # v3's file untouched, v4's written beside it
    with open(old_path, "rb") as f:
        assert f.read() == b"pixels of renderer 3"


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
    for folder, prefix, sets in (("val", "", tiny.pair_sets), ("test", "test_", tiny.test_pair_sets)):
        for name, ps in sets.items():
            assert paths[prefix + name] == str(tmp_path / "out" / folder / f"{name}.bin")
            back = load_bin(paths[prefix + name])
            assert np.array_equal(back.images.numpy(), ps.images.numpy())
            assert np.array_equal(back.issame, ps.issame)
    assert sorted(os.listdir(tmp_path / "out" / "test")) == sorted(f"{n}.bin" for n in PAIR_SET_NAMES)


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
