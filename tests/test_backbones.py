"""Backbone registry and architectures: every registered backbone builds by name, maps
(B, 3, S, S) to (B, feat_len) and back-propagates; user architectures load as module:callable."""

import sys
import time
import uuid

import pytest
import torch
from torch import nn

from virface.backbones import build_backbone, list_backbones, register_backbone
from virface.backbones.face_resnet import face_resnet_map_size
from virface.errors import ConfigError

EXPECTED_NAMES = {
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "iresnet18", "iresnet34", "iresnet50", "iresnet100",
    "mobilefacenet", "mobilefacenet_s",
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registry_lists_every_face_backbone():
    assert EXPECTED_NAMES <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_maps_tiny_images_to_embeddings_and_backpropagates(name):
    model = build_backbone(name, feat_len=8, input_size=16)
    assert isinstance(model, nn.Module)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out.shape == (2, 8)
    assert out.dtype == torch.float32
    out.pow(2).sum().backward()
    # Every trainable parameter is on the path to the embedding (no dead branches).
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "iresnet18", "mobilefacenet_s"])
def test_flatten_width_follows_input_size(name):
    for size in (32, 48):
        model = build_backbone(name, feat_len=4, input_size=size)
        assert model.map_size == size // 16
        assert model(torch.randn(2, 3, size, size)).shape == (2, 4)


@pytest.mark.parametrize("name, expansion", [("resnet18", 1), ("resnet50", 4)])
def test_face_resnet_flattens_a_7x7_map_at_112(name, expansion):
    model = build_backbone(name, feat_len=8, input_size=112)
    assert model.feature.in_features == 512 * expansion * 7 * 7


def test_face_resnet_final_map_is_7x7_at_112_in_a_forward_pass():
    model = build_backbone("resnet18", feat_len=8, input_size=112).eval()
    seen = {}

    def record_shape(module, inputs, output):
        seen["shape"] = tuple(output.shape)

    model.layer4.register_forward_hook(record_shape)
    with torch.no_grad():
        model(torch.randn(1, 3, 112, 112))
    assert seen["shape"] == (1, 512, 7, 7)


@pytest.mark.parametrize("padding, sizes", [
    # 7x7 stem, then four ceil-halvings: worked out by hand.
    (1, {16: 1, 32: 2, 48: 3, 112: 7}),   # 112 -> 108 -> 54 -> 27 -> 14 -> 7
    (3, {16: 1, 32: 2, 48: 3, 112: 7}),   # 112 -> 112 -> 56 -> 28 -> 14 -> 7
])
def test_face_resnet_map_size_arithmetic(padding, sizes):
    for size, expected in sizes.items():
        assert face_resnet_map_size(size, padding) == expected


def test_face_resnet_stem_has_no_maxpool_and_reference_padding():
    model = build_backbone("resnet18", feat_len=8, input_size=32)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)


def test_iresnet_embedding_bn_scale_is_fixed_at_one():
    model = build_backbone("iresnet18", feat_len=8, input_size=16)
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(8))
    assert model.features.bias.requires_grad


@pytest.mark.parametrize("name, blocks", [
    ("iresnet18", [2, 2, 2, 2]), ("iresnet34", [3, 4, 6, 3]),
    ("iresnet50", [3, 4, 14, 3]), ("iresnet100", [3, 13, 30, 3]),
    ("resnet18", [2, 2, 2, 2]), ("resnet34", [3, 4, 6, 3]), ("resnet50", [3, 4, 6, 3]),
    ("resnet101", [3, 4, 23, 3]), ("resnet152", [3, 8, 36, 3]),
])
def test_resnet_stage_depths(name, blocks):
    model = build_backbone(name, feat_len=8, input_size=16)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == blocks


def test_mobilefacenet_gdc_kernel_is_input_size_over_16():
    for size, kernel in ((32, 2), (48, 3), (112, 7)):
        model = build_backbone("mobilefacenet", feat_len=8, input_size=size)
        assert model.gdc[0].kernel_size == (kernel, kernel)


def test_mobilefacenet_s_is_smaller_than_mobilefacenet():
    def n_params(name):
        return sum(p.numel() for p in build_backbone(name, 128, 32).parameters())
    assert n_params("mobilefacenet_s") < n_params("mobilefacenet") / 2


# --- user architectures given as "module.path:callable" -------------------------------------

USER_MODULE = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self, feat_len, input_size):
        super().__init__()
        self.input_size = input_size
        self.fc = nn.Linear(3 * input_size * input_size, feat_len)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))

def with_size(feat_len, input_size):
    return Tiny(feat_len, input_size)

def without_size(feat_len):
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, feat_len))
    model.called_with = {"feat_len": feat_len}
    return model

def with_kwargs(**kwargs):
    model = without_size(kwargs["feat_len"])
    model.called_with = kwargs
    return model

def no_feat_len(input_size):
    return nn.Identity()

def not_a_module(feat_len, input_size):
    return 42

class Builders:
    @staticmethod
    def nested(feat_len):
        return without_size(feat_len)

NOT_CALLABLE = 3

def raises(feat_len, input_size):
    raise ValueError("feat_len must be a power of two")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Name of a fresh importable module (on sys.path) holding user backbones."""
    name = f"user_backbones_{uuid.uuid4().hex}"  # fresh name: no stale sys.modules entry
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_callable_receives_feat_len_and_input_size(user_module):
    model = build_backbone(f"{user_module}:with_size", feat_len=6, input_size=32)
    assert model.input_size == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 6)


def test_user_callable_without_input_size_gets_feat_len_only(user_module):
    model = build_backbone(f"{user_module}:without_size", feat_len=6, input_size=32)
    assert model.called_with == {"feat_len": 6}
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 6)


def test_user_callable_with_var_kwargs_gets_both(user_module):
    model = build_backbone(f"{user_module}:with_kwargs", feat_len=6, input_size=48)
    assert model.called_with == {"feat_len": 6, "input_size": 48}


def test_user_callable_may_be_a_dotted_attribute(user_module):
    model = build_backbone(f"{user_module}:Builders.nested", feat_len=5, input_size=16)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


# --- errors name what is wrong --------------------------------------------------------------

def test_unknown_name_lists_registered_backbones_and_the_user_form():
    with pytest.raises(ConfigError) as err:
        build_backbone("resnet51")
    msg = str(err.value)
    assert "'resnet51'" in msg
    assert all(name in msg for name in EXPECTED_NAMES)
    assert "module.path:callable" in msg
    assert "did you mean 'resnet50'" in msg


def test_unimportable_module_is_named():
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg_virface.arch'"):
        build_backbone("no_such_pkg_virface.arch:build")


def test_missing_attribute_is_named(user_module):
    with pytest.raises(ConfigError, match=f"module '{user_module}' has no attribute 'nope'"):
        build_backbone(f"{user_module}:nope")


def test_non_callable_attribute_is_rejected(user_module):
    with pytest.raises(ConfigError, match="'NOT_CALLABLE' is a int, not a callable"):
        build_backbone(f"{user_module}:NOT_CALLABLE")


def test_callable_returning_a_non_module_is_rejected(user_module):
    with pytest.raises(ConfigError, match="returned a int, not a torch.nn.Module"):
        build_backbone(f"{user_module}:not_a_module", feat_len=8, input_size=16)


def test_callable_without_feat_len_is_rejected(user_module):
    with pytest.raises(ConfigError, match="must accept a 'feat_len' keyword"):
        build_backbone(f"{user_module}:no_feat_len")


@pytest.mark.parametrize("spec", [":build", "some.module:"])
def test_malformed_user_form_is_rejected(spec):
    with pytest.raises(ConfigError, match="not of the form 'module.path:callable'"):
        build_backbone(spec)


@pytest.mark.parametrize("size", [100, 8, 120])
def test_input_size_not_divisible_by_16_is_rejected(size):
    with pytest.raises(ConfigError, match=rf"input_size: {size} is not divisible by 16"):
        build_backbone("mobilefacenet_s", feat_len=8, input_size=size)


@pytest.mark.parametrize("size", [0, -16, 32.0, True])
def test_input_size_must_be_a_positive_int(size):
    with pytest.raises(ConfigError, match="input_size"):
        build_backbone("mobilefacenet_s", feat_len=8, input_size=size)


@pytest.mark.parametrize("feat_len", [0, -1, 8.0])
def test_feat_len_must_be_a_positive_int(feat_len):
    with pytest.raises(ConfigError, match="feat_len"):
        build_backbone("mobilefacenet_s", feat_len=feat_len, input_size=32)


def test_registering_a_taken_name_or_a_colon_name_is_refused():
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone("resnet18")(lambda feat_len, input_size: nn.Identity())
    with pytest.raises(ConfigError, match="no ':'"):
        register_backbone("a:b")


# --- speed: timed by running this file as a script, not asserted in the suite (machines and
# their load differ; a test that only prints would pass whatever the time).

def _fwd_bwd_seconds(name, batch, size, repeats=5):
    model = build_backbone(name, feat_len=512, input_size=size)
    x = torch.randn(batch, 3, size, size)
    model(x).sum().backward()  # warm-up: allocator and oneDNN primitive caches
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(x).sum().backward()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    # python tests/test_backbones.py: CPU timings of the two MobileFaceNets.
    for name, batch, size, repeats in (("mobilefacenet_s", 64, 32, 7),
                                       ("mobilefacenet_s", 64, 48, 7),
                                       ("mobilefacenet", 64, 112, 3)):
        seconds = _fwd_bwd_seconds(name, batch, size, repeats)
        print(f"{name}: batch {batch} at {size}x{size}, forward+backward {seconds:.4f} s "
              f"(median of {repeats}) on {torch.get_num_threads()} threads")


def test_a_callable_that_raises_is_named_with_its_error(user_module):
    with pytest.raises(ConfigError) as info:
        build_backbone(f"{user_module}:raises", feat_len=24, input_size=32)
    assert str(info.value) == (f"arch: '{user_module}:raises': raises(feat_len=24, input_size=32) raised "
                               f"ValueError: feat_len must be a power of two")


def test_virface_train_with_a_raising_user_callable_exits_2_naming_it(user_module, tmp_path, capsys):
    from virface.train import main

    code = main(["--method", "pretrain", "--arch", f"{user_module}:raises", "--device", "cpu",
                 "--no-tensorboard", "--steps_per_epoch", "1", "--max_epoch", "1",
                 "--snapshot_prefix", str(tmp_path / "run"), "--synthetic", "n_labeled_ids=4",
                 "--synthetic", "images_per_labeled_id=2", "--synthetic", "n_val_ids=20",
                 "--synthetic", "val_pairs=40", "--synthetic", "image_size=16"])
    assert code == 2
    assert f"arch: '{user_module}:raises': raises(feat_len=512, input_size=16) raised ValueError: " \
           f"feat_len must be a power of two" in capsys.readouterr().err
