"""Dense training of the detector recipe's tiny YOLOS on the generated shapes: does it localise? (issue #13)

Plain ``transformers.Trainer`` on ``generate_shapes`` with the recipe's ``TINY_YOLOS`` (overridable), COCO mAP by
``DetectionMAP`` every ``--eval_every`` epochs, and at the end the matched loss terms on the validation images
(``loss_ce`` at ln(num_labels + 1) means the classifier is still uniform). Figures: docs/detection.md.

    python benchmarks/detector_dense_training.py --epochs 30                 # the recipe's settings (~6 min, 1 thread)
    python benchmarks/detector_dense_training.py --max_objects 2 --min_fraction 0.3 --max_fraction 0.5
"""

import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from prune_detector import TINY_YOLOS, initialise_from_scratch  # noqa: E402
from transformers import (  # noqa: E402
    Trainer,
    TrainingArguments,
    YolosForObjectDetection,
    YolosImageProcessor,
    set_seed,
)

from mdp_hf.data import detection_collate  # noqa: E402
from mdp_hf.detection_data import DetectionMAP, category_names, detection_transform, generate_shapes  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--train", type=int, default=3000)
p.add_argument("--max_objects", type=int, default=4)
p.add_argument("--min_fraction", type=float, default=0.2)
p.add_argument("--max_fraction", type=float, default=0.45)
p.add_argument("--clip", type=float, default=0.1)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--hidden", type=int, default=96)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--heads", type=int, default=4)
p.add_argument("--mlp", type=int, default=192)
p.add_argument("--patch", type=int, default=8)
p.add_argument("--tokens", type=int, default=10)
p.add_argument("--eos", type=float, default=0.1)
p.add_argument("--zero_init", action="store_true", help="keep transformers' zero detection tokens/positions")
p.add_argument("--aux", action="store_true", help="auxiliary losses after every layer (config.auxiliary_loss)")
p.add_argument("--bbox_weight", type=int, default=5)
p.add_argument("--giou_weight", type=int, default=2)
p.add_argument("--wd", type=float, default=1e-4)
p.add_argument("--warmup", type=int, default=50)
p.add_argument("--eval_every", type=int, default=5)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--sched", default="cosine")
p.add_argument("--save", default=None)
a = p.parse_args()
torch.set_num_threads(a.threads)
set_seed(0)
size = 64
train = generate_shapes(
    a.train, size, seed=0, max_objects=a.max_objects, min_fraction=a.min_fraction, max_fraction=a.max_fraction
)
val = generate_shapes(
    300, size, seed=12345, max_objects=a.max_objects, min_fraction=a.min_fraction, max_fraction=a.max_fraction
)
labels = category_names(train, "objects")
cfg = copy.deepcopy(TINY_YOLOS)
cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size = (
    a.hidden,
    a.layers,
    a.heads,
    a.mlp,
)
cfg.patch_size, cfg.num_detection_tokens, cfg.eos_coefficient = a.patch, a.tokens, a.eos
cfg.auxiliary_loss, cfg.bbox_loss_coefficient, cfg.giou_loss_coefficient = a.aux, a.bbox_weight, a.giou_weight
cfg.num_labels = len(labels)
cfg.id2label = dict(enumerate(labels))
cfg.label2id = {v: k for k, v in cfg.id2label.items()}
model = YolosForObjectDetection(cfg)
if not a.zero_init:  # transformers' own init leaves detection tokens and position embeddings at zero
    model = initialise_from_scratch(model)
proc = YolosImageProcessor(size={"height": size, "width": size}, do_pad=False)
for d in (train, val):
    d.set_transform(detection_transform(proc, "image", "objects"))
args = TrainingArguments(
    output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "detector_dense_training"),
    num_train_epochs=a.epochs,
    per_device_train_batch_size=a.batch,
    per_device_eval_batch_size=64,
    learning_rate=a.lr,
    weight_decay=a.wd,
    warmup_steps=a.warmup,
    max_grad_norm=a.clip,
    lr_scheduler_type=a.sched,
    eval_strategy="epoch" if a.eval_every == 1 else "steps",
    eval_steps=max(1, a.eval_every * ((a.train + a.batch - 1) // a.batch)),
    save_strategy="no",
    report_to="none",
    remove_unused_columns=False,
    eval_do_concat_batches=False,
    logging_steps=50,
    disable_tqdm=True,
    use_cpu=True,
    dataloader_num_workers=0,
    seed=0,
)
t = Trainer(
    model=model,
    args=args,
    train_dataset=train,
    eval_dataset=val,
    data_collator=detection_collate,
    compute_metrics=DetectionMAP(proc),
)
start = time.time()
t.train()
m = t.evaluate()
model.eval()
sums = {}
loader = t.get_eval_dataloader()
with torch.no_grad():
    for batch in loader:
        out = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
        for k, v in out.loss_dict.items():
            sums.setdefault(k, []).append(float(v))
print("LOSSDICT", {k: round(float(np.mean(v)), 4) for k, v in sums.items()})
if a.save:
    t.save_model(a.save)
print(
    "FINAL",
    json.dumps(
        {"args": vars(a), "eval": {k: v for k, v in m.items() if "map" in k or "loss" in k}, "s": time.time() - start}
    ),
)
