"""Datasets, sampler, augmentation and box mapping."""

import json
from pathlib import Path

import pytest
import torch

from train.augment import batch_generator, hflip, random_hflip
from train.coco import CocoDetection
from train.data import resize_targets
from train.sampler import GroupedBatchSampler, grouped_batches
from train.shapes import SyntheticShapes

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_shapes_deterministic_and_boxes_cover_pixels():
    a = SyntheticShapes(split="train", size=12, seed=3)
    b = SyntheticShapes(split="train", size=12, seed=3)
    other = SyntheticShapes(split="val", size=12, seed=3)
    for i in range(12):
        ia, ta = a[i]
        ib, tb = b[i]
        assert torch.equal(ia, ib) and torch.equal(ta["boxes"], tb["boxes"])
        assert ia.dtype == torch.uint8 and ia.shape[0] == 3
        h, w = ia.shape[1:]
        assert a.aspect_ratios[i] == pytest.approx(w / h)
        boxes = ta["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert ((ta["labels"] >= 1) & (ta["labels"] <= 4)).all()
    assert [a.target(i)["boxes"].tolist() for i in range(12)] != [other.target(i)["boxes"].tolist() for i in range(12)]
    gt = a.coco_gt()
    assert len(gt["images"]) == 12 and len(gt["categories"]) == 4
    assert sum(len(a.target(i)["labels"]) for i in range(12)) == len(gt["annotations"])


def test_shapes_has_negatives_and_all_classes():
    ds = SyntheticShapes(split="train", size=200, seed=0)
    counts = [len(ds.target(i)["labels"]) for i in range(200)]
    assert 0 in counts and max(counts) <= 4
    labels = torch.cat([ds.target(i)["labels"] for i in range(200)])
    assert set(labels.tolist()) == {1, 2, 3, 4}


def test_coco_dataset_mapping_crowd_degenerate(tmp_path):
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (20, 50)).save(tmp_path / "imgs" / "b.png")
    ann = {"images": [{"id": 5, "file_name": "a.png", "width": 40, "height": 30},
                      {"id": 2, "file_name": "b.png", "width": 20, "height": 50}],
           "categories": [{"id": 90, "name": "z"}, {"id": 4, "name": "d"}],
           "annotations": [
               {"id": 1, "image_id": 5, "category_id": 90, "bbox": [1, 2, 10, 5], "iscrowd": 0, "area": 50},
               {"id": 2, "image_id": 5, "category_id": 4, "bbox": [0, 0, 40, 30], "iscrowd": 1, "area": 1200},
               {"id": 3, "image_id": 5, "category_id": 4, "bbox": [5, 5, 0, 4], "iscrowd": 0, "area": 0},
               {"id": 4, "image_id": 5, "category_id": 4, "bbox": [35, 3, 20, 4], "iscrowd": 0, "area": 80}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CocoDetection(images_dir=tmp_path / "imgs", annotations=tmp_path / "ann.json")
    assert ds.class_names == ["__background__", "d", "z"]
    assert ds.label_to_category_id == [0, 4, 90]
    assert (ds.num_crowd, ds.num_degenerate) == (1, 1)
    # sorted by image id: b.png (id 2, no boxes, kept as a negative) then a.png
    img, t = ds[0]
    assert t["image_id"] == 2 and t["boxes"].shape == (0, 4) and img.shape == (3, 50, 20)
    img, t = ds[1]
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].tolist() == [[1, 2, 11, 7], [35, 3, 40, 7]]  # the second clipped to the image
    assert ds.aspect_ratios == [pytest.approx(0.4), pytest.approx(40 / 30)]


@pytest.mark.skipif(not (DATA / "coco128").exists(), reason="../shared/data not present")
def test_coco128_loads():
    ds = CocoDetection(images_dir=DATA / "coco128/train2017", annotations=DATA / "coco128/annotations/instances_train2017.json")
    assert len(ds) == 128 and len(ds.class_names) == 81 and ds.num_crowd == 10
    img, t = ds[0]
    assert img.dtype == torch.uint8 and t["boxes"].shape[1] == 4


def test_grouped_batches_cover_once_and_group_by_aspect():
    ratios = [1.5, 0.5, 1.2, 0.7, 2.0, 0.9, 1.1, 0.6, 1.3]
    batches = grouped_batches(ratios, 2, seed=1, epoch=0)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(ratios)))
    full = [b for b in batches if len(b) == 2]
    # 5 wide + 4 tall images: 2 wide pairs, 2 tall pairs, and one mixed batch of the leftovers
    assert sum(len({ratios[i] >= 1 for i in b}) == 1 for b in full) >= 4
    assert grouped_batches(ratios, 2, seed=1, epoch=0) == batches
    assert grouped_batches(ratios, 2, seed=1, epoch=1) != batches


def test_sampler_shards_and_resumes():
    ratios = [1.0] * 10
    r0 = GroupedBatchSampler(ratios, 2, seed=0, rank=0, world_size=2)
    r1 = GroupedBatchSampler(ratios, 2, seed=0, rank=1, world_size=2)
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == 2  # 5 batches -> 4 usable, 2 each
    assert not set(sum(b0, [])) & set(sum(b1, []))
    r0.set_epoch(0, start_batch=1)
    assert list(r0) == b0[1:] and len(r0) == 1


def test_hflip_boxes_and_determinism():
    img = torch.arange(2 * 5, dtype=torch.uint8).reshape(1, 2, 5).expand(3, 2, 5)
    flipped, boxes = hflip(img, torch.tensor([[1.0, 0.0, 3.0, 2.0]]))
    assert boxes.tolist() == [[2.0, 0.0, 4.0, 2.0]]
    assert flipped[0, 0].tolist() == [4, 3, 2, 1, 0]
    imgs = [img] * 8
    tg = [{"boxes": torch.tensor([[1.0, 0.0, 3.0, 2.0]]), "labels": torch.tensor([1])}] * 8
    a = random_hflip(imgs, tg, batch_generator(0, 1, 2))[1]
    b = random_hflip(imgs, tg, batch_generator(0, 1, 2))[1]
    assert [t["boxes"].tolist() for t in a] == [t["boxes"].tolist() for t in b]
    assert len({t["boxes"][0, 0].item() for t in a}) == 2  # some flipped, some not


def test_resize_targets_per_axis():
    t = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "labels": torch.tensor([3])}]
    out = resize_targets(t, torch.tensor([[200, 150]]), torch.tensor([[100, 50]]))
    assert out[0]["boxes"].tolist() == [[30.0, 40.0, 90.0, 80.0]]
    assert out[0]["labels"].tolist() == [3]
