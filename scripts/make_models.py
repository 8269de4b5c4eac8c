"""Build the small bundled example models of onnxq (``models/``), deterministically.

Writes, from fixed seeds and in a few seconds to a minute on 2 CPU cores:

* ``tiny_cnn.onnx``: an image classifier trained on *synthetic shapes* (below). Conv+BN+ReLU6 stem,
  a MobileNetV2 inverted residual block (1x1 expand, 3x3 depthwise, 1x1 project, residual Add),
  MaxPool, Conv+BN+ReLU, GlobalAveragePool, Flatten, Gemm. BatchNormalization nodes are kept
  unfused (exported with ``training=TrainingMode.PRESERVE`` from a model in eval mode, which skips
  the TorchScript exporter's Conv+BN fusion) so that the quantizer has to fold them itself.
  Input ``input`` [N, 3, 32, 32] float32, output ``logits`` [N, 10], opset 13.
* ``tiny_cnn_calib.npz``: key ``input``, 64 float32 samples of the same data (another seed).
* ``tiny_cnn_eval.npz``: keys ``input`` (uint8 pixels [200, 3, 32, 32]) and ``label`` (int64
  [200]); the model input is ``input.astype(float32) / 255`` (stored as uint8 to stay small).
* ``tiny_unet.onnx``: untrained encoder-decoder (Conv/BN/Relu/MaxPool/Resize/Concat/
  ConvTranspose/Sigmoid), input ``image`` [N, 3, H, W] with H, W dynamic multiples of 8, opset 13.
* ``tiny_mlp.onnx``: untrained transformer-like MLP (MatMul+Add, Erf GELU, LayerNormalization,
  Softmax), input ``x`` [N, 16], output ``probs`` [N, 8], opset 17.

Synthetic shapes: 10 classes of 32x32 RGB images, each a random foreground colour on a random
background colour (mean absolute channel difference >= 0.35), plus Gaussian noise (sigma 0.06),
quantized to uint8. Classes 0-5 are shapes of radius r ~ U[6, 10] centred at a random point
(c ~ U[10, 22]^2): disk, square, upward triangle, plus, X, ring; classes 6-9 are full-image
textures with random period p ~ U{4..7} and phase: horizontal, vertical and diagonal stripes, and
a checkerboard. Class ``k`` of shape ``(dx, dy) = (x - cx, y - cy)`` is the mask, e.g. the disk
is ``dx^2 + dy^2 <= r^2`` and the ring ``0.55 r <= sqrt(dx^2 + dy^2) <= r``.

Determinism: torch runs single-threaded with deterministic algorithms, all randomness comes from
seeded generators, and the ``.npz`` archives are written with a fixed zip timestamp, so two runs
on the same machine give byte-identical files (other CPUs may round differently in training).

Usage::

    python scripts/make_models.py [--out models] [--epochs 6]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
IMAGE_SIZE = 32
SEED_TRAIN_DATA, SEED_CALIB_DATA, SEED_EVAL_DATA = 1, 2, 3
SEED_TORCH = 0
N_TRAIN, N_CALIB, N_EVAL = 6000, 64, 200
CLASS_NAMES = ("disk", "square", "triangle", "plus", "x", "ring",
               "hstripes", "vstripes", "dstripes", "checker")


# ----------------------------------------------------------------------------- synthetic data
def _class_mask(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean foreground masks [n, 32, 32] of class ``k`` with random position/size/period."""
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    if k < 6:
        c = rng.uniform(10, 22, size=(n, 2, 1, 1)).astype(np.float32)
        r = rng.uniform(6, 10, size=(n, 1, 1)).astype(np.float32)
        dx, dy = xx - c[:, 0], yy - c[:, 1]
        ax, ay = np.abs(dx), np.abs(dy)
        w = r / 3.0
        if k == 0:
            return dx**2 + dy**2 <= r**2
        if k == 1:
            return np.maximum(ax, ay) <= 0.85 * r
        if k == 2:
            return (dy >= -r) & (dy <= 0.8 * r) & (ax <= 0.6 * (dy + r))
        if k == 3:
            return ((ax <= w / 1.4) & (ay <= r)) | ((ay <= w / 1.4) & (ax <= r))
        if k == 4:
            return ((np.abs(dx - dy) <= w) | (np.abs(dx + dy) <= w)) & (np.maximum(ax, ay) <= 0.8 * r)
        d = np.sqrt(dx**2 + dy**2)
        return (d >= 0.55 * r) & (d <= r)
    p = rng.integers(4, 8, size=(n, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 8, size=(n, 1, 1)).astype(np.float32)
    if k == 6:
        return np.floor((yy + phase) / p) % 2 == 0
    if k == 7:
        return np.floor((xx + phase) / p) % 2 == 0
    if k == 8:
        return np.floor((xx + yy + phase) / p) % 2 == 0
    return (np.floor((xx + phase) / p) + np.floor((yy + phase) / p)) % 2 == 0


def make_shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` synthetic-shapes images: uint8 [n, 3, 32, 32] and int64 labels [n].

    Labels cycle through the classes (balanced), then the samples are shuffled.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    images = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for k in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == k)
        mask = _class_mask(k, idx.size, rng)[:, None]
        fg = rng.uniform(0, 1, size=(idx.size, 3, 1, 1)).astype(np.float32)
        bg = rng.uniform(0, 1, size=(idx.size, 3, 1, 1)).astype(np.float32)
        low = np.abs(fg - bg).mean(axis=1, keepdims=True) < 0.35  # too little contrast: invert bg
        bg = np.where(low, np.where(fg > 0.5, fg - 0.6, fg + 0.6), bg).clip(0, 1)
        images[idx] = np.where(mask, fg, bg)
    images += rng.normal(0, 0.06, size=images.shape).astype(np.float32)
    return np.round(images.clip(0, 1) * 255).astype(np.uint8), labels


def to_input(images_u8: np.ndarray) -> np.ndarray:
    """Model preprocessing of synthetic-shapes pixels: ``x = u8 / 255`` as float32."""
    return images_u8.astype(np.float32) / np.float32(255)


# ----------------------------------------------------------------------------- models
def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class InvertedResidual(nn.Module):
    """MobileNetV2 block: ``y = x + BN(W_p * ReLU6(BN(W_dw * ReLU6(BN(W_e * x)))))``."""

    def __init__(self, ch: int, expand: int) -> None:
        super().__init__()
        hid = ch * expand
        self.body = nn.Sequential(*conv_bn(ch, hid, 1), nn.ReLU6(), *conv_bn(hid, hid, 3, groups=hid),
                                  nn.ReLU6(), *conv_bn(hid, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(3, 16, 3, stride=2), nn.ReLU6(),  # stem, 32x32 -> 16x16
            InvertedResidual(16, 3),
            nn.MaxPool2d(2),                           # 8x8
            *conv_bn(16, 32, 3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(32, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


class TinyUNet(nn.Module):
    """Three-level encoder-decoder; H and W must be multiples of 8."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(*conv_bn(cin, cout, 3), nn.ReLU())

        self.enc1, self.enc2, self.enc3, self.mid = block(3, 8), block(8, 16), block(16, 24), block(24, 32)
        self.dec3 = block(32 + 24, 24)               # after Resize x2: H/4
        self.up2 = nn.ConvTranspose2d(24, 16, 2, stride=2)
        self.dec2 = block(16 + 16, 16)               # H/2
        self.dec1 = block(16 + 8, 8)                 # after Resize x2: H
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([F.interpolate(m, scale_factor=2.0, mode="nearest"), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        return torch.sigmoid(self.head(d1))


class TinyMLP(nn.Module):
    """Pre-norm MLP block: ``h = x W1 + b1``; ``h = h + GELU(LN(h)) W2 + b2``; ``softmax(LN(h) W3 + b3)``."""

    def __init__(self, din: int = 16, hid: int = 32, dout: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(SEED_TORCH + 3)

        def param(*shape: int, scale: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=g) * scale)

        self.w1, self.b1 = param(din, hid, scale=din**-0.5), param(hid, scale=0.1)
        self.w2, self.b2 = param(hid, hid, scale=hid**-0.5), param(hid, scale=0.1)
        self.w3, self.b3 = param(hid, dout, scale=hid**-0.5), param(dout, scale=0.1)
        self.ln1, self.ln2 = nn.LayerNorm(hid), nn.LayerNorm(hid)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight.copy_(1 + 0.2 * torch.randn(hid, generator=g))
                ln.bias.copy_(0.1 * torch.randn(hid, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.matmul(x, self.w1) + self.b1
        h = h + (torch.matmul(F.gelu(self.ln1(h)), self.w2) + self.b2)
        return torch.softmax(torch.matmul(self.ln2(h), self.w3) + self.b3, dim=-1)


# ----------------------------------------------------------------------------- training
def train_cnn(model: TinyCNN, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    """Adam + cosine learning rate, batch 64, cross-entropy."""
    xt, yt = torch.from_numpy(to_input(x)), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED_TORCH + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(xt) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.2)
    model.train()
    for epoch in range(epochs):
        perm, total, correct = torch.randperm(len(xt), generator=gen), 0.0, 0
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            logits = model(xt[idx])
            loss = F.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == yt[idx]).sum())
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f}, train acc {correct / len(xt):.4f}")
    model.eval()


def settle_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Give an untrained model realistic BN statistics: cumulative running mean/var over ``batches``."""
    g = torch.Generator().manual_seed(SEED_TORCH + 2)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = None  # cumulative moving average
            with torch.no_grad():
                mod.weight.copy_(1 + 0.25 * torch.randn(mod.num_features, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.num_features, generator=g))
    model.train()
    with torch.no_grad():
        for b in batches:
            model(b)
    model.eval()


# ----------------------------------------------------------------------------- export / checks
def export(model: nn.Module, example: torch.Tensor, path: Path, in_name: str, out_name: str,
           dyn: dict[int, str], opset: int, out_dyn: dict[int, str] | None = None) -> None:
    """TorchScript export; PRESERVE mode on an eval model keeps BatchNormalization nodes unfused."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, input_names=[in_name], output_names=[out_name],
                          opset_version=opset, dynamic_axes={in_name: dyn, out_name: out_dyn or {0: dyn[0]}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                          dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = f"onnxq test asset {path.stem}, made by scripts/make_models.py; not a production model"
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(proto.SerializeToString())


def check_ort(model: nn.Module, path: Path, inputs: list[torch.Tensor]) -> float:
    """Max |torch - ORT| over ``inputs`` (FP32, all graph optimizations off); raises above 1e-4."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {name: x.numpy()})[0]
        worst = max(worst, float(np.abs(ref - got).max()))
    if worst > 1e-4:
        raise RuntimeError(f"{path.name}: torch vs onnxruntime differ by {worst:.2e} > 1e-4")
    return worst


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` equivalent with a fixed zip timestamp (byte-reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, data.getvalue())


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((sess.run(None, {"input": x})[0].argmax(1) == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "models")
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    x_tr, y_tr = make_shapes(N_TRAIN, SEED_TRAIN_DATA)
    x_ca, _ = make_shapes(N_CALIB, SEED_CALIB_DATA)
    x_ev, y_ev = make_shapes(N_EVAL, SEED_EVAL_DATA)
    print(f"data: train {x_tr.shape}, calib {x_ca.shape}, eval {x_ev.shape}")

    torch.manual_seed(SEED_TORCH)
    cnn = TinyCNN()
    train_cnn(cnn, x_tr, y_tr, args.epochs)
    ev = torch.from_numpy(to_input(x_ev))
    with torch.no_grad():
        acc_torch = float((cnn(ev).argmax(1).numpy() == y_ev).mean())
    cnn_path = args.out / "tiny_cnn.onnx"
    export(cnn, ev[:1], cnn_path, "input", "logits", {0: "N"}, 13)
    err = check_ort(cnn, cnn_path, [ev[:1], ev[:57]])
    acc_ort = ort_accuracy(cnn_path, to_input(x_ev), y_ev)
    print(f"tiny_cnn: eval acc torch {acc_torch:.4f}, ORT FP32 {acc_ort:.4f}; max |torch-ORT| {err:.2e}")
    save_npz(args.out / "tiny_cnn_calib.npz", {"input": to_input(x_ca)})
    save_npz(args.out / "tiny_cnn_eval.npz", {"input": x_ev, "label": y_ev})

    torch.manual_seed(SEED_TORCH + 10)
    unet = TinyUNet()
    settle_batchnorm(unet, [torch.from_numpy(to_input(x_tr[i:i + 32])) for i in range(0, 256, 32)])
    unet_path = args.out / "tiny_unet.onnx"
    export(unet, torch.rand(1, 3, 32, 32), unet_path, "image", "mask",
           {0: "N", 2: "H", 3: "W"}, 13, out_dyn={0: "N", 2: "H", 3: "W"})
    g = torch.Generator().manual_seed(SEED_TORCH + 11)
    err = check_ort(unet, unet_path, [torch.rand(2, 3, 32, 48, generator=g),
                                      torch.rand(1, 3, 64, 40, generator=g)])
    print(f"tiny_unet: max |torch-ORT| {err:.2e}")

    mlp = TinyMLP().eval()
    mlp_path = args.out / "tiny_mlp.onnx"
    export(mlp, torch.randn(1, 16), mlp_path, "x", "probs", {0: "N"}, 17)
    g = torch.Generator().manual_seed(SEED_TORCH + 12)
    err = check_ort(mlp, mlp_path, [torch.randn(5, 16, generator=g), 3 * torch.randn(64, 16, generator=g)])
    print(f"tiny_mlp: max |torch-ORT| {err:.2e}")

    for p in sorted(args.out.glob("tiny_*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        print(f"  {p.name:22s} {p.stat().st_size / 1024:8.1f} KiB  sha256 {digest}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
