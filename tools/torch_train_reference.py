"""PyTorch reference for `flatmin train`'s default recipe, run side by side with flatmin.

cnn-s (reference_models.md) on a CIFAR-10 binary folder: SGD lr 0.05, momentum 0.9, weight
decay 5e-4, cosine annealing to 0 (stepped per epoch, T_max = epochs), batch 128, random crop 32
with 4-pixel zero padding + horizontal flip, normalization (pixel/255 - mean)/std, 10 epochs,
float32. Prints one JSON line per seed with the final test accuracy and the wall time.
With `--eval-each-epoch`, the loop also does the work of flatmin's default recipe after every
epoch: loss and accuracy of all training and all test images (BatchNorm-free eval mode, no
gradients), inside the timed loop, so the two whole runs do the same work.

Run:  /path/to/venv/bin/python tools/torch_train_reference.py --data ../shared/data/cifar10-subset \
          --seeds 0 1 2 --threads 2
Needs torch and numpy only (no torchvision).
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def read(path):
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
    return torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy()), torch.from_numpy(raw[:, 0].astype(np.int64))


def load(folder):
    parts = [read(os.path.join(folder, f"data_batch_{i}.bin")) for i in range(1, 6)
             if os.path.exists(os.path.join(folder, f"data_batch_{i}.bin"))]
    xs, ys = zip(*parts)
    return (torch.cat(xs), torch.cat(ys)), read(os.path.join(folder, "test_batch.bin"))


def normalize(u8):
    return (u8.float() / 255.0 - MEAN) / STD


def augment(u8, gen):
    n = u8.shape[0]
    padded = F.pad(u8, (4, 4, 4, 4))  # zero (black) padding in pixel space
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(u8)
    for i in range(n):
        img = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        out[i] = img.flip(-1) if flip[i] else img
    return out


def evaluate(model, xs, ys, batch=128):
    """Mean cross-entropy and accuracy of `model` on uint8 images `xs` (no gradients; batches of
    128 were the fastest of 64-1000 here)."""
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for s in range(0, xs.shape[0], batch):
            logits = model(normalize(xs[s:s + batch]))
            loss += F.cross_entropy(logits, ys[s:s + batch], reduction="sum").item()
            correct += (logits.argmax(1) == ys[s:s + batch]).sum().item()
    return loss / xs.shape[0], correct / xs.shape[0]


def run(seed, train, test, epochs, eval_each_epoch=False):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    (xtr, ytr), (xte, yte) = train, test
    t0 = time.time()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(xtr.shape[0], generator=gen)
        for s in range(0, xtr.shape[0], 128):
            idx = perm[s:s + 128]
            x = normalize(augment(xtr[idx], gen))
            loss = F.cross_entropy(model(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if eval_each_epoch:
            evaluate(model, xtr, ytr)
            evaluate(model, xte, yte)
    wall = time.time() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(normalize(xte)).argmax(1) == yte).float().mean().item()
    return {"seed": seed, "test_acc": acc, "wall_s": wall, "epochs": epochs, "threads": torch.get_num_threads(),
            "eval_each_epoch": eval_each_epoch}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-each-epoch", action="store_true",
                    help="evaluate all training and test images after every epoch, as flatmin's default recipe does")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    train, test = load(a.data)
    for s in a.seeds:
        print(json.dumps(run(s, train, test, a.epochs, a.eval_each_epoch)), flush=True)


if __name__ == "__main__":
    main()
