"""The conv-net model: a small residual CNN trained on Fashion-MNIST, deterministically, and cached.

The images come from Debian's ``dataset-fashion-mnist`` (the system copy, or fetched once
with ``apt-get download`` into the cache; no hub). Training is seeded, single-order and
runs with a fixed thread count, and its result is cached by the data, the settings and
the architecture's version, so every machine that trains it again gets the model the
ground truth was measured on (its weights hash is recorded next to every figure).

``load_model("fashion-cnn")`` returns it with :class:`FashionData`: the calibration
batches (training images, which PTQ may see), the evaluation batches (the 10,000 test
images), and the refinement slice (training images after the calibration ones).
"""

from __future__ import annotations

import gzip
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..store.cache import cache_dir, content_key, load_tensors, save_tensors
from .batches import LabelledBatches
from .data import DataError, debian_data_dir

log = logging.getLogger(__name__)
DEB_PACKAGE = "dataset-fashion-mnist"
_DIR = Path("usr/share/datasets/fashion-mnist")
MODEL_ID = "fashion-mnist-resnet"
ARCH_VERSION = "resnet-v2"
#: per-pixel mean and std of the training images (the usual normalisation)
MEAN, STD = 0.2860, 0.3530


def fashion_dir() -> Path:
    """``$MPSEARCH_FASHION_DIR``, the system package, or our cache (fetched from Debian once)."""
    return debian_data_dir("MPSEARCH_FASHION_DIR", DEB_PACKAGE, _DIR, "t10k-labels-idx1-ubyte.gz")


def _idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic, dims, then unsigned bytes."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if raw[2] != 0x08 or data.size != math.prod(dims):
        raise DataError(f"{path} is not an IDX file of unsigned bytes with dims {dims}")
    return data.reshape(dims)


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``("train" | "test")`` -> normalised images ``[N, 1, 28, 28]`` float32 and labels ``[N]``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    d = fashion_dir()
    x = torch.from_numpy(_idx(d / f"{prefix}-images-idx3-ubyte.gz").copy()).float().div_(255).sub_(MEAN).div_(STD)
    y = torch.from_numpy(_idx(d / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    return x.unsqueeze(1), y


class Block(nn.Module):
    """A basic residual block: conv-BN-ReLU-conv-BN plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """Stem conv (stride 2: 14 x 14 feature maps), one residual block per stage (``widths``),
    global pooling, a linear classifier."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10, channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(channels, widths[0], 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(x.mean((2, 3)))


@dataclass(frozen=True)
class TrainConfig:
    """Deterministic training: one seeded order, a fixed thread count. The widths keep one
    evaluation on the 10,000 test images under a second on two cores (a ground truth measures 1,000)."""

    widths: tuple[int, ...] = (8, 16, 32)
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0
    threads: int = 2


def train(cfg: TrainConfig = TrainConfig(), progress: bool = True) -> ResNet:
    """SGD with momentum and a cosine schedule over the 60,000 training images."""
    from tqdm.auto import tqdm

    x, y = load_split("train")
    torch.manual_seed(cfg.seed)
    model = ResNet(cfg.widths)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        bar = tqdm(total=steps, desc="training the Fashion-MNIST CNN", disable=not progress, unit="step")
        model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), cfg.batch_size):
                idx = order[s : s + cfg.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
        bar.close()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def trained_model(cfg: TrainConfig = TrainConfig(), progress: bool = True) -> ResNet:
    """The trained CNN, from the cache when this data, config and architecture were trained before."""
    d = fashion_dir()
    files = sorted(p.name + str(p.stat().st_size) for p in d.glob("*.gz"))
    key = content_key("fashion-cnn", ARCH_VERSION, asdict(cfg), files, torch.__version__)
    path = cache_dir() / "models" / f"fashion-cnn-{key}.safetensors"
    model = ResNet(cfg.widths)
    state = load_tensors(path, key)
    if state is not None:
        model.load_state_dict(state)
        return model.eval()
    t0 = time.time()
    model = train(cfg, progress)
    save_tensors(path, {k: v.contiguous() for k, v in model.state_dict().items()}, key)
    log.info("trained the Fashion-MNIST CNN in %.0f s (cached at %s)", time.time() - t0, path)
    return model


class FashionData:
    """The CNN's own data: calibration and slice from the training images (a fixed shuffled
    order), evaluation on the test images. ``chunks`` are batches of ``batch_size`` images;
    the evaluation splits all 10,000 test images into ``chunks`` windows."""

    name = "fashion-mnist"

    def __init__(self, batch_size: int = 128, seed: int = 0) -> None:
        self.batch_size, self.seed = batch_size, seed
        x, y = load_split("train")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
        self.train_x, self.train_y = x[order], y[order]
        self.test_x, self.test_y = load_split("test")

    def calibration(self, chunks: int, skip: int = 0) -> LabelledBatches:
        s, n = skip * self.batch_size, chunks * self.batch_size
        if s + n > len(self.train_x):
            raise DataError(
                f"asked for {chunks} calibration batches after {skip}: only {len(self.train_x) // self.batch_size} "
                "exist"
            )
        return LabelledBatches(self.train_x[s : s + n], self.train_y[s : s + n], self.batch_size)

    def evaluation(self, chunks: int) -> LabelledBatches:
        return LabelledBatches(self.test_x, self.test_y, math.ceil(len(self.test_x) / chunks))
