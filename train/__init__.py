"""frcnn.train: `python -m train`. Datasets (COCO json, synthetic shapes), Dynamic R-CNN schedules,
training schemes (end-to-end, 4-step alternating), the loop with exact resume and DDP, COCO evaluation.
Depends on model/ only."""
