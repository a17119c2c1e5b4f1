import math
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from virface.errors import PairSetError
from virface.evaluation.pairs import PairSet
from virface.evaluation.verification import (evaluate_pair_set, evaluate_pair_sets, extract_embeddings,
                                             load_bin, load_cfp_folder, load_lfw_folder,
                                             open_pair_set, verify_10fold, write_bin)


def solid(r, g, b, size=4):
    image = torch.empty((3, size, size), dtype=torch.uint8)
    image[0], image[1], image[2] = r, g, b
    return image


def png_bytes(image):
    return encode_png(image).numpy().tobytes()


def save(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png_bytes(image))


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


# ----------------------------------------------------------------------------- .bin

def test_load_bin_accepts_bytes_and_cv2_style_uint8_arrays(tmp_path):
    a, b = solid(200, 10, 20), solid(5, 6, 7)
    as_array = np.frombuffer(png_bytes(b), dtype=np.uint8).reshape(-1, 1)  # cv2.imencode shape
    dump(tmp_path / "t.bin", ([png_bytes(a), as_array, png_bytes(b), png_bytes(a)],
                              [True, False]))
    pairs = load_bin(str(tmp_path / "t.bin"))
    assert pairs.name == "t"
    assert pairs.images.shape == (4, 3, 4, 4)
    assert pairs.images[1, :, 0, 0].tolist() == [5, 6, 7]
    assert pairs.issame.tolist() == [True, False]


def test_load_bin_resizes_to_image_size(tmp_path):
    dump(tmp_path / "t.bin", ([png_bytes(solid(9, 8, 7))] * 2, [True]))
    pairs = load_bin(str(tmp_path / "t.bin"), image_size=2)
    assert pairs.images.shape == (2, 3, 2, 2)
    assert pairs.images[0, :, 1, 1].tolist() == [9, 8, 7]


def test_load_bin_with_odd_image_count_names_the_file(tmp_path):
    dump(tmp_path / "odd.bin", ([png_bytes(solid(1, 2, 3))] * 3, [True]))
    with pytest.raises(PairSetError, match=r"odd\.bin: odd number of images \(3\)"):
        load_bin(str(tmp_path / "odd.bin"))


def test_load_bin_with_issame_length_mismatch_names_the_file(tmp_path):
    dump(tmp_path / "mm.bin", ([png_bytes(solid(1, 2, 3))] * 4, [True, False, True]))
    with pytest.raises(PairSetError, match=r"mm\.bin: 4 images make 2 pairs.*3 entries"):
        load_bin(str(tmp_path / "mm.bin"))


def test_load_bin_corrupt_image_names_file_and_index(tmp_path):
    dump(tmp_path / "c.bin", ([png_bytes(solid(1, 2, 3)), b"garbage"], [True]))
    with pytest.raises(PairSetError, match=r"c\.bin image 1"):
        load_bin(str(tmp_path / "c.bin"))


def test_write_bin_round_trips_and_stores_bytes_and_bools(tmp_path):
    images = torch.stack([solid(1, 2, 3), solid(4, 5, 6), solid(7, 8, 9), solid(0, 0, 0)])
    path = write_bin(PairSet("x", images, np.array([True, False])), str(tmp_path / "x.bin"))
    with open(path, "rb") as f:
        bins, issame = pickle.load(f)
    assert all(isinstance(b, bytes) for b in bins) and issame == [True, False]
    back = load_bin(path)
    assert torch.equal(back.images, images) and back.issame.tolist() == [True, False]
    assert os.listdir(tmp_path) == ["x.bin"]  # no temporary file left


# ----------------------------------------------------------------------------- LFW and CFP

def make_lfw(root, pairs_text, people):
    """people: {name: number of images}; image k of a person has red = 10 * k."""
    for person, count in people.items():
        for k in range(1, count + 1):
            save(os.path.join(root, person, f"{person}_{k:04d}.jpg"), solid(10 * k, 0, 0))
    with open(os.path.join(root, "pairs.txt"), "w") as f:
        f.write(pairs_text)


def test_lfw_folder_reads_same_and_different_pairs_in_file_order(tmp_path):
    make_lfw(str(tmp_path), "1 1\nAnn 1 2\nAnn 2 Bo 1\n", {"Ann": 2, "Bo": 1})
    pairs = load_lfw_folder(str(tmp_path))
    assert pairs.issame.tolist() == [True, False]
    assert pairs.images[:, 0, 0, 0].tolist() == [10, 20, 20, 10]


def test_lfw_folder_without_header_line(tmp_path):
    make_lfw(str(tmp_path), "Ann 1 2\n", {"Ann": 2})
    assert load_lfw_folder(str(tmp_path)).issame.tolist() == [True]


def test_lfw_missing_image_is_an_error_not_a_shift(tmp_path):
    # the reference skipped pairs with a missing image, so every later pair moved a fold
    make_lfw(str(tmp_path), "2 1\nAnn 1 3\nAnn 1 Bo 2\nAnn 1 2\n", {"Ann": 2, "Bo": 1})
    with pytest.raises(PairSetError) as info:
        load_lfw_folder(str(tmp_path))
    message = str(info.value)
    assert "2 images are missing" in message
    assert "Ann_0003.jpg" in message and "Bo_0002.jpg" in message


def test_lfw_malformed_line_names_file_and_line(tmp_path):
    make_lfw(str(tmp_path), "10 300\nAnn 1 2\nAnn one 2\n", {"Ann": 2})
    with pytest.raises(PairSetError, match=r"pairs\.txt:3: .*'Ann one 2'"):
        load_lfw_folder(str(tmp_path))


def make_cfp(root):
    """Frontal images 1..2 (red 1, 2), profile images 1..2 (red 101, 102); two splits."""
    proto = os.path.join(root, "Protocol")
    for k in (1, 2):
        save(os.path.join(root, "Data", "f", f"{k}.png"), solid(k, 0, 0))
        save(os.path.join(root, "Data", "p", f"{k}.png"), solid(100 + k, 0, 0))
    os.makedirs(proto, exist_ok=True)
    with open(os.path.join(proto, "Pair_list_F.txt"), "w") as f:
        f.write("1 ../Data/f/1.png\n2 ../Data/f/2.png\n")
    with open(os.path.join(proto, "Pair_list_P.txt"), "w") as f:
        f.write("1 ../Data/p/1.png\n2 ../Data/p/2.png\n")
    lists = {("01", "same"): "1,1\n", ("01", "diff"): "1,2\n",
             ("02", "same"): "2,2\n", ("02", "diff"): "2,1\n"}
    for protocol in ("FF", "FP"):
        for (split, kind), text in lists.items():
            folder = os.path.join(proto, "Split", protocol, split)
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"{kind}.txt"), "w") as f:
                f.write(text)


def test_cfp_fp_pairs_frontal_with_profile_split_by_split(tmp_path):
    make_cfp(str(tmp_path))
    pairs = load_cfp_folder(str(tmp_path), "FP")
    assert pairs.name == "cfp_fp"
    assert pairs.issame.tolist() == [True, False, True, False]
    assert pairs.images[:, 0, 0, 0].tolist() == [1, 101, 1, 102, 2, 102, 2, 101]


def test_cfp_ff_pairs_index_the_frontal_list_twice(tmp_path):
    make_cfp(str(tmp_path))
    pairs = load_cfp_folder(str(tmp_path), "FF")
    assert pairs.images[:, 0, 0, 0].tolist() == [1, 1, 1, 2, 2, 2, 2, 1]


def test_open_pair_set_picks_the_format_from_the_path(tmp_path):
    make_cfp(str(tmp_path / "cfp"))
    make_lfw(str(tmp_path / "lfw"), "Ann 1 1\n", {"Ann": 1})
    dump(tmp_path / "agedb_30.bin", ([png_bytes(solid(1, 2, 3))] * 2, [True]))
    assert open_pair_set("CFP_FP", str(tmp_path / "cfp")).images[1, 0, 0, 0] == 101
    assert open_pair_set("cfp_ff", str(tmp_path / "cfp")).images[1, 0, 0, 0] == 1
    assert open_pair_set("lfw", str(tmp_path / "lfw")).issame.tolist() == [True]
    assert open_pair_set("agedb_30", str(tmp_path / "agedb_30.bin")).name == "agedb_30"
    assert open_pair_set("cfpfp", str(tmp_path / "cfp")).images[1, 0, 0, 0] == 101
    with pytest.raises(PairSetError, match=r"cfp_fp="):
        open_pair_set("cfp", str(tmp_path / "cfp"))
    with pytest.raises(PairSetError, match=r"\.bin file, an LFW folder.*CFP folder"):
        open_pair_set("x", str(tmp_path / "nothing_here"))


# ----------------------------------------------------------------------------- 10-fold protocol

def pairs_at_distances(distances):
    """1-D embeddings (0, sqrt(d)) whose squared distance is d."""
    d = torch.tensor(distances, dtype=torch.float64)
    return torch.zeros(len(d), 1, dtype=torch.float64), d.sqrt().unsqueeze(1)


def test_perfectly_separable_pairs_score_one_in_every_fold():
    # 10 folds of 2 pairs (one same at 0.305, one different at 2.505)
    issame = [True, False] * 10
    result = verify_10fold(pairs_at_distances([0.305, 2.505] * 10), issame, n_folds=10)
    assert result.acc == 1.0 and result.acc_std == 0.0
    # the first threshold above 0.305 wins the tie among every threshold in (0.305, 2.505]
    np.testing.assert_allclose(result.best_thresholds, [0.31] * 10)
    assert result.n_pairs == 20


def test_interleaved_embeddings_give_the_same_result_as_a_pair_tuple():
    emb1, emb2 = pairs_at_distances([0.305, 2.505] * 10)
    interleaved = torch.stack([emb1, emb2], dim=1).reshape(40, 1)
    a = verify_10fold(interleaved, [True, False] * 10)
    b = verify_10fold((emb1, emb2), [True, False] * 10)
    assert a.acc == b.acc and np.array_equal(a.best_thresholds, b.best_thresholds)


def test_one_impostor_below_all_genuine_pairs_costs_one_pair_in_its_fold():
    # fold 1: 5 same at 0.205, then one different at 0.105 and 4 at 1.005
    # fold 2: 5 same at 0.205, 5 different at 1.005
    distances = [0.205] * 5 + [0.105] + [1.005] * 4 + [0.205] * 5 + [1.005] * 5
    issame = ([True] * 5 + [False] * 5) * 2
    result = verify_10fold(pairs_at_distances(distances), issame, n_folds=2, far_target=0.1)
    # Fold 1 is tested with t=0.21 chosen on fold 2: the impostor is accepted, 9/10 right.
    # Fold 2 is tested with fold 1's best t: accuracy is 0.5 for t<=0.105, 0.4 up to 0.205,
    # 0.9 in (0.205, 1.005]; t=0.21 scores fold 2 perfectly.
    np.testing.assert_allclose(result.best_thresholds, [0.21, 0.21])
    assert result.acc == pytest.approx(0.95) and result.acc_std == pytest.approx(0.05)
    # TAR@FAR=0.1. Fold 1: fold 2's FAR is 0 up to t=1.00 and 1 from t=1.01, so t=1.001;
    # on fold 1 that accepts all 5 same (TAR 1) and the impostor (FAR 1/5).
    # Fold 2: fold 1's FAR is 0 at t=0.10 and 0.2 at t=0.11, so t=0.105; on fold 2 it accepts
    # nothing (TAR 0, FAR 0).
    assert result.tar_at_far == pytest.approx(0.5) and result.tar_at_far_std == pytest.approx(0.5)
    assert result.far == pytest.approx(0.1)


def test_each_pair_is_marked_right_or_wrong_at_its_folds_threshold_and_acc_has_its_se():
    # The case above: the impostor at 0.105 (pair 5) is accepted at fold 1's t=0.21; all else right.
    distances = [0.205] * 5 + [0.105] + [1.005] * 4 + [0.205] * 5 + [1.005] * 5
    issame = ([True] * 5 + [False] * 5) * 2
    result = verify_10fold(pairs_at_distances(distances), issame, n_folds=2, far_target=0.1)
    assert result.correct.dtype == bool and result.correct.tolist() == [True] * 5 + [False] + [True] * 14
    # binomial SE over 20 pairs: sqrt(0.95 x 0.05 / 20)
    assert result.acc_se == pytest.approx((0.95 * 0.05 / 20) ** 0.5)


def test_a_threshold_chosen_on_other_folds_can_misclassify_a_same_pair():
    # Fold 1: its same pair at 0.5 is rejected by fold 2's threshold (0.31): one pair wrong,
    # the same one in ``correct``, whatever the accuracy's fold averaging.
    distances = [0.5, 2.5, 0.3, 2.5]
    result = verify_10fold(pairs_at_distances(distances), [True, False, True, False], n_folds=2)
    assert result.correct.tolist() == [False, True, True, True]
    assert result.acc == pytest.approx(0.75)


def test_tar_threshold_is_zero_when_training_far_never_reaches_the_target():
    # every different pair is far beyond the last threshold (3.99), so train FAR stays 0
    result = verify_10fold(pairs_at_distances([0.5, 5.0] * 4), [True, False] * 4,
                           n_folds=2, far_target=0.1)
    assert result.tar_at_far == 0.0 and result.far == 0.0


def test_tar_is_measured_at_far_1e_3_by_default():
    assert verify_10fold(pairs_at_distances([0.305, 2.505] * 2), [True, False] * 2, n_folds=2).far_target == 1e-3


def test_more_folds_than_pairs_is_a_clear_error():
    with pytest.raises(ValueError, match="n_folds must be between 2 and the number of pairs"):
        verify_10fold(pairs_at_distances([0.1, 0.2, 0.3]), [True, False, True], n_folds=10)


def test_verify_10fold_handles_6000_pairs():
    rng = np.random.default_rng(0)
    emb = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(12000, 8))), dim=1)
    result = verify_10fold(emb, rng.random(6000) < 0.5)
    assert result.best_thresholds.shape == (10,) and 0.0 <= result.acc <= 1.0


# ----------------------------------------------------------------------------- embeddings

class TopLeftPixel(torch.nn.Module):
    """Embedding = the (3,) colour of pixel (0, 0); records the mode it ran in."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Identity()
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.inner(x[:, :, 0, 0])


def flip_test_image():
    image = torch.zeros((1, 3, 2, 2), dtype=torch.uint8)
    image[0, :, 0, 0] = torch.tensor([255, 0, 255])  # maps to (1, -1, 1)
    image[0, :, 0, 1] = torch.tensor([255, 255, 0])  # maps to (1, 1, -1)
    return image


def test_flip_adds_the_embedding_of_the_mirrored_image():
    # (1, -1, 1) + (1, 1, -1) = (2, 0, 0), normalised (1, 0, 0)
    emb = extract_embeddings(TopLeftPixel(), flip_test_image(), flip=True)
    torch.testing.assert_close(emb, torch.tensor([[1.0, 0.0, 0.0]]))
    emb = extract_embeddings(TopLeftPixel(), flip_test_image(), flip=False)
    s = 1 / math.sqrt(3)
    torch.testing.assert_close(emb, torch.tensor([[s, -s, s]]))


def test_each_embedding_is_normalised_on_its_own_row_independent_of_the_batch():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, size=(3, 3, 2, 2), dtype=np.uint8))
    alone = extract_embeddings(TopLeftPixel(), images[:1], flip=False)
    in_batch = extract_embeddings(TopLeftPixel(), images, flip=False)
    torch.testing.assert_close(in_batch[:1], alone)
    torch.testing.assert_close(in_batch.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(extract_embeddings(TopLeftPixel(), images, batch_size=1,
                                                  flip=False), in_batch)
    # the reference's normalisation over dim 0 would make row 0 depend on rows 1 and 2
    raw = (images[:, :, 0, 0].float() / 255 - 0.5) / 0.5
    dim0 = torch.nn.functional.normalize(raw, dim=0)
    assert not torch.allclose(dim0[:1], torch.nn.functional.normalize(raw[:1], dim=0))


def test_extraction_runs_in_eval_mode_and_restores_every_module_mode():
    backbone = TopLeftPixel()
    backbone.train()
    backbone.inner.eval()
    extract_embeddings(backbone, flip_test_image())
    assert backbone.modes == [False, False]
    assert backbone.training is True and backbone.inner.training is False


def test_evaluate_pair_set_scores_a_colour_matching_backbone_perfectly():
    red, green = solid(255, 0, 0, size=2), solid(0, 255, 0, size=2)
    images, issame = [], []
    for k in range(10):
        images += [red, red, red, green]
        issame += [True, False]
    pairs = PairSet("colours", torch.stack(images), np.array(issame))
    result = evaluate_pair_set(TopLeftPixel(), pairs, batch_size=7)
    # same: distance 0; different: (1,-1,-1) vs (-1,1,-1) normalised, 2 - 2 * (-1/3) = 8/3
    assert result.acc == 1.0 and result.n_pairs == 20
    np.testing.assert_allclose(result.best_thresholds, [0.01] * 10)


def test_per_pair_correctness_marks_exactly_the_pairs_the_fold_threshold_gets_wrong():
    # 20 pairs, 2-d unit embeddings: same pairs at distance^2 0.02, different ones at 2.0, so
    # any fold's threshold separates them; pair 7 (same) is given a distance of 2.0: it alone fails.
    rng = np.random.default_rng(0)
    issame = np.array([True, False] * 10)
    angles = rng.uniform(0, 2 * np.pi, 20)
    a = np.stack([np.cos(angles), np.sin(angles)], 1)
    offset = np.where(issame, 0.1, np.pi / 2)
    offset[6] = np.pi / 2           # pair index 6 is the 7th pair, a same pair, placed far apart
    b = np.stack([np.cos(angles + offset), np.sin(angles + offset)], 1)
    result = verify_10fold((torch.tensor(a), torch.tensor(b)), issame, n_folds=5)
    assert result.correct.dtype == bool and result.correct.shape == (20,)
    assert np.flatnonzero(~result.correct).tolist() == [6]
    assert result.acc == pytest.approx(result.correct.mean()) == pytest.approx(19 / 20)


class LeftHalfMean(torch.nn.Module):
    """An embedding that sees only the left half of the image, so a flip changes it."""

    def forward(self, x):
        left = x[..., : x.shape[-1] // 2]
        return torch.stack([left.mean((1, 2, 3)), left[:, 0].mean((1, 2)), torch.ones(x.shape[0])], 1)


def test_a_pair_set_is_scored_with_flips_10_folds_and_tar_at_far_1e_3_by_default():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (80, 3, 8, 8), dtype=torch.uint8, generator=g)
    pair_set = PairSet("mine", images, np.arange(40) % 2 == 0)
    net = LeftHalfMean()
    default = evaluate_pair_set(net, pair_set)
    explicit = evaluate_pair_set(net, pair_set, flip=True, n_folds=10, far_target=1e-3)
    assert default.acc == explicit.acc and default.tar_at_far == explicit.tar_at_far
    assert default.far_target == 1e-3
    assert np.array_equal(default.best_thresholds, explicit.best_thresholds)
    assert len(default.best_thresholds) == 10
    assert torch.equal(extract_embeddings(net, images), extract_embeddings(net, images, flip=True))
    assert not torch.equal(extract_embeddings(net, images, flip=True), extract_embeddings(net, images, flip=False))
    # Every set under its own name, with the prefix given, nothing else.
    metrics = evaluate_pair_sets(net, {"mine": pair_set})
    assert set(metrics) == {"mine_acc", "mine_acc_se", "mine_acc_std", "mine_tar_far1e-3"}
    assert metrics["mine_acc"] == default.acc and metrics["mine_tar_far1e-3"] == default.tar_at_far
    assert set(evaluate_pair_sets(net, {"mine": pair_set}, prefix="test_")) == {
        "test_mine_acc", "test_mine_acc_se", "test_mine_acc_std", "test_mine_tar_far1e-3"}


def test_blank_lines_inside_pair_lists_are_skipped_not_the_end_of_the_list(tmp_path):
    make_lfw(str(tmp_path / "lfw"), "1 2\n\nAnn 1 2\n\nAnn 2 Bo 1\n", {"Ann": 2, "Bo": 1})
    lfw = load_lfw_folder(str(tmp_path / "lfw"))
    assert lfw.name == "lfw" and lfw.issame.tolist() == [True, False]
    make_cfp(str(tmp_path / "cfp"))
    with open(tmp_path / "cfp" / "Protocol" / "Split" / "FP" / "01" / "same.txt", "w") as f:
        f.write("\n1,1\n\n2,2\n")
    assert load_cfp_folder(str(tmp_path / "cfp"), "FP").issame.tolist() == [True, True, False, True, False]


def test_a_first_line_of_three_numbers_is_a_pair_not_a_header(tmp_path):
    # 'Ann 1 2' style lines are pairs; only a first line of one or two numbers is the header.
    make_lfw(str(tmp_path), "1 2 3\n", {"Ann": 2})
    with pytest.raises(PairSetError, match=r"(?s)2 images are missing .*1_0002\.jpg"):   # person 1, images 2, 3
        load_lfw_folder(str(tmp_path))


def test_folder_pair_sets_are_resized_to_the_image_size_asked_for(tmp_path):
    make_lfw(str(tmp_path / "lfw"), "Ann 1 2\n", {"Ann": 2})
    assert load_lfw_folder(str(tmp_path / "lfw"), image_size=8).images.shape == (2, 3, 8, 8)
    make_cfp(str(tmp_path / "cfp"))
    assert load_cfp_folder(str(tmp_path / "cfp"), "FF", image_size=6).images.shape[2:] == (6, 6)


def test_a_pair_set_takes_issame_as_booleans_and_refuses_images_of_another_layout():
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    ones_and_zeros = PairSet("x", images, [1, 0])               # as other tools write issame
    assert ones_and_zeros.issame.dtype == bool and ones_and_zeros.issame.tolist() == [True, False]
    with pytest.raises(PairSetError, match=r"^x: 4 images make 2 pairs, but the issame list has 3 entries$"):
        PairSet("x", images, [True, False, True])
    with pytest.raises(PairSetError, match=r"^x: odd number of images \(3\); pairs need 2 each$"):
        PairSet("x", images[:3], [True])
    for bad in (images.float(), torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, 3, 2, dtype=torch.uint8)):
        with pytest.raises(PairSetError, match=r"^x: images must be uint8 \(2N, 3, H, W\), got torch\."):
            PairSet("x", bad, [True, False])


# ----------------------------------------------------------------------------- refused inputs
# Each refusal is a PairSetError naming the file (and line) at fault, never a raw traceback.

def test_a_bin_that_is_not_two_lists_of_images_names_the_file_and_the_image(tmp_path):
    path = str(tmp_path / "three.bin")
    dump(path, ([png_bytes(solid(1, 2, 3))] * 2, [True], "extra"))
    with pytest.raises(PairSetError, match=rf"^{path}: expected a pickle of \(bins, issame_list\)$"):
        load_bin(path)
    dump(path, ([png_bytes(solid(1, 2, 3)), 7], [True]))
    with pytest.raises(PairSetError, match=rf"^{path}: image 1 is a int, expected bytes or a numpy uint8 array$"):
        load_bin(path)
    dump(path, ([], []))
    with pytest.raises(PairSetError, match=rf"^{path}: no images$"):
        load_bin(path)
    (tmp_path / "text.bin").write_text("not a pickle")
    with pytest.raises(PairSetError, match=r"text\.bin: cannot read the \.bin pickle"):
        load_bin(str(tmp_path / "text.bin"))


def test_images_of_different_sizes_name_the_file_and_both_sizes_unless_resized(tmp_path):
    path = str(tmp_path / "mixed.bin")
    dump(path, ([png_bytes(solid(1, 2, 3, size=4))] * 3 + [png_bytes(solid(1, 2, 3, size=5))], [True, False]))
    with pytest.raises(PairSetError, match=rf"^{path}: image 3 is \(5, 5\) but image 0 is \(4, 4\); pass image_size"):
        load_bin(path)
    assert load_bin(path, image_size=4).images.shape == (4, 3, 4, 4)
    make_lfw(str(tmp_path / "lfw"), "Ann 1 2\n", {"Ann": 1})
    save(str(tmp_path / "lfw" / "Ann" / "Ann_0002.jpg"), solid(1, 2, 3, size=6))
    with pytest.raises(PairSetError, match=r"lfw/pairs\.txt: image 1 is \(6, 6\) but image 0 is \(4, 4\)"):
        load_lfw_folder(str(tmp_path / "lfw"))


def test_an_lfw_folder_without_pairs_or_with_a_corrupt_image_is_named(tmp_path):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(PairSetError, match=rf"^{tmp_path / 'empty'}: no pairs\.txt \(expected an LFW folder\)$"):
        load_lfw_folder(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "header_only")
    make_lfw(str(tmp_path / "header_only"), "10 300\n", {})
    with pytest.raises(PairSetError, match=r"header_only/pairs\.txt: no pairs$"):
        load_lfw_folder(str(tmp_path / "header_only"))
    make_lfw(str(tmp_path / "corrupt"), "Ann 1 2\n", {"Ann": 2})
    (tmp_path / "corrupt" / "Ann" / "Ann_0002.jpg").write_bytes(b"not an image")
    with pytest.raises(PairSetError, match=r"corrupt/pairs\.txt: image 1: .*Ann_0002\.jpg"):
        load_lfw_folder(str(tmp_path / "corrupt"))


def test_lfw_images_may_be_png_or_jpg_per_person(tmp_path):
    make_lfw(str(tmp_path), "Ann 1 Bo 1\n", {"Ann": 1})
    save(str(tmp_path / "Bo" / "Bo_0001.png"), solid(77, 0, 0))
    pairs = load_lfw_folder(str(tmp_path))
    assert pairs.images[:, 0, 0, 0].tolist() == [10, 77] and pairs.issame.tolist() == [False]


def test_a_cfp_folder_missing_a_list_or_with_a_bad_line_names_the_file_and_line(tmp_path):
    root = tmp_path / "cfp"
    make_cfp(str(root))
    proto = root / "Protocol"
    with pytest.raises(PairSetError, match=r"^CFP protocol must be one of \('FF', 'FP'\), got 'XX'$"):
        load_cfp_folder(str(root), "xx")
    (proto / "Split" / "FP" / "02" / "diff.txt").write_text("1,1\n2;1\n")
    with pytest.raises(PairSetError, match=r"Split/FP/02/diff\.txt:2: expected 'i,j' with indexes from the pair lists, got '2;1'$"):
        load_cfp_folder(str(root), "FP")
    (proto / "Split" / "FP" / "02" / "diff.txt").write_text("\n1,9\n")          # no profile 9
    with pytest.raises(PairSetError, match=r"Split/FP/02/diff\.txt:2: expected 'i,j'"):
        load_cfp_folder(str(root), "FP")
    os.remove(proto / "Split" / "FP" / "02" / "diff.txt")
    with pytest.raises(PairSetError, match=r"^CFP split list does not exist: .*Split/FP/02/diff\.txt$"):
        load_cfp_folder(str(root), "FP")
    (proto / "Pair_list_P.txt").write_text("1 ../Data/p/1.png\ntwo ../Data/p/2.png\n")
    with pytest.raises(PairSetError, match=r"Pair_list_P\.txt:2: expected 'index relative/path', got 'two \.\./Data/p/2\.png'$"):
        load_cfp_folder(str(root), "FP")
    os.remove(proto / "Pair_list_P.txt")
    with pytest.raises(PairSetError, match=r"^CFP pair list does not exist: .*Protocol/Pair_list_P\.txt$"):
        load_cfp_folder(str(root), "FP")


def test_a_cfp_folder_without_splits_or_pairs_or_images_is_named(tmp_path):
    root = tmp_path / "cfp"
    make_cfp(str(root))
    split_dir = root / "Protocol" / "Split" / "FF"
    for split in ("01", "02"):
        for kind in ("same", "diff"):
            (split_dir / split / f"{kind}.txt").write_text("\n")
    with pytest.raises(PairSetError, match=rf"^{split_dir}: no pairs$"):
        load_cfp_folder(str(root), "FF")
    (split_dir / "01" / "same.txt").write_text("1,2\n")
    os.remove(root / "Data" / "f" / "2.png")
    with pytest.raises(PairSetError, match=rf"(?s)^{split_dir}: 1 images are missing .*Data/f/2\.png"):
        load_cfp_folder(str(root), "FF")
    shutil.rmtree(root / "Protocol" / "Split" / "FP")
    with pytest.raises(PairSetError, match=r"Split/FP: no split folders \(expected 01 \.\. 10\)$"):
        load_cfp_folder(str(root), "FP")


def test_files_beside_the_cfp_split_folders_are_not_splits(tmp_path):
    make_cfp(str(tmp_path))
    (tmp_path / "Protocol" / "Split" / "FP" / "README.txt").write_text("splits 01..10\n")
    (tmp_path / "Protocol" / "Split" / "FP" / ".DS_Store").write_bytes(b"\0")
    assert load_cfp_folder(str(tmp_path), "FP").issame.tolist() == [True, False, True, False]


def test_open_pair_set_passes_the_name_and_image_size_to_every_format(tmp_path):
    make_cfp(str(tmp_path / "cfp"))
    make_lfw(str(tmp_path / "lfw"), "Ann 1 1\n", {"Ann": 1})
    dump(tmp_path / "agedb.bin", ([png_bytes(solid(1, 2, 3))] * 2, [True]))
    for name, path in (("my_cfp_fp", "cfp"), ("my_lfw", "lfw"), ("agedb_30", "agedb.bin")):
        pairs = open_pair_set(name, str(tmp_path / path), image_size=6)
        assert pairs.name == name and pairs.images.shape[2:] == (6, 6), (name, pairs.images.shape)


def test_open_pair_set_refuses_a_folder_of_no_known_layout_and_a_missing_bin_alike(tmp_path):
    os.makedirs(tmp_path / "plain")
    for path in (tmp_path / "plain", tmp_path / "missing.bin"):
        with pytest.raises(PairSetError, match=rf"^pair set 'cfp_fp': cannot open {path}; expected an insightface \.bin"):
            open_pair_set("cfp_fp", str(path))


# ----------------------------------------------------------------------------- the protocol's edges

def test_embeddings_that_are_not_pairs_are_refused_with_their_shapes():
    with pytest.raises(ValueError, match=r"^embeddings must be \(2N, D\) with pairs interleaved, got \(3, 2\)$"):
        verify_10fold(torch.zeros(3, 2), [True, False])
    with pytest.raises(ValueError, match=r"^embeddings must be \(2N, D\) with pairs interleaved, got \(4,\)$"):
        verify_10fold(torch.zeros(4), [True, False])
    with pytest.raises(ValueError, match=r"^pair embeddings must both be \(N, D\), got \(2, 2\) and \(2, 3\)$"):
        verify_10fold((torch.zeros(2, 2), torch.zeros(2, 3)), [True, False])
    with pytest.raises(ValueError, match=r"^pair embeddings must both be \(N, D\), got \(2,\) and \(2,\)$"):
        verify_10fold((torch.zeros(2), torch.zeros(2)), [True, False])
    with pytest.raises(ValueError, match=r"^2 embedding pairs but 3 issame labels$"):
        verify_10fold(torch.zeros(4, 2), [True, False, True])


def test_as_many_folds_as_pairs_is_leave_one_out():
    result = verify_10fold(pairs_at_distances([0.305, 2.505] * 2), [True, False] * 2, n_folds=4)
    assert len(result.best_thresholds) == 4 and result.acc == 1.0


def test_a_pair_exactly_at_the_threshold_is_not_accepted():
    # insightface predicts "same" for distance < threshold (np.less). Every pair different at
    # distance 0: threshold 0 is the only one that rejects them all, so each fold picks it, and
    # the held-out pairs at exactly 0 are rejected: all right.
    result = verify_10fold(pairs_at_distances([0.0] * 4), [False] * 4, n_folds=2)
    assert result.best_thresholds.tolist() == [0.0, 0.0] and result.correct.tolist() == [True] * 4
    # Different pairs beyond every threshold keep the training FAR at 0, so the FAR threshold
    # is 0: the same pairs at distance exactly 0 are not accepted either (TAR 0).
    result = verify_10fold(pairs_at_distances([0.0, 5.0] * 4), [True, False] * 4, n_folds=2)
    assert result.tar_at_far == 0.0 and result.far == 0.0


def test_tar_at_far_interpolates_the_training_far_curve_worked_by_hand():
    # Two identical folds: same at 0.105 and 2.0, different at 0.105 and 1.005. Trained on the
    # other fold, FAR is 0 up to t = 0.10 and 1/2 from t = 0.11: FAR 1/2 is reached at t = 0.11.
    # Each fold then accepts the pairs at 0.105: TAR 1/2, FAR 1/2.
    fold = [0.105, 2.0, 0.105, 1.005]
    result = verify_10fold(pairs_at_distances(fold * 2), [True, True, False, False] * 2,
                           n_folds=2, far_target=0.5)
    assert result.tar_at_far == pytest.approx(0.5) and result.far == pytest.approx(0.5)
    assert result.tar_at_far_std == 0.0 and result.far_target == 0.5


def test_far_threshold_is_the_first_crossing_of_the_target_between_thresholds():
    from virface.evaluation.verification import _far_threshold

    thresholds = np.array([0.0, 0.01, 0.02, 0.03])
    # Reaches the target exactly at 0.01 (then flat until 0.03): 0.01, not a later step.
    assert _far_threshold(np.array([0.0, 0.001, 0.001, 0.5]), thresholds, 1e-3) == pytest.approx(0.01)
    # Crosses it between 0.01 and 0.02: linear between them.
    assert _far_threshold(np.array([0.0, 0.0, 0.002, 0.5]), thresholds, 1e-3) == pytest.approx(0.015)
    # Its largest value is the target: reached, at its last threshold.
    assert _far_threshold(np.array([0.0, 0.0, 0.0, 0.001]), thresholds, 1e-3) == pytest.approx(0.03)
    # Above the target from the first threshold: the first; never reaching it: 0.
    assert _far_threshold(np.array([0.5, 0.6, 0.7, 0.8]), thresholds + 0.3, 1e-3) == pytest.approx(0.3)
    assert _far_threshold(np.array([0.0, 0.0, 0.0, 0.0009]), thresholds, 1e-3) == 0.0


def test_a_fold_without_same_or_different_pairs_has_no_tar_or_far_and_is_left_out():
    # Fold 1 holds only different pairs: no TAR there; the mean is fold 2's alone.
    distances = [1.005, 1.005, 0.205, 1.005]
    result = verify_10fold(pairs_at_distances(distances), [False, False, True, False], n_folds=2,
                           far_target=0.5)
    assert math.isfinite(result.tar_at_far) and result.tar_at_far_std == 0.0
    # A set without any same pair has no TAR at all; without any different pair, no FAR.
    none_same = verify_10fold(pairs_at_distances([1.0] * 4), [False] * 4, n_folds=2)
    assert math.isnan(none_same.tar_at_far) and math.isnan(none_same.tar_at_far_std)
    none_different = verify_10fold(pairs_at_distances([1.0] * 4), [True] * 4, n_folds=2)
    assert math.isnan(none_different.far)
    # A fold with exactly one different pair has a FAR of 0 or 1, not none.
    one_each = verify_10fold(pairs_at_distances([0.205, 1.005] * 2), [True, False] * 2, n_folds=2,
                             far_target=0.5)
    # Trained on the other fold's one different pair (at 1.005), FAR 1/2 is reached at 1.005:
    # the same pair at 0.205 is accepted, the different one not.
    assert one_each.tar_at_far == 1.0 and one_each.far == 0.0


class BatchRecorder(LeftHalfMean):
    """LeftHalfMean's (flip-sensitive) embedding, recording the batch sizes it was given."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x):
        self.batches.append(len(x))
        return super().forward(x)


def test_a_pair_set_is_scored_with_the_flip_folds_far_and_batch_size_it_is_given():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (80, 3, 8, 8), dtype=torch.uint8, generator=g)
    pair_set = PairSet("mine", images, np.arange(40) % 2 == 0)
    net = BatchRecorder()
    for flip in (True, False):
        expected = verify_10fold(extract_embeddings(net, images, flip=flip), pair_set.issame,
                                 n_folds=5, far_target=0.1)
        got = evaluate_pair_set(net, pair_set, flip=flip, n_folds=5, far_target=0.1)
        assert got.acc == expected.acc and np.array_equal(got.correct, expected.correct)
        assert len(got.best_thresholds) == 5 and got.far_target == 0.1
    flipped, plain = (verify_10fold(extract_embeddings(net, images, flip=f), pair_set.issame) for f in (True, False))
    assert not np.array_equal(flipped.best_thresholds, plain.best_thresholds)   # the flip tells
    net.batches.clear()
    evaluate_pair_set(net, pair_set, batch_size=16)
    assert set(net.batches) == {16}
    net.batches.clear()
    evaluate_pair_sets(net, {"mine": pair_set}, batch_size=32)
    assert sorted(set(net.batches)) == [16, 32]


def test_no_images_embed_to_an_empty_float_matrix():
    empty = extract_embeddings(BatchRecorder(), torch.zeros(0, 3, 8, 8, dtype=torch.uint8))
    assert empty.shape == (0, 0) and empty.dtype == torch.float32


def python2_pickle(images, issame):
    """What insightface's mxnet-era tools wrote: a protocol-2 pickle whose images are Python 2
    ``str`` (BINSTRING opcodes), which Python 3 reads as text unless told they are bytes."""
    import struct

    strings = b"".join(b"T" + struct.pack("<i", len(data)) + data for data in images)
    flags = b"".join(b"\x88" if v else b"\x89" for v in issame)
    return b"\x80\x02](" + strings + b"e](" + flags + b"e\x86."


def test_a_bin_written_by_python_2_reads_its_images_as_bytes(tmp_path):
    path = tmp_path / "lfw.bin"
    path.write_bytes(python2_pickle([png_bytes(solid(200, 10, 20)), png_bytes(solid(5, 6, 7))], [True]))
    pairs = load_bin(str(path))
    assert pairs.images[:, :, 0, 0].tolist() == [[200, 10, 20], [5, 6, 7]] and pairs.issame.tolist() == [True]


def test_write_bin_uses_pickle_protocol_4_which_every_python_3_reader_opens(tmp_path):
    path = write_bin(PairSet("x", torch.zeros(2, 3, 2, 2, dtype=torch.uint8), [True]), str(tmp_path / "x.bin"))
    assert open(path, "rb").read(2) == b"\x80\x04"


def test_a_missing_images_error_lists_the_first_five(tmp_path):
    make_lfw(str(tmp_path), "Ann 1 2\nAnn 3 4\nAnn 5 6\nAnn 7 8\n", {"Ann": 1})
    with pytest.raises(PairSetError) as info:
        load_lfw_folder(str(tmp_path))
    message = str(info.value)
    assert "7 images are missing" in message and "the first 5:\n  " in message
    listed = [line.strip() for line in message.splitlines()[1:]]
    assert listed == [os.path.join(str(tmp_path), "Ann", f"Ann_{k:04d}.jpg") for k in range(2, 7)]


def test_images_are_shrunk_with_antialiasing(tmp_path):
    # A one-pixel checkerboard shrunk 9 -> 3: antialiased, every pixel is the mean grey (within
    # 2); without antialiasing each output pixel samples one input pixel: black or white.
    board = ((torch.arange(9)[:, None] + torch.arange(9)[None, :]) % 2 * 255).to(torch.uint8)
    dump(tmp_path / "board.bin", ([png_bytes(board.expand(3, 9, 9).contiguous())] * 2, [True]))
    small = load_bin(str(tmp_path / "board.bin"), image_size=3).images.float()
    assert small.shape == (2, 3, 3, 3) and (small - 127.5).abs().max() < 2
