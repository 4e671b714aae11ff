"""LPIPS-VGG (models/lpips.py; Zhang et al. 2018, richzhang/PerceptualSimilarity ``lpips``) against a transcription
of its formula, and reflow's LPIPS losses (objectives/reflow.py; sangyun884/rfpp ``train.py`` lpips-huber).
Weights are random, made here and saved to a file: no download."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fastdiff.errors import FastdiffError
from fastdiff.models.denoiser import Denoiser
from fastdiff.models.lpips import LPIPS
from fastdiff.models.schedule import FlowSchedule
from fastdiff.objectives import build

# torchvision vgg16 "D" config up to relu5_3; "M" a 2x2 max-pool. LPIPS reads the ReLU after the last conv of each
# block (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16 = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
EPS32 = torch.finfo(torch.float32).eps
SHIFT = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)  # lpips ScalingLayer
SCALE = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)


def random_weights(seed=0):
    """(convs per block as (weight, bias) float64, lins float64, the lpips-package state dict saved to file)."""
    gen = torch.Generator().manual_seed(seed)
    convs, state, index, cin = [], {}, 0, 3
    for k, block in enumerate(VGG16, start=1):
        if k > 1:
            index += 1  # the max-pool before each block after the first
        convs.append([])
        for cout in block:
            w = torch.randn(cout, cin, 3, 3, generator=gen) * math.sqrt(2 / (9 * cin))  # He init keeps scales O(1)
            b = 0.1 * torch.randn(cout, generator=gen)
            state[f"net.slice{k}.{index}.weight"], state[f"net.slice{k}.{index}.bias"] = w, b
            convs[-1].append((w.double(), b.double()))
            index += 2  # conv, relu
            cin = cout
    lins = []
    for i, block in enumerate(VGG16):
        w = torch.rand(1, block[-1], 1, 1, generator=gen)  # non-negative, like LPIPS's trained lin layers
        state[f"lin{i}.model.1.weight"] = w
        lins.append(w.double())
    return convs, lins, state


def lpips_transcribed(x, y, convs, lins):
    """The lpips package's LPIPS.forward (version 0.1, VGG), written out in float64 with F ops."""
    def feats(img):
        h, out = (img - SHIFT) / SCALE, []
        for k, block in enumerate(convs):
            if k > 0:
                h = F.max_pool2d(h, 2, 2)
            for w, b in block:
                h = F.relu(F.conv2d(h, w, b, padding=1))
            out.append(h)
        return out
    total = 0
    for fx, fy, w in zip(feats(x), feats(y), lins):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # lpips normalize_tensor
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((nx - ny).pow(2), w).mean(dim=(1, 2, 3))  # lin layer, spatial average
    return total


class VelocityNet(nn.Module):
    """A small velocity network (flow prediction), diffusers-style call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, sample, timestep, return_dict=True):
        return self.conv(sample) + timestep.reshape(-1, 1, 1, 1) / 1000,


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    convs, lins, state = random_weights()
    path = tmp_path_factory.mktemp("lpips") / "vgg-lpips.safetensors"
    save_file(state, str(path))
    return convs, lins, state, str(path)


def test_lpips_equals_the_formula_float64(weights):
    convs, lins, _, path = weights
    metric = LPIPS.from_file(path, resize=None).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1  # 16 px: relu5_3 at 1 x 1
    y = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1
    got, want = metric(x, y), lpips_transcribed(x, y, convs, lins)
    assert got.shape == (2,) and (want > 0).all()
    # float64 throughout: ~1e3 multiply-adds per output value over 13 convs, rounding 1.1e-16 each, far below 1e-10
    assert torch.allclose(got, want, rtol=1e-10, atol=0), (got, want)


def test_grey_small_images_are_upsampled_rgb(weights, tmp_path):
    convs, lins, state, _ = weights
    pth = tmp_path / "vgg-lpips.pth"
    torch.save(state, pth)  # the .pth route (torch.load weights_only=True)
    # 24 px here keeps float64 fast; the default (224, rfpp's size) runs the same code path (next test)
    metric = LPIPS.from_file(str(pth), resize=24).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1  # Fashion-MNIST-sized, grey
    y = torch.rand(2, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1
    up = lambda img: F.interpolate(img.repeat(1, 3, 1, 1), size=24, mode="bilinear")  # rfpp train.py's upsampling
    want = lpips_transcribed(up(x), up(y), convs, lins)
    assert torch.allclose(metric(x, y), want, rtol=1e-10, atol=0)  # float64, as above


def test_d_of_x_x_is_zero_at_224(weights):
    *_, path = weights
    metric = LPIPS.from_file(path)  # float32, default resize 224
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1  # one image: VGG at 224 is slow
    assert torch.equal(metric(x, x), torch.zeros(1))  # identical features: exactly 0


def test_reflow_lpips_huber_is_rfpps_combination(weights):
    """rfpp train.py: ``pred_x = zt - pred * t``; ``loss = (1 - t) * huber(pred, target) + lpips(pred_x_up, x_up)``,
    ``huber = (sqrt(sum (x - y)^2 + c^2) - c) / dim``, ``c = 0.00054 dim``; mean over the batch."""
    *_, path = weights
    gen = torch.Generator().manual_seed(3)
    z, x0 = torch.randn(2, 1, 8, 8, generator=gen), torch.rand(2, 1, 8, 8, generator=gen) * 2 - 1
    pairs = torch.stack([z, x0], dim=1)
    schedule = FlowSchedule(1000)
    net = VelocityNet()
    student = Denoiser(net, schedule, "flow")
    obj = build("reflow", Denoiser(nn.Identity(), schedule, "flow"), None, student=student, loss="lpips_huber",
                lpips_path=path)
    obj.lpips[0].resize = 16  # the combination, not the 224 upsampling (tested above), is checked here: keep it fast
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    obj.draw_t = lambda n, device: t
    loss, logs = obj.generator_loss(pairs)
    with torch.no_grad():
        _, pred, target = obj.regression(pairs, None, t)
    tt = t.view(-1, 1, 1, 1)
    zt = (1 - tt) * x0.double() + tt * z.double()
    pred_x = zt - pred.double() * tt
    dim = 64
    c = 0.00054 * dim
    huber = ((pred.double() - target.double()).pow(2).sum(dim=(1, 2, 3)) + c * c).sqrt() - c
    lp = obj.lpips[0](pred_x.float(), x0).double()
    want = ((1 - t) * huber / dim + lp).mean()
    # float32 loss vs float64 sum: the x0 estimate differs by a few eps32 of |x| (<= 4) and LPIPS's float32 features
    # round over ~20 layers; 100 eps32 of the loss bounds that (measured: 0.4 eps32). Swapping (1 - t) for t moves
    # the loss by ~3e-2 here (Huber terms 0.09, 0.05), far outside.
    assert abs(loss.item() - float(want)) <= 100 * EPS32 * float(want), (loss.item(), float(want))
    assert float(logs["lpips"]) > 0 and float(logs["huber"]) > 0
    loss.backward()  # gradients reach the student through LPIPS
    assert net.conv.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("setup", ["missing", "garbage", "no_path"])
def test_bad_lpips_input_is_one_line(tmp_path, setup):
    schedule = FlowSchedule(1000)
    teacher = Denoiser(nn.Identity(), schedule, "flow")
    path = None
    if setup == "missing":
        path = str(tmp_path / "nope.safetensors")
    elif setup == "garbage":
        path = str(tmp_path / "bad.pth")
        (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FastdiffError) as err:
        build("reflow", teacher, None, student=teacher, loss="lpips", lpips_path=path)
    assert "\n" not in str(err.value) and "lpips" in str(err.value)
