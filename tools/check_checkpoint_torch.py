"""Loads a flatmin run's model.safetensors into the PyTorch reference module with
`load_state_dict` (strict) and prints its test accuracy, to compare with `flatmin eval`.

Run:  /path/to/venv/bin/python tools/check_checkpoint_torch.py RUN_DIR --data ../shared/data/cifar10-subset
(the run's config.json gives the model; the whole test_batch.bin of --data is evaluated, as
`flatmin eval RUN --size 0` does when the run used all test images).
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import MLP, CNN, ResNet  # noqa: E402

PRESETS = {
    "tiny-tanh": lambda: MLP([192, 32, 10], "tanh", input_pool=4),
    "mlp-s": lambda: MLP([3072, 256, 256, 10], "relu"),
    "cnn-s": CNN,
    "resnet20": lambda: ResNet([3, 3, 3], [16, 32, 64]),
    "resnet18": lambda: ResNet([2, 2, 2, 2], [64, 128, 256, 512]),
}
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--data", required=True)
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(a.run, "config.json")))
    model = PRESETS[cfg["model"]]()
    model.load_state_dict(load_file(os.path.join(a.run, "model.safetensors")))  # strict
    model.eval()
    raw = np.fromfile(os.path.join(a.data, "test_batch.bin"), dtype=np.uint8).reshape(-1, 3073)
    x = (torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy()).float() / 255 - MEAN) / STD
    y = torch.from_numpy(raw[:, 0].astype(np.int64))
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)])
    acc = (logits.argmax(1) == y).float().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, y).item()
    print(json.dumps({"run": a.run, "model": cfg["model"], "torch_test_acc": acc, "torch_test_loss": loss, "images": len(x)}))


if __name__ == "__main__":
    main()
