"""Reconstruction engine on a tiny Conv-ReLU-Conv block; loss schedule; ReconConfig validation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onnxq.blocks.engine_settings import recon_settings
from onnxq.config import BRECQ, AdaRound, Engine, QDrop, RoundToNearest
from onnxq.config.rounding import rounding_from_dict
from onnxq.errors import UserError
from onnxq.recon import (
    AdaRoundWeight,
    BetaSchedule,
    FakeQuant,
    ReconConfig,
    ReconLoss,
    output_error,
    reconstruct_block,
)
from tests.helpers import engine_config

N = 96


@pytest.fixture(autouse=True)
def _tiny_tensors_one_thread():
    """Tiny convolutions: threads and oneDNN only add per-call overhead (20x slower on a busy 2-core box)."""
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn


class QBlock(nn.Module):
    """Quantized twin of ``fp``: Conv-ReLU-Conv with int4 AdaRound weights and uint8 activations."""

    def __init__(self, fp: nn.Sequential, x: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.ParameterList([nn.Parameter(fp[0].bias.detach().clone()),
                                      nn.Parameter(fp[2].bias.detach().clone())])
        self.ws = nn.ModuleDict()
        for key, conv in (("c1", fp[0]), ("c2", fp[2])):
            w = conv.weight.detach()
            scale = w.abs().reshape(w.shape[0], -1).amax(1) / 7
            self.ws[key] = AdaRoundWeight(w, scale, torch.zeros(w.shape[0], dtype=torch.int64), -8, 7, axis=0)
        with torch.no_grad():
            h = fp[1](fp[0](x))
        lo = float(x.min())
        s_in = (float(x.max()) - lo) / 255
        self.acts = nn.ModuleDict({"in": FakeQuant(s_in, round(-lo / s_in), 0, 255),
                                   "h": FakeQuant(float(h.max()) / 255, 0, 0, 255)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(self.acts["in"](x), self.ws["c1"](), self.bias[0], padding=1))
        return F.conv2d(self.acts["h"](h), self.ws["c2"](), self.bias[1], padding=1)


def _data(seed: int = 0):
    torch.manual_seed(seed)
    fp = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    gen = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(N, 4, 6, 6, generator=gen)
    x_q = x_fp + 0.05 * torch.randn(N, 4, 6, 6, generator=gen)  # upstream quantization noise
    with torch.no_grad():
        y = fp(x_fp)
    return QBlock(fp, x_fp), x_q.half(), x_fp.half(), y


def _config(method: str, *, seed: int = 0, holdout: int = 0, device: str = "cpu", **kw) -> ReconConfig:
    base = dict(iters=40, batch_size=16, round_lr=3e-2, act_lr=2e-3, act_iters=20, warmup=0.2,
                eval_samples=64, log_every=10, round_weight=0.01)
    base.update(kw)
    return engine_config(method, "paper", seed=seed, holdout=holdout, device=device, **base)


def _run(block: QBlock, x_q, x_fp, y, cfg: ReconConfig, **kw):
    return reconstruct_block(block, dict(block.ws), dict(block.acts), [x_q], [x_fp], [y], cfg,
                             progress=False, **kw)


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop"])
def test_methods_beat_round_to_nearest(method: str) -> None:
    block, x_q, x_fp, y = _data()
    nearest = {k: w.nearest_codes() for k, w in block.ws.items()}
    scales = {k: float(a.scale) for k, a in block.acts.items()}
    result = _run(block, x_q, x_fp, y, _config(method))
    assert result.loss_final < 0.9 * result.loss_rtn, result
    assert result.improved
    assert result.iters == 40 + (20 if method == "brecq" else 0)
    assert len(result.history) >= 4 and result.seconds > 0
    for k, w in block.ws.items():
        assert not w.soft and w.v.requires_grad  # hard codes; the caller's requires_grad flag is back
        assert int((w.codes() - nearest[k]).abs().max()) <= 1
    for a in block.acts.values():
        assert a.enabled and a.drop_prob == 0.0 and a.generator is None and not a.learn_scale
    learned = any(float(a.scale) != scales[k] for k, a in block.acts.items())
    assert learned == (method in ("brecq", "qdrop"))  # adaround never touches activation steps
    assert all(p.requires_grad for p in block.bias)  # the caller's flags come back
    assert all(float(a.scale) > 0 for a in block.acts.values())


def test_rtn_method_only_evaluates() -> None:
    block, x_q, x_fp, y = _data()
    before = {k: w.codes() for k, w in block.ws.items()}
    result = _run(block, x_q, x_fp, y, engine_config("rtn", eval_samples=64))
    assert result.iters == 0 and result.loss_final == result.loss_rtn > 0
    assert all(torch.equal(w.codes(), before[k]) for k, w in block.ws.items())


def test_same_seed_same_codes_and_scales() -> None:
    block, x_q, x_fp, y = _data(1)
    twin = copy.deepcopy(block)
    cfg = _config("qdrop", iters=15)
    r1 = _run(block, x_q, x_fp, y, cfg)
    r2 = _run(twin, x_q, x_fp, y, cfg)
    assert r1.history == r2.history and r1.loss_final == r2.loss_final
    for k in block.ws:
        assert torch.equal(block.ws[k].codes(), twin.ws[k].codes())
    for k in block.acts:
        assert torch.equal(block.acts[k].scale, twin.acts[k].scale)
    other = copy.deepcopy(twin)
    _run(other, x_q, x_fp, y, _config("qdrop", iters=15, seed=7))
    assert any(not torch.equal(other.ws[k].v, twin.ws[k].v) for k in block.ws)


def test_holdout_is_never_trained_on() -> None:
    block, x_q, x_fp, y = _data(6)
    twin = copy.deepcopy(block)
    y_bad = y.clone()
    y_bad[-32:] = 100.0  # garbage targets in the held-out tail must not influence training
    cfg = _config("adaround", holdout=32)
    r1 = _run(block, x_q, x_fp, y, cfg)
    r2 = _run(twin, x_q, x_fp, y_bad, cfg)
    assert all(torch.equal(block.ws[k].codes(), twin.ws[k].codes()) for k in block.ws)
    assert r1.history == r2.history and r2.loss_rtn > 100 * r1.loss_rtn  # evaluated on the tail only


def test_weight_phase_trains_on_weights_only_inputs() -> None:
    """BRECQ's weight phase reads ``inputs_w`` when given; the evaluation still reads ``inputs_q``."""
    block, x_q, x_fp, y = _data(8)
    twin = copy.deepcopy(block)
    x_w = (x_fp.float() + 0.02 * torch.randn(x_fp.shape, generator=torch.Generator().manual_seed(3))).half()
    cfg = _config("brecq", act_iters=0)
    r1 = _run(block, x_q, x_fp, y, cfg, inputs_w=[x_w])
    r2 = _run(twin, x_w, x_fp, y, cfg)  # same training data, x_w as the quantized inputs
    assert r1.history == r2.history
    assert all(torch.equal(block.ws[k].codes(), twin.ws[k].codes()) for k in block.ws)
    assert r1.loss_rtn != r2.loss_rtn  # scored on different inputs
    with pytest.raises(ValueError, match="inputs_w"):
        _run(copy.deepcopy(block), x_q, x_fp, y, cfg, inputs_w=[x_w[:, :2]])


def test_weight_only_run_leaves_disabled_acts_alone() -> None:
    block, x_q, x_fp, y = _data(2)
    for a in block.acts.values():
        a.enabled = False
    scales = {k: float(a.scale) for k, a in block.acts.items()}
    result = _run(block, x_q, x_fp, y, _config("brecq"))
    assert result.iters == 40  # no activation phase without quantized activations
    assert all(not a.enabled and float(a.scale) == scales[k] for k, a in block.acts.items())


def test_relative_activation_rates_move_steps_by_similar_fractions() -> None:
    block, x_q, x_fp, y = _data(7)
    with torch.no_grad():
        block.acts["h"].scale.mul_(40.0)  # two step sizes of very different magnitude
    start = {k: float(a.scale) for k, a in block.acts.items()}
    cfg = _config("brecq", act_lr=0.05, act_lr_relative=True, round_lr=1e-3, iters=5, act_iters=20)
    result = _run(block, x_q, x_fp, y, cfg)
    moved = {k: abs(float(a.scale) / start[k] - 1) for k, a in block.acts.items()}
    assert all(0.01 < m < 0.7 for m in moved.values()), moved
    assert result.loss_final < result.loss_rtn


def test_untrainable_scales_stay_fixed() -> None:
    block, x_q, x_fp, y = _data(3)
    block.acts["h"].trainable = False
    fixed = float(block.acts["h"].scale)
    _run(block, x_q, x_fp, y, _config("qdrop", iters=10))
    assert float(block.acts["h"].scale) == fixed
    assert float(block.acts["in"].scale) != float(_data(3)[0].acts["in"].scale)


def test_keyboard_interrupt_propagates_and_cleans_up() -> None:
    block, x_q, x_fp, y = _data(4)
    calls = {"n": 0}

    def stop(*_):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt

    block.register_forward_pre_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        _run(block, x_q, x_fp, y, _config("qdrop"))
    assert all(a.drop_prob == 0.0 and not a.learn_scale for a in block.acts.values())
    assert all(not w.soft for w in block.ws.values())


def test_input_errors() -> None:
    block, x_q, x_fp, y = _data()
    with pytest.raises(ValueError, match="inputs_fp"):
        reconstruct_block(block, dict(block.ws), dict(block.acts), [x_q], None, [y], _config("qdrop"),
                          progress=False)
    with pytest.raises(ValueError, match="samples"):
        _run(block, x_q, x_fp, y[:10], _config("adaround"))
    with pytest.raises(ValueError, match="fisher"):
        _run(block, x_q, x_fp, y, _config("adaround", fisher=True))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            _run(block, x_q, x_fp, y, _config("adaround", device="cuda"))


def test_fisher_weighted_run() -> None:
    block, x_q, x_fp, y = _data(5)
    grads = [torch.randn(y.shape, generator=torch.Generator().manual_seed(0))]
    result = _run(block, x_q, x_fp, y, _config("adaround", fisher=True), fisher=grads)
    assert result.loss_final < result.loss_rtn


def test_beta_schedule_shape() -> None:
    sched = BetaSchedule(100, 20.0, 2.0, 0.2)
    assert [sched.active(i) for i in (0, 19, 20, 99)] == [False, False, True, True]
    assert sched(0) == sched(19) == sched(20) == 20.0
    assert sched(60) == pytest.approx(11.0) and sched(100) == pytest.approx(2.0)
    betas = [sched(i) for i in range(20, 100)]
    assert all(a > b for a, b in zip(betas, betas[1:]))
    short = BetaSchedule(10, 20.0, 2.0, 0.2)  # same shape at a tenth of the length
    assert [short(i) for i in range(10)] == pytest.approx([sched(10 * i) for i in range(10)])


def test_loss_normalisation_fisher_and_regulariser() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target, g = (torch.randn(3, 5, 4, 4, generator=gen) for _ in range(3))
    dz = pred - target
    mse = float((dz ** 2).sum() / (3 * 16))  # summed over channels, averaged over batch and space
    assert float(output_error(pred, target, 2.0)) == pytest.approx(mse, rel=1e-5)
    lp = float(dz.abs().pow(2.4).sum(1).mean())
    assert float(output_error(pred, target, 2.4)) == pytest.approx(lp, rel=1e-5)
    assert float(output_error(pred[:, :, 0, 0], target[:, :, 0, 0])) == pytest.approx(
        float((dz[:, :, 0, 0] ** 2).sum() / 3), rel=1e-5)
    assert float(output_error(pred[:, 0, 0, 0], target[:, 0, 0, 0])) == pytest.approx(  # 1-D: a plain mean
        float((dz[:, 0, 0, 0] ** 2).mean()), rel=1e-5)
    leaf = pred.clone().requires_grad_()
    output_error(leaf, target, 2.0).backward()  # the fused p = 2 path has the gradient of its formula
    torch.testing.assert_close(leaf.grad, 2 * dz / (3 * 16))
    fisher = float(((g.abs() + 1) ** 2 * dz ** 2).sum() / (3 * 16))
    assert float(output_error(pred, target, 2.0, g)) == pytest.approx(fisher, rel=1e-5)
    w = AdaRoundWeight(torch.randn(4, 3, generator=gen), torch.full((4,), 0.3), torch.zeros(4), -8, 7, axis=0)
    loss = ReconLoss([w], p=2.0, round_weight=0.5, schedule=BetaSchedule(10, 20, 2, 0.5))
    early, late = loss([pred], [target], 2), loss([pred], [target], 7)
    assert float(early.reg) == 0.0 and float(early.total) == float(early.rec)
    reg = float(w.regularizer(BetaSchedule(10, 20, 2, 0.5)(7)).detach())
    assert float(late.total.detach()) == pytest.approx(float(late.rec) + 0.5 * reg, rel=1e-6)


@pytest.mark.parametrize("bad", [
    dict(method="optq"), dict(iters=0), dict(iters=2.5), dict(batch_size=0), dict(round_lr=0.0),
    dict(act_lr=-1.0), dict(round_weight=-0.1), dict(beta=(2.0, 20.0)), dict(beta=(20.0,)), dict(warmup=1.0),
    dict(drop_prob=1.5), dict(p=0), dict(act_iters=-1), dict(fisher="yes"),
    dict(eval_samples=0), dict(log_every=0), dict(iters=True), dict(order="reverse"), dict(schedule="slow"),
])
def test_config_validation(bad: dict) -> None:
    """The rounding types refuse bad values with a one-line error (the engine trusts their records)."""
    values = {"method": "qdrop" if "drop_prob" in bad else "brecq", **bad}
    with pytest.raises(UserError):
        rounding_from_dict(values)


def test_engine_refuses_a_bad_device_and_holdout() -> None:
    with pytest.raises(UserError, match="torch device"):
        Engine(device="tpu")
    with pytest.raises(UserError, match="holdout"):
        engine_config("brecq", augment=1, holdout=8)


def test_config_presets() -> None:
    paper = recon_settings(BRECQ.paper(), activation_bits=4)
    assert (paper.iters, paper.batch_size, paper.num_samples, paper.act_iters) == (20000, 32, 1024, 5000)
    assert (paper.act_lr, paper.round_weight, paper.beta, paper.warmup, paper.p, paper.act_p) == (
        4e-4, 0.01, (20.0, 2.0), 0.2, 2.0, 2.4)
    assert recon_settings(BRECQ.paper()).act_iters == 5000  # the paper's schedule learns 8-bit steps too
    qdrop = recon_settings(QDrop.paper())
    assert qdrop.act_lr == 4e-5 and qdrop.drop_prob == 0.5 and qdrop.act_iters == 0
    fast = recon_settings(QDrop.fast(), seed=3)
    assert fast.iters < paper.iters and fast.num_samples <= 256 and fast.seed == 3
    assert fast.act_lr_relative and not paper.act_lr_relative
    assert recon_settings(BRECQ.fast(), activation_bits=4).act_iters == BRECQ.fast().iters // 4
    assert recon_settings(BRECQ.fast(iters=40), activation_bits=4).act_iters == 10
    assert recon_settings(BRECQ.fast()).act_iters == 0  # fast, 8-bit activations: no step phase
    assert recon_settings(RoundToNearest()).iters == 0


def test_fast_schedule_leaves_no_soft_rounding() -> None:
    """The fast schedule's regulariser (lambda = 10) makes every h(V) 0 or 1 within its 300 steps, so the
    hard codes keep what the soft ones learned; the papers' lambda = 0.01 leaves a third of them soft
    when the output error is large (inputs scaled x30: errors of order 1, as on real blocks)."""
    results = {}
    for lam in (None, 0.01):
        _, x_q, x_fp, _ = _data(0)
        x_fp, x_q = x_fp.float() * 30.0, x_q.float() * 30.0
        torch.manual_seed(0)
        fp = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
        with torch.no_grad():
            y = fp(x_fp)
        block = QBlock(fp, x_fp)
        for a in block.acts.values():
            a.enabled = False
        extra = {} if lam is None else {"round_weight": lam}
        cfg = recon_settings(AdaRound.fast(eval_samples=64, **extra))
        result = _run(block, x_q, x_fp, y, cfg)
        h = torch.cat([w.h().detach().reshape(-1) for w in block.ws.values()])
        results[lam] = (float(((h > 0.01) & (h < 0.99)).float().mean()), result)
    assert BRECQ.fast().round_weight == 10.0 and BRECQ.paper().round_weight == 0.01
    soft_fast, fast = results[None]
    soft_paper, paper = results[0.01]
    assert soft_fast < 0.01 < 0.2 < soft_paper
    assert fast.loss_final < paper.loss_final < fast.loss_rtn
