"""A plain single-model torch script, the baseline of ``bench/bench_auto.py``: no folds, no blend, no library.

Run: ``python bench/plain_torch.py DATA OUT.csv --seconds 1200 [--size 32] [--threads N]``.

Every train image goes into memory at ``--size`` px; a small CNN (6 conv layers, 0.29M parameters) trains with
AdamW, random horizontal flips and a cosine learning rate driven by the clock, until the time left is what
predicting the test set needs; test.csv is then labelled at 0.5 into OUT.csv (``id,label``).

``python bench/plain_torch.py --smoke`` (for the test suite): 3 seconds on 40 demo images (``aivh-ens demo-data``)
in a temporary folder, then the line ``bench plain: test F1 <F1> in a <seconds>s budget``.
"""

from __future__ import annotations

import time

T0 = time.monotonic()  # the budget counts from the start, imports included

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402


def load(root: Path, files: list[str], size: int) -> torch.Tensor:  # (N, 3, size, size) uint8
    arrays = [np.asarray(Image.open(root / f).convert("RGB").resize((size, size))) for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def make_net() -> nn.Sequential:
    return nn.Sequential(block(3, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64),
                         nn.MaxPool2d(2), block(64, 128), block(128, 128), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(128, 2))  # fmt: skip


def norm(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - 0.5) / 0.25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, nargs="?")
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="3 seconds on tiny demo data (see above)")
    args = ap.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="plain-smoke-") as tmp:
            smoke(args, Path(tmp))
        return
    if args.data is None or args.out is None or args.seconds is None:
        ap.error("DATA, OUT and --seconds are required (or --smoke)")
    train_and_predict(args)


def smoke(args: argparse.Namespace, tmp: Path) -> None:
    """Train 3 seconds on 40 demo images, label their 20 test images, print their F1."""
    from aivh_ens.metrics import f1
    from aivh_ens.synth import make_demo_dataset

    args.data = make_demo_dataset(tmp / "data", n=40, n_test=20)["root"]
    args.out, args.seconds = tmp / "submission.csv", time.monotonic() - T0 + 6  # 3 s to train, 3 s kept
    train_and_predict(args)
    s = pd.read_csv(args.data / "solution.csv").merge(pd.read_csv(args.out), on="id", suffixes=("", "_pred"))
    print(
        f"bench plain: test F1 {f1(s['label'].to_numpy(), s['label_pred'].to_numpy()):.4f} in a {args.seconds:.0f}s budget"
    )


def train_and_predict(args: argparse.Namespace) -> None:
    """Train for ``args.seconds`` from the start of the script, then write the test labels to ``args.out``."""
    t0 = T0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train, test = pd.read_csv(args.data / "train.csv"), pd.read_csv(args.data / "test.csv")
    x, y = load(args.data, list(train.file_name), args.size), torch.tensor(train.label.values)
    xt = load(args.data, list(test.id), args.size)
    net, bs, base_lr = make_net(), 128, 3e-3
    opt = torch.optim.AdamW(net.parameters(), lr=base_lr, weight_decay=5e-4)
    stop = args.seconds - 3 - len(xt) / 2000  # leave the test prediction its time (~2,000 img/s here)
    start, epochs = time.monotonic() - t0, 0
    while time.monotonic() - t0 < stop:
        net.train()
        for idx in torch.randperm(len(x)).split(bs):
            done = (time.monotonic() - t0 - start) / max(stop - start, 1e-9)
            if done >= 1:
                break
            for g in opt.param_groups:
                g["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * done))
            xb = norm(x[idx])
            flip = torch.rand(len(idx)) < 0.5
            xb[flip] = xb[flip].flip(3)
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
    net.eval()
    with torch.no_grad():
        p = torch.cat([net(norm(b)).softmax(1)[:, 1] for b in xt.split(512)])
    pd.DataFrame({"id": test.id, "label": (p >= 0.5).long().numpy()}).to_csv(args.out, index=False)
    print(f"plain: {epochs} epochs (the last one cut by the clock), {time.monotonic() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
