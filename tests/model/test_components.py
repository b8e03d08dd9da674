"""Anchors, box coder, transform, config and checkpoints: golden values and hand-computed cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model import apply_overrides, build_model, load_checkpoint, preset, save_checkpoint
from model.anchors import AnchorGenerator, cell_anchors
from model.box_coder import BBOX_XFORM_CLIP, BoxCoder
from model.checkpoint import read_meta
from model.config import PRESETS, ModelConfig
from model.rpn import rank_within_group
from model.transform import pad_batch, preprocess, resized_size, scale_boxes
from tests.model.parity import golden


def test_cell_anchors_by_hand():
    # size 32, ratio 1 -> 32x32 centred; ratio 0.5 (h/w) -> w = 32*sqrt(2) = 45.25, h = 22.6, rounded.
    a = cell_anchors((32,), (0.5, 1.0))
    assert a.tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0]]


def test_anchors_match_torchvision():
    g, _ = golden()
    gen = AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    shapes = [(608 // s, 800 // s) for s in (4, 8, 16, 32, 64)]
    ours = torch.cat(gen((608, 800), shapes, device=torch.device("cpu")))
    torch.testing.assert_close(ours, g["anchors/608x800"], rtol=0, atol=0)


def test_box_coder_matches_torchvision_and_round_trips():
    g, _ = golden()
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(coder.decode(g["coder/codes"], g["coder/ref"]), g["coder/decoded"])
    enc = coder.encode(g["coder/ref"], g["coder/gt"])
    torch.testing.assert_close(enc, g["coder/encoded"])
    torch.testing.assert_close(coder.decode(enc, g["coder/ref"])[:, 0], g["coder/gt"], atol=1e-3, rtol=1e-5)


def test_box_coder_clamps_growth():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    out = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0]]))
    # exp(clip) * 16 px = 1000 px wide at most, centred at 8.
    assert out[0, 0].tolist() == pytest.approx([8 - 500, 8 - 500, 8 + 500, 8 + 500], rel=1e-5)
    assert BBOX_XFORM_CLIP == pytest.approx(math.log(1000 / 16))


@pytest.mark.parametrize(("hw", "expected"), [
    ((480, 640), (600, 800)),  # shorter side to 600
    ((426, 640), (600, 901)),  # 640 * 600/426 = 901.4
    ((300, 1000), (300, 1000)),  # longer side capped: scale 1
    ((100, 2000), (50, 1000)),
    ((612, 612), (600, 600)),
])
def test_resized_size(hw, expected):
    assert resized_size(*hw, 600, 1000) == expected


def test_preprocess_pads_to_32_and_keeps_sizes():
    cfg = preset("tiny").transform
    imgs = [torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8), torch.rand(3, 200, 100)]
    b = preprocess(imgs, cfg)
    assert b.images.shape[-2] % 32 == 0 and b.images.shape[-1] % 32 == 0
    assert b.image_sizes.tolist() == [list(resized_size(480, 640, cfg.min_size, cfg.max_size)),
                                      list(resized_size(200, 100, cfg.min_size, cfg.max_size))]
    assert b.original_sizes.tolist() == [[480, 640], [200, 100]]
    h, w = b.image_sizes[1].tolist()
    assert b.images[1, :, h:, :].abs().sum() == 0 and b.images[1, :, :, w:].abs().sum() == 0
    # normalisation: a uint8 pixel of 0 becomes -mean/std
    zero = torch.zeros(3, 64, 64, dtype=torch.uint8)
    out = preprocess([zero], cfg).images[0, :, 0, 0]
    torch.testing.assert_close(out, -torch.tensor(cfg.image_mean) / torch.tensor(cfg.image_std))


def test_pad_batch_and_scale_boxes():
    batch, sizes = pad_batch([torch.ones(3, 33, 10)], 32)
    assert batch.shape == (1, 3, 64, 32) and sizes.tolist() == [[33, 10]]
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    out = scale_boxes(boxes, torch.tensor([600, 800]), torch.tensor([480, 640]))
    assert out.tolist() == [[8.0, 16.0, 24.0, 32.0]]


def test_rank_within_group():
    g = torch.tensor([1, 0, 1, 1, 0, 2])
    assert rank_within_group(g, 3).tolist() == [0, 0, 1, 2, 1, 0]


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(preset("tiny"), ["rpn.nms_thresh=0.6", "roi_heads.detections_per_img=50",
                                           "anchors.sizes=((8,),(16,),(32,),(64,),(128,))",
                                           "rpn.ignore_cross_boundary=true", "backbone.norm=bn"])
    assert cfg.rpn.nms_thresh == 0.6 and cfg.roi_heads.detections_per_img == 50
    assert cfg.anchors.sizes[0] == (8,) and cfg.rpn.ignore_cross_boundary is True and cfg.backbone.norm == "bn"
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(cfg, ["rpn.nms=0.5"])
    with pytest.raises(ValueError, match="cannot read"):
        apply_overrides(cfg, ["rpn.post_nms_top_n_test=lots"])
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


# Parameters with 91 classes. The FPN presets: torchvision 0.28's FasterRCNN built with frozen batch
# norm (as its builders do for pretrained weights; the affine then is buffers, not parameters),
# counted in the reference venv: resnet50_fpn 41,755,286 (also the published num_params),
# resnet101_fpn 60,695,190, mobilenet_v3 19,386,354. ResNet-101's figure is also ResNet-50's plus
# the classifiers' difference less the 17 extra bottlenecks' 3 batch norms (256 + 256 + 1024 channels).
PRESET_PARAMS = {
    "resnet50_fpn": 41_755_286,
    "resnet101_fpn": 41_755_286 + (44_549_160 - 25_557_032) - 17 * 2 * (256 + 256 + 1024),
    "mobilenet_v3_large_fpn": 19_386_354,
    "mobilenet_v3_large_320_fpn": 19_386_354,
    # VGG16 (138,357,544) without fc8 (4096*1000 + 1000); RPN: 3x3 conv 512->512, 9 objectness
    # logits and 36 deltas from 512; predictor: 91 scores and 364 deltas from 4096.
    "vgg16_c4": 138_357_544 - 4_097_000 + (512 * 9 * 512 + 512) + (512 * 9 + 9) + (512 * 36 + 36)
    + (4096 * 91 + 91) + (4096 * 364 + 364),
    "tiny": 1_732_470,  # our own backbone: no outside reference, the count as built when the preset was fixed
}


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_with_its_reference_size_and_runs(name):
    net = build_model(preset(name, num_classes=91)).eval()
    assert sum(p.numel() for p in net.parameters()) == PRESET_PARAMS[name]
    with torch.no_grad():
        raw = net(torch.zeros(1, 3, 128, 160), torch.tensor([[128, 160]]))
    R = raw.batch_idx.numel()
    assert 0 < R <= net.config.rpn.post_nms_top_n_test and raw.batch_idx.eq(0).all()
    assert raw.scores.shape == (R, 91) and raw.boxes.shape == (R, 91, 4)
    torch.testing.assert_close(raw.scores.sum(1), torch.ones(R))  # softmax over the classes
    assert raw.boxes[..., 0::2].min() >= 0 and raw.boxes[..., 0::2].max() <= 160  # clipped to the image
    assert raw.boxes[..., 1::2].min() >= 0 and raw.boxes[..., 1::2].max() <= 128


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_model(preset("tiny", num_classes=3)).eval()
    names = ["__background__", "circle", "square"]
    save_checkpoint(tmp_path / "ck", net, class_names=names, provenance={"note": "test"})
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta.class_names == names and meta.provenance["note"] == "test" and meta.config == net.config
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert json.loads((tmp_path / "ck" / "model.json").read_text())["class_names"] == names
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_rejects_garbage(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_meta(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        read_meta(tmp_path / "missing")


def test_class_names_must_fit(tmp_path):
    net = build_model(preset("tiny", num_classes=3))
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(tmp_path / "ck", net, class_names=["__background__", "a"])
