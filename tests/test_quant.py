"""rlq.quant: quantizer grids, estimator gradients against hand-derived values, the integer view against
the fake-quant forward, swap coverage, PTQ calibration, and QAT inside agents and checkpoints."""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from rlq.deploy import reference as ref
from rlq.nets.distributional import CategoricalHead
from rlq.nets.encoders import MLPEncoder, NatureCNN
from rlq.nets.heads import DuelingHead, QHead, QNetwork
from rlq.nets.noisy import linear_factory, reset_noise
from rlq.quant import (ActQuantizer, QuantConfig, QuantConv2d, QuantLinear, QuantNoisyLinear, WeightQuantizer,
                       bias_correct, calibrate, equalize_, fake_quant, integer_layer, is_quantized, layer_roles,
                       lsq_quant, pact_quant, quant_layers, quantize_, set_quant_enabled)

W8 = QuantConfig(name="w8a8")


# -- grids ------------------------------------------------------------------------------------------
def test_fake_quant_values_lie_on_the_grid_and_round_half_to_even():
    s = torch.tensor(0.5)
    x = torch.tensor([-0.25, 0.25, 0.75, 1.26, -3.0, 100.0])
    out = fake_quant(x, s, 2.0, 0, 7)  # codes clamp to [0, 7] around zero point 2: values in [-1, 2.5]
    # -0.25/0.5 = -0.5 -> -0 (half to even) ; 0.5 -> 0 ; 1.5 -> 2 ; 2.52 -> 3 ; -6 -> clamp -2 ; 200 -> 5
    assert out.tolist() == [0.0, 0.0, 1.0, 1.5, -1.0, 2.5]


@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7), (2, 1)])
def test_weight_quantizer_per_channel_symmetric_narrow_range(bits, qmax):
    torch.manual_seed(0)
    w = torch.randn(5, 3, 2, 2)
    wq = WeightQuantizer(bits, "max", channels=5)
    wq.enabled = True
    q, s = wq.integer(w)
    assert torch.allclose(s, w.abs().reshape(5, -1).amax(1) / qmax)
    assert int(q.min()) >= -qmax and int(q.max()) <= qmax
    assert all(int(q[c].abs().max()) == qmax for c in range(5))  # each channel's max hits the edge
    # fake-quant weights are exactly code * scale
    assert torch.equal(wq(w), q.float() * s.reshape(5, 1, 1, 1))


def test_binary_weights_are_sign_times_mean_abs():
    w = torch.tensor([[0.5, -1.5, 0.0], [2.0, 2.0, -2.0]])
    wq = WeightQuantizer(1, "max", channels=2)
    wq.enabled = True
    assert torch.allclose(wq(w), torch.tensor([[2 / 3, -2 / 3, 2 / 3], [2.0, 2.0, -2.0]]))


def test_quest_weight_scale_is_mse_optimal_gaussian_clip():
    w = torch.randn(4, 256)
    wq = WeightQuantizer(4, "quest", channels=4)
    rms = w.pow(2).mean(1).sqrt()
    assert torch.allclose(wq.scale(w).reshape(-1), 2.51393 * rms / 7)


def test_activation_asymmetric_zero_point_and_relu_inputs():
    act = ActQuantizer(8, "ema")
    act.observe(torch.tensor([-1.0, 3.0]))
    s, z = act.qparams()
    assert s == np.float32(4.0 / 255) and z == round(1.0 / s)
    relu = ActQuantizer(8, "ema")
    relu.observe(torch.tensor([0.0, 2.0]))
    s, z = relu.qparams()
    assert z == 0 and s == np.float32(2.0 / 255)
    # a strictly positive range still contains 0 exactly
    pos = ActQuantizer(8, "ema")
    pos.observe(torch.tensor([1.0, 2.0]))
    assert pos.qparams()[1] == 0


def test_ema_observer_updates_only_on_grad_forward_in_training_mode():
    act = ActQuantizer(8, "ema", momentum=0.5)
    act(torch.tensor([0.0, 4.0]))  # first batch initialises
    act(torch.tensor([0.0, 2.0]))
    assert act.max_val == pytest.approx(3.0)
    with torch.no_grad():
        act(torch.tensor([0.0, 100.0]))
    act.eval()
    act(torch.tensor([0.0, 100.0]))
    assert act.max_val == pytest.approx(3.0)


# -- gradients --------------------------------------------------------------------------------------
def test_clipped_ste_gradient():
    x = torch.tensor([-2.0, 0.1, 0.9, 2.0], requires_grad=True)
    fake_quant(x, torch.tensor(0.25), 0.0, -4, 4).sum().backward()  # range [-1, 1]
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_lsq_gradients_match_hand_derivation():
    # s = 0.5, range [-2, 1]; x/s = [-3, -0.6, 0.7, 1.0, 4.0]
    x = torch.tensor([-1.5, -0.3, 0.35, 0.5, 2.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    g = 0.1
    out = lsq_quant(x, s, -2, 1, g)
    assert out.tolist() == [-1.0, -0.5, 0.5, 0.5, 0.5]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    # d/ds: outside -> the clamp bound (-2, 1); inside -> round(v) - v = (-1 + 0.6), (1 - 0.7), (1 - 1)
    expected = (-2 + (-1 + 0.6) + (1 - 0.7) + 0.0 + 1) * g
    assert s.grad.item() == pytest.approx(expected, abs=1e-6)


def test_lsq_per_channel_step_gradient_is_summed_per_channel():
    w = torch.tensor([[0.3, -0.2], [1.0, 5.0]], requires_grad=True)
    s = torch.tensor([[0.1], [1.0]], requires_grad=True)
    lsq_quant(w, s, -7, 7, 1.0).sum().backward()
    # channel 0: v = [3, -2] -> round - v = 0, 0 ; channel 1: v = [1, 5] -> 0, 0
    assert s.grad.flatten().tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    w2 = torch.tensor([[0.26], [9.0]], requires_grad=True)
    s2 = torch.tensor([[0.1], [1.0]], requires_grad=True)
    lsq_quant(w2, s2, -7, 7, 1.0).sum().backward()
    assert s2.grad.flatten().tolist() == pytest.approx([3 - 2.6, 7.0], abs=1e-5)


def test_pact_gradients_match_hand_derivation():
    x = torch.tensor([-1.0, 0.5, 1.0, 2.0], requires_grad=True)
    alpha = torch.tensor([1.0], requires_grad=True)
    out = pact_quant(x, alpha, 2)  # 3 levels of 1/3 on [0, 1]
    assert out.tolist() == pytest.approx([0.0, 2 / 3, 1.0, 1.0])  # 0.5*3 = 1.5 -> 2 (half to even)
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert alpha.grad.tolist() == [2.0]  # x >= alpha for 1.0 and 2.0


def test_quest_trust_mask_blocks_clipped_weights():
    w = torch.tensor([[0.01, 0.02, -0.01, 0.03] * 5 + [5.0]], requires_grad=True)  # scale ~1.6: 5.0 clips
    wq = WeightQuantizer(2, "quest", channels=1)
    wq.enabled = True
    wq(w).sum().backward()
    assert w.grad[0, -1] == 0 and (w.grad[0, :-1] == 1).all()


# -- swapping -----------------------------------------------------------------------------------------
def _nets():
    mlp = QNetwork(MLPEncoder(4, (32, 32)), QHead(32, 2))
    dueling = QNetwork(MLPEncoder(4, (32,)), DuelingHead(32, 3, hidden=16))
    rainbow = QNetwork(NatureCNN(4, 0), CategoricalHead(3136, 6, 51, -10, 10, dueling=True, hidden=64, noisy=True))
    noisy_dueling = QNetwork(MLPEncoder(4, (32,)), DuelingHead(32, 2, 16, linear_factory(True, 0.5)))
    cnn = QNetwork(NatureCNN(4, 512), QHead(512, 6))
    vec, img = torch.randn(3, 4), torch.randint(0, 255, (3, 4, 84, 84), dtype=torch.uint8)
    return [(mlp, vec), (dueling, vec), (rainbow, img), (noisy_dueling, vec), (cnn, img)]


@pytest.mark.parametrize("i", range(5))
def test_quantize_swaps_every_layer_in_place_and_keeps_parameters(i):
    net, x = _nets()[i]
    n_float = sum(isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).__name__ == "NoisyLinear" for m in net.modules())
    params = {k: v for k, v in net.named_parameters()}
    keys = set(net.state_dict())
    torch.manual_seed(0)
    reset_noise(net)
    y0 = net(x)
    quantize_(net, QuantConfig(name="w4a8", weight_bits=4), x)
    assert len(list(quant_layers(net))) == n_float
    for k, v in params.items():  # same Parameter objects: an optimizer built before keeps working
        assert dict(net.named_parameters())[k] is v
    assert keys <= set(net.state_dict())
    assert torch.allclose(net(x), y0)  # quantization starts disabled: identical function
    set_quant_enabled(net)
    assert is_quantized(net)
    y1 = net(x)
    assert y1.shape == y0.shape and not torch.allclose(y1, y0)
    y1.float().sum().backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if "step" not in n and "alpha" not in n)


def test_first_and_last_layers_from_the_graph():
    net, x = _nets()[2]
    roles = {name: layer_roles(net, x)[id(m)] for name, m in net.named_modules() if id(m) in layer_roles(net, x)}
    assert roles["encoder.convs.0"] == {"first"}
    assert roles["head.value.2"] == {"last"} and roles["head.advantage.2"] == {"last"}
    assert roles["head.value.0"] == set()
    quantize_(net, QuantConfig(name="w2a8", weight_bits=2, weight_mode="lsq"), x)
    assert net.encoder.convs[0].wq.bits == 8 and net.head.advantage[2].wq.bits == 8
    assert net.encoder.convs[2].wq.bits == 2 and net.head.value[0].wq.bits == 2


def test_quant_none_is_a_no_op():
    net, x = _nets()[0]
    quantize_(net, QuantConfig())
    assert not list(quant_layers(net))


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="weight_mode='nope'"):
        QuantConfig.from_cfg({"name": "x", "weight_mode": "nope"})
    with pytest.raises(ValueError, match="act_bits=1"):
        QuantConfig.from_cfg({"name": "x", "act_bits": 1})
    with pytest.raises(ValueError, match="unknown quant key"):
        QuantConfig.from_cfg({"name": "x", "bitz": 4})
    assert QuantConfig(start_step=0.5).start_at(1000) == 500
    assert QuantConfig(start_step=300).start_at(1000) == 300


def test_weight_cache_is_invalidated_by_optimizer_steps():
    """Also after a training forward cached the weights and a fused optimizer stepped."""
    net, x = _nets()[0]
    quantize_(net, W8, x)
    set_quant_enabled(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)  # fused: no version-counter bump
    with torch.no_grad():
        before = net(x).clone()
    net(x).sum().backward()  # the fused training forward caches its fake-quant weights
    opt.step()
    with torch.no_grad():
        after = net(x)
        fresh = QNetwork(MLPEncoder(4, (32, 32)), QHead(32, 2))
        quantize_(fresh, W8, x)
        fresh.load_state_dict(net.state_dict())
        assert torch.equal(after, fresh(x))
    assert not torch.equal(before, after)


# -- the fused training forward ------------------------------------------------------------------------
FUSED_CASES = [("ema", "max", 8), ("ema", "lsq", 4), ("lsq", "lsq", 2), ("pact", "quest", 4), ("ema", "max", 1),
               ("lsq", "lsq", 1), ("pact", "max", 8), ("ema", "quest", 2)]


def _composed(layer, x):
    """What a quant layer computes without its fused node: op(act(x), wq(W)) through the single-quantizer
    autograd Functions."""
    if isinstance(layer, QuantConv2d):
        return layer._conv_forward(layer.act(x), layer.wq(layer.weight), layer.bias)
    return torch.nn.functional.linear(layer.act(x), layer.wq(layer.weight), layer.bias)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("act_mode,weight_mode,bits", FUSED_CASES)
def test_fused_training_forward_equals_the_composed_quantizers(act_mode, weight_mode, bits, conv):
    """Same outputs (bit for bit) and gradients for x, W, b and the learned ranges, on signed and ReLU
    inputs, with batches inside and outside the EMA range (clipped and unclipped grids)."""
    import copy
    torch.manual_seed(0)
    if conv:
        layer = QuantConv2d(3, 5, 3, weight_bits=bits, act_bits=8, padding=1, stride=2,
                            quant_kw=dict(weight_mode=weight_mode, act_mode=act_mode))
        shape = (6, 3, 9, 9)
    else:
        layer = QuantLinear(7, 5, weight_bits=bits, act_bits=8, weight_mode=weight_mode, act_mode=act_mode)
        shape = (6, 7)
    for signed in (True, False):
        fused = copy.deepcopy(layer)
        comp = copy.deepcopy(layer)
        first = torch.randn(shape) if signed else torch.randn(shape).abs()
        for m in (fused, comp):
            m(first)  # the observer sees data first
            m.set_quant_enabled(True)
        for scale in (1.0, 0.5, 3.0):  # 3x the observed range: the EMA grid clips
            x = torch.randn(shape) * scale
            x = x if signed else x.relu()
            xf, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            yf, yc = fused(xf), _composed(comp, xc)
            assert fused.act.max_val == comp.act.max_val  # both observed the batch
            assert torch.equal(yf, yc)
            g = torch.randn_like(yf)
            yf.backward(g)
            yc.backward(g)
            assert torch.allclose(xf.grad, xc.grad, rtol=1e-5, atol=1e-6)
            for (name, pf), (_, pc) in zip(fused.named_parameters(), comp.named_parameters()):
                if pc.grad is None:
                    assert pf.grad is None or not pf.grad.any(), name
                else:
                    assert torch.allclose(pf.grad, pc.grad, rtol=1e-5, atol=1e-6), name
            for m in (fused, comp):
                m.zero_grad()
    assert yf.grad_fn is not None and "QuantLayerFn" in type(yf.grad_fn).__name__


@pytest.fixture
def torch_ops(monkeypatch):
    """Run the quantizers on torch ops only (the fallback of the native loops)."""
    from rlq.quant import native
    monkeypatch.setattr(native, "usable", lambda *t: None)


def _native_or_skip():
    from rlq.quant import native
    if native.lib() is None:
        pytest.skip(native.status())
    return native


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (signed zeros included), NaN where the other is NaN (payloads aside)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    return torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def _edge_tensor(n=4099, scale=0.05):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g) * 3
    x[:64] = (torch.arange(-32, 32) + 0.5) * scale  # exact ties at half steps
    x[64:70] = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), -float("inf")])
    x[70] = float("nan")
    x[71:75] = torch.tensor([-0.01, -0.024, 1e-40, -1e-40])  # round to -0.0 / +0.0; subnormals
    return x


@pytest.mark.parametrize("clip", [0, 1, 2])
@pytest.mark.parametrize("lo,hi", [(-128.0, 127.0), (0.0, 255.0), (-7.0, 7.0)])
def test_native_grid_equals_torch_ops(clip, lo, hi, monkeypatch):
    """The native loops compute bit for bit what the torch ops do: ties to even, signed zeros, clamping, NaN
    and infinities, the clipped-STE mask."""
    from rlq.quant import functions as fq
    native = _native_or_skip()
    x = _edge_tensor()
    if clip == 0:  # NO_CLIP is only used when nothing can leave the grid
        x = x[torch.isfinite(x)].clamp(lo * 0.05, hi * 0.05)
    got = fq.grid_fwd(x, 0.05, lo, hi, clip)
    monkeypatch.setattr(native, "usable", lambda *t: None)
    want = fq.grid_fwd(x, 0.05, lo, hi, clip)
    assert _same_bits(got[0], want[0])
    assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1]))


def test_native_weight_and_lsq_loops_equal_torch_ops(monkeypatch):
    from rlq.quant import functions as fq
    native = _native_or_skip()
    torch.manual_seed(0)
    w = torch.randn(33, 70)
    w[3] = 0.0  # an all-zero row: the EPS scale
    w[4, :5] = torch.tensor([0.35, -0.35, 0.7, 1.05, -1.4])  # ties at the 4-bit grid of a 1.4 max (step 0.2)
    w[6, :3] = torch.tensor([-0.0, -1e-4, 1e-4])  # round to signed zeros
    wq = WeightQuantizer(4, "max", channels=33)
    step = torch.rand(33) * 0.1 - 0.02  # some negative and tiny (< EPS after abs) steps
    step[5] = 1e-9
    g = torch.randn(33, 70)
    got_w = wq._quant_nograd(w)
    got = fq.lsq_step_fwd(w, step, -7, 7)
    got_g, got_gs = fq.lsq_step_bwd(g.clone(), got[1], step, -7, 7, 0.3)
    x = _edge_tensor()
    got_mm = native.minmax(native.lib(), x[torch.isfinite(x)]), native.minmax(native.lib(), x)
    monkeypatch.setattr(native, "usable", lambda *t: None)
    assert _same_bits(got_w, wq._quant_nograd(w))
    want = fq.lsq_step_fwd(w, step, -7, 7)
    want_g, want_gs = fq.lsq_step_bwd(g.clone(), want[1], step, -7, 7, 0.3)
    assert _same_bits(got[0], want[0]) and len(got[1]) == 1 and len(want[1]) == 2
    assert _same_bits(got_g, want_g)
    # the step gradients are sums over a row, added in another order: equal to float rounding
    assert torch.allclose(got_gs, want_gs, rtol=1e-4, atol=1e-5 * float(want_gs.abs().max()))
    assert got_mm[0] == tuple(float(v) for v in torch.aminmax(x[torch.isfinite(x)]))
    assert all(math.isnan(v) for v in got_mm[1])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_native_quest_loops_equal_torch_ops(bits, monkeypatch):
    """QuEST weights: the trust-masked grid is bit for bit the torch ops' given the same scales; the RMS scales
    themselves (sums in another order) agree to float rounding."""
    from rlq.quant import functions as fq
    native = _native_or_skip()
    torch.manual_seed(2)
    w = torch.randn(17, 75)
    w[2] = 0.0
    w[3, :4] = torch.tensor([-0.0, -1e-5, 1e-5, 40.0])  # signed zeros, a clipped outlier
    wq = WeightQuantizer(bits, "quest", channels=17, trust=1.0)
    s_native = wq.scale(w)
    t = s_native * 0.5
    got = native.fq_trust(native.lib(), w, s_native, t, -wq.q_max, wq.q_max)
    monkeypatch.setattr(native, "usable", lambda *a: None)
    s_torch = wq.scale(w)
    assert torch.allclose(s_native, s_torch, rtol=1e-6, atol=0) and s_native.shape == s_torch.shape
    want = fq.trust_fwd(w, s_native, 0.0, -wq.q_max, wq.q_max, t)
    assert _same_bits(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("act_mode,weight_mode,bits", FUSED_CASES)
def test_native_training_step_equals_torch_ops(act_mode, weight_mode, bits, conv, monkeypatch):
    """A fused QAT layer's forward and input/weight/bias gradients are the same bits with the native loops
    and with the torch ops (the learned ranges' gradients and QuEST's RMS scales, sums in another order, to
    float rounding)."""
    import copy
    native = _native_or_skip()
    torch.manual_seed(1)
    if conv:
        layer = QuantConv2d(3, 5, 3, weight_bits=bits, act_bits=8, padding=1, stride=2,
                            quant_kw=dict(weight_mode=weight_mode, act_mode=act_mode))
        shape = (6, 3, 9, 9)
    else:
        layer = QuantLinear(40, 5, weight_bits=bits, act_bits=8, weight_mode=weight_mode, act_mode=act_mode)
        shape = (6, 40)
    layer(torch.randn(shape))
    layer.set_quant_enabled(True)
    x = torch.randn(shape) * 3  # beyond the observed range: clipped grids
    g = torch.randn_like(layer(x))
    results = []
    for use_native in (True, False):
        if not use_native:
            monkeypatch.setattr(native, "usable", lambda *t: None)
        m, xi = copy.deepcopy(layer), x.clone().requires_grad_()
        y = m(xi)
        y.backward(g)
        results.append((y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (y1, gx1, p1), (y2, gx2, p2) = results
    if weight_mode == "quest" and bits > 1:  # QuEST's RMS scales are sums in another order: float rounding
        assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-6) and torch.allclose(gx1, gx2, rtol=1e-5, atol=1e-6)
        return
    assert _same_bits(y1, y2) and _same_bits(gx1, gx2)
    for name in p1:
        if name in ("weight", "bias"):
            assert _same_bits(p1[name], p2[name]), name
        elif p2[name] is not None:
            assert torch.allclose(p1[name], p2[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("act_mode,weight_mode,bits", FUSED_CASES[:4])
def test_fused_forward_on_torch_ops_equals_the_composed_quantizers(act_mode, weight_mode, bits, torch_ops):
    """The fused layer without the native loops (no C compiler, or a GPU) still equals the composed quantizers."""
    test_fused_training_forward_equals_the_composed_quantizers(act_mode, weight_mode, bits, conv=False)


def _mlp_pair(cfg: QuantConfig, bias: bool = True, end_relu: bool = False, seed: int = 0):
    """Two copies of a quantized 5-16-16-3 ReLU MLP (QuantSequential), observed once and enabled: the
    second one with the fused chain off (its layers run one autograd node each)."""
    import copy
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16, bias=bias), nn.ReLU(), nn.Linear(16, 3)]
    net = nn.Sequential(*layers, *([nn.ReLU()] if end_relu else []))
    quantize_(net, cfg)
    net(torch.randn(32, 5))
    set_quant_enabled(net, True)
    fused, plain = copy.deepcopy(net), copy.deepcopy(net)
    plain.fuse = False
    return fused, plain


def _same_training_steps(fused, plain, x_grad: bool, shape=(32, 5), steps=(1.0, 3.0, 0.5, 3.0)):
    """Training forwards and backwards of both networks on the same batches (also ones far outside the observed
    ranges: clipped grids) give the same outputs, gradients and observer states, bit for bit."""
    for scale in steps:
        x = torch.randn(shape) * scale
        xf, xp = x.clone().requires_grad_(x_grad), x.clone().requires_grad_(x_grad)
        yf, yp = fused(xf), plain(xp)
        assert "QuantMLPFn" in type(yf.grad_fn).__name__ and "QuantMLPFn" not in type(yp.grad_fn).__name__
        assert _same_bits(yf, yp)
        g = torch.randn_like(yf)
        yf.backward(g)
        yp.backward(g)
        if x_grad:
            assert _same_bits(xf.grad, xp.grad)
        for (name, pf), (_, pp) in zip(fused.named_parameters(), plain.named_parameters()):
            assert (pf.grad is None) == (pp.grad is None), name
            if pp.grad is not None:
                assert _same_bits(pf.grad, pp.grad), name
        for mf, mp in zip(fused.modules(), plain.modules()):
            if isinstance(mf, QuantLinear):
                assert mf.act.get_extra_state() == mp.act.get_extra_state()
        fused.zero_grad(), plain.zero_grad()


@pytest.mark.parametrize("act_mode,weight_mode,bits", FUSED_CASES)
@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("native_loops", [True, False])
def test_fused_mlp_chain_equals_one_node_per_layer(act_mode, weight_mode, bits, x_grad, native_loops, monkeypatch):
    """A quantized Linear/ReLU Sequential trains through one autograd node (QuantMLPFn) with the same values,
    gradients (x, weights, biases, learned weight steps and input ranges) and observer updates as its layers one
    by one, for every estimator, on the native loops (with the fused ReLU-and-mask backward) and on torch ops."""
    from rlq.quant import native
    from rlq.quant.layers import QuantSequential
    if not native_loops:
        monkeypatch.setattr(native, "usable", lambda *t: None)
    cfg = QuantConfig(name="q", weight_bits=bits, weight_mode=weight_mode, act_mode=act_mode)
    fused, plain = _mlp_pair(cfg, bias=bits != 2, end_relu=bits == 4)
    assert type(fused) is QuantSequential
    _same_training_steps(fused, plain, x_grad)


def test_fused_q_network_covers_the_head_and_equals_the_layers(monkeypatch):
    """A quantized MLP QNetwork's training forward is one node from the observation to the Q-values (the
    head's linear layer included), equal to the per-layer path; acting (no autograd) is unchanged."""
    import copy
    torch.manual_seed(1)
    net = QNetwork(MLPEncoder(4, (16, 16)), QHead(16, 3))
    quantize_(net, QuantConfig(name="w4a8", weight_bits=4, weight_mode="lsq"), torch.randn(2, 4))
    net(torch.randn(64, 4))
    set_quant_enabled(net, True)
    plain = copy.deepcopy(net)
    plain.encoder.net.fuse = False
    _same_training_steps(net, plain, x_grad=False, shape=(64, 4))
    with torch.no_grad():
        assert _same_bits(net(torch.ones(3, 4)), plain(torch.ones(3, 4)))


def test_fused_chain_falls_back_where_it_cannot_apply():
    """Hooks on a layer, autograd off, quantization off, and a frozen learned range run the layers one by one
    (the hook sees its layer run)."""
    net, _ = _mlp_pair(W8)
    seen = []
    h = net[2].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    y = net(torch.randn(8, 5))
    assert seen == [(8, 16)] and "QuantMLPFn" not in type(y.grad_fn).__name__
    h.remove()
    grads = []
    h = net[1].register_full_backward_hook(lambda m, gi, go: grads.append(go[0].shape))
    net(torch.randn(8, 5)).sum().backward()
    assert grads == [(8, 16)]  # a backward hook on the ReLU ran: the layers ran one by one
    h.remove()
    with torch.no_grad():
        assert net(torch.randn(8, 5)).grad_fn is None
    set_quant_enabled(net, False)
    assert "QuantMLPFn" not in type(net(torch.randn(8, 5)).grad_fn).__name__
    lsq, _ = _mlp_pair(QuantConfig(name="w8a8", act_mode="lsq"))
    lsq[2].act.step.requires_grad_(False)  # a frozen learned range: the layer's own path handles it
    assert "QuantMLPFn" not in type(lsq(torch.randn(8, 5)).grad_fn).__name__
    # a Sequential with anything else than QuantLinear / ReLU stays an nn.Sequential
    other = quantize_(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), W8)
    assert type(other) is nn.Sequential


def test_native_relu_grid_backward_equals_the_mask_then_threshold_backward():
    from rlq.quant import functions as fq
    native = _native_or_skip()
    h = _edge_tensor().relu()
    g = torch.randn_like(h)
    g[::7] = -g[::7]
    for lo, hi, mask in ((0.0, 255.0, True), (0.0, 15.0, True), (0.0, 255.0, False)):
        _, m = fq.grid_fwd(h, 0.05, lo, hi, fq.CLAMP_MASK)
        want = torch.ops.aten.threshold_backward(g * m if mask else g, h, 0)
        got = native.relu_grid_bwd(native.lib(), g.clone(), h, 0.05, lo, hi, mask)
        assert _same_bits(got, want)


@pytest.mark.parametrize("act_mode", ["lsq", "pact", "ema"])
def test_first_layer_on_grid_inputs_get_no_input_gradient(act_mode, monkeypatch):
    """Inputs on the grid (uint8 frames / 255) leave the learned range unused: the fused backward must not
    compute the input gradient of the first layer (a transposed convolution) for it."""
    conv = QuantConv2d(4, 8, 8, stride=4, quant_kw=dict(act_mode=act_mode))
    conv.act.set_range(0.0, 1.0, on_grid=True)
    conv.set_quant_enabled(True)
    assert conv.act.train_param() is None
    seen = []
    real = QuantConv2d.op_bwd
    monkeypatch.setattr(QuantConv2d, "op_bwd", lambda self, g, x, w, nx, nw, nb: seen.append(nx) or
                        real(self, g, x, w, nx, nw, nb))
    x = torch.randint(0, 256, (2, 4, 20, 20)).float() / 255
    conv(x).sum().backward()
    assert seen == [False] and conv.weight.grad is not None


@pytest.mark.parametrize("native_loops", [True, False])
def test_lsq_activation_no_grad_forward_equals_the_training_forward(native_loops, monkeypatch):
    """Target-network / acting forwards of LSQ activations skip autograd: the same values."""
    from rlq.quant import native
    if not native_loops:
        monkeypatch.setattr(native, "usable", lambda *t: None)
    q = ActQuantizer(8, "lsq")
    q(torch.randn(64, 30))
    q.enabled = True
    x = torch.randn(64, 30) * 3
    y = q(x)
    with torch.no_grad():
        y0 = q(x)
    assert y.grad_fn is not None and y0.grad_fn is None and _same_bits(y.detach(), y0)


@pytest.mark.parametrize("how", ["disabled", "no compiler", "compiler fails", "no source"])
def test_without_the_native_loops_qat_falls_back_to_torch_ops(how, monkeypatch, tmp_path):
    """No C compiler (or one that fails, or RLQ_QUANT_NATIVE=0, or no installed C source): nothing is built,
    status() says why, and QAT runs on the torch ops."""
    from rlq.quant import native
    monkeypatch.setattr(native, "_status", "not loaded yet")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setenv("RLQ_CACHE_DIR", str(tmp_path / "cache"))
    if how == "disabled":
        monkeypatch.setenv("RLQ_QUANT_NATIVE", "0")
    elif how == "no compiler":
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))
    elif how == "compiler fails":
        (tmp_path / "cc").write_text("#!/bin/sh\necho 'error: no' >&2\nexit 1\n")
        (tmp_path / "cc").chmod(0o755)
        monkeypatch.setenv("CC", str(tmp_path / "cc"))
    else:
        monkeypatch.setattr(native, "SOURCE", tmp_path / "missing.c")
    monkeypatch.delenv("RLQ_QUANT_NATIVE", raising=False) if how != "disabled" else None
    assert native.lib() is None and native.usable(torch.ones(3)) is None
    assert native.status().endswith("torch ops")
    assert {"disabled": "RLQ_QUANT_NATIVE=0", "no compiler": "no C compiler", "compiler fails": "failed",
            "no source": "cannot read"}[how] in native.status()
    assert not any((tmp_path / "cache").glob("*.so"))
    layer = QuantLinear(7, 5, weight_bits=4, act_bits=8, weight_mode="lsq", act_mode="ema")
    layer(torch.randn(6, 7))
    layer.set_quant_enabled(True)
    layer(torch.randn(6, 7, requires_grad=True)).sum().backward()
    assert layer.weight.grad is not None and layer.wq.step.grad is not None


def test_target_network_weights_are_quantized_once_per_target_update():
    from unittest import mock
    calls = []
    real = WeightQuantizer._quant_nograd

    def counting(self, w):
        calls.append(id(self))
        return real(self, w)
    agent = _agent("w4a8", target_update_period=4, double=True)
    agent.start_quantization()
    agent.update(_batch())
    target_ids = {id(m.wq) for m in quant_layers(agent.target)}
    with mock.patch.object(WeightQuantizer, "_quant_nograd", counting):
        for _ in range(8):  # updates 2..9: hard copies after updates 4 and 8
            agent.update(_batch())
    # the target quantizes its 3 layers again only after each copy (2 copies); Double DQN's online
    # argmax reuses the weights of the training forward (no online call)
    assert sum(c in target_ids for c in calls) == 3 * 2 and len(calls) == 6
    obs = torch.randn(64, 4)
    with torch.no_grad():  # a hard copy (load_state_dict bumps the versions) makes it the online net, bit for bit
        stale = agent.target(obs)
        agent.target.load_state_dict(agent.online.state_dict())
        assert torch.equal(agent.target(obs), agent.online(obs)) and not torch.equal(stale, agent.online(obs))


def test_polyak_target_updates_refresh_the_cached_weights():
    agent = _agent("w8a8", tau=0.3)
    agent.start_quantization()
    obs = torch.randn(64, 4)
    for _ in range(3):
        agent.update(_batch())
        with torch.no_grad():
            got = agent.target(obs)
            fresh = QNetwork(MLPEncoder(4, (256, 256)), QHead(256, 2))
            quantize_(fresh, W8, obs)
            fresh.load_state_dict(agent.target.state_dict())
            assert torch.equal(got, fresh(obs))


# -- integer equivalence --------------------------------------------------------------------------------
def _integer_forward(layers, x: np.ndarray, relu_between=True, flatten_after: int | None = None):
    """Run the integer reference layer by layer; returns the last layer's float output and the codes."""
    h, codes = x, []
    for i, layer in enumerate(layers):
        il = integer_layer(layer)
        q = ref.quantize_input(h, il.in_scale, il.in_zero_point, il.in_bits)
        codes.append(q)
        if il.kind == "conv2d":
            acc = ref.conv2d_acc(q, il.in_zero_point, il.weight.astype(np.int32), il.stride, il.padding)
        else:
            acc = ref.linear_acc(q, il.in_zero_point, il.weight)
        h = ref.dequantize(acc, il.out_scale, il.bias)
        if i < len(layers) - 1 and relu_between:
            h = np.maximum(h, 0)
        if flatten_after is not None and i == flatten_after:
            h = h.reshape(len(h), -1)
    return h, codes


def _fake_codes(layers, net, x):
    got = []
    hooks = [m.register_forward_pre_hook(lambda m, a: got.append(
        (torch.round(a[0] / m.act.qparams()[0]) + m.act.qparams()[1]).clamp(0, m.act.q_max).int().numpy()))
        for m in layers]
    with torch.no_grad():
        out = net(x)
    for h in hooks:
        h.remove()
    return out, got


@pytest.mark.parametrize("cfg", [W8, QuantConfig(name="w4a8", weight_bits=4, weight_mode="lsq"),
                                 QuantConfig(name="w2a8", weight_bits=2, weight_mode="lsq", act_mode="lsq")])
def test_integer_math_reproduces_fake_quant_mlp(cfg):
    torch.manual_seed(0)
    net = QNetwork(MLPEncoder(6, (64, 64)), QHead(64, 3))
    x = torch.randn(512, 6) * 3
    quantize_(net, cfg, x)
    for _ in range(3):  # observers see training batches
        net(x[:128])
    set_quant_enabled(net)
    net(x[:128])
    layers = [net.encoder.net[0], net.encoder.net[2], net.head.q]
    fake, fake_codes = _fake_codes(layers, net, x)
    out, codes = _integer_forward(layers, x.numpy())
    for a, b in zip(codes, fake_codes):
        assert (a == b).mean() >= 0.999 and np.abs(a - b).max() <= 1
    # end to end, a row whose codes hit a tie differs by one step somewhere; the rest agree to rounding
    close = np.isclose(out, fake.numpy(), rtol=1e-4, atol=1e-4 * float(fake.abs().max())).all(1)
    assert close.mean() >= 0.99
    np.testing.assert_allclose(out, fake.numpy(), atol=0.02 * float(fake.abs().max()))
    assert (out.argmax(1) == fake.numpy().argmax(1)).mean() >= 0.99
    _assert_layerwise_exact(layers, net, x)


def test_integer_math_reproduces_fake_quant_nature_cnn():
    torch.manual_seed(0)
    net = QNetwork(NatureCNN(4, 512), QHead(512, 6))
    x = torch.randint(0, 256, (8, 4, 84, 84), dtype=torch.uint8)
    quantize_(net, W8, x)
    net(x)
    set_quant_enabled(net)
    layers = [net.encoder.convs[0], net.encoder.convs[2], net.encoder.convs[4], net.encoder.fc[0], net.head.q]
    fake, fake_codes = _fake_codes(layers, net, x)
    # the network scales uint8 pixels by 1/255 in float32; the first input code is then the pixel itself
    out, codes = _integer_forward(layers, x.numpy().astype(np.float32) / np.float32(255.0), flatten_after=2)
    assert np.array_equal(codes[0], x.numpy())
    # float32 sums over 3136 products in a different order: a code can land one step away at a tie
    for a, b in zip(codes, fake_codes):
        assert (a == b).mean() >= 0.99 and np.abs(a - b).max() <= 1
    np.testing.assert_allclose(out, fake.numpy(), atol=0.01 * float(fake.abs().max()))
    _assert_layerwise_exact(layers, net, x)


def _assert_layerwise_exact(layers, net, x):
    """Given the same input codes, each layer's integer math gives its fake-quant output up to float
    rounding (float32 sums in another order)."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.append((m, a[0], out))) for m in layers]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    for m, inp, out in seen:
        il = integer_layer(m)
        q = ref.quantize_input(inp.numpy(), il.in_scale, il.in_zero_point, il.in_bits)
        acc = (ref.conv2d_acc(q, il.in_zero_point, il.weight, il.stride, il.padding) if il.kind == "conv2d"
               else ref.linear_acc(q, il.in_zero_point, il.weight))
        y = ref.dequantize(acc, il.out_scale, il.bias)
        np.testing.assert_allclose(y, out.numpy(), rtol=1e-5, atol=1e-5 * float(out.abs().max()))


# -- PTQ ----------------------------------------------------------------------------------------------------
def test_calibrate_minmax_percentile_mse():
    torch.manual_seed(0)
    obs = torch.randn(4000, 4)
    obs[0] = 40.0  # one outlier
    nets = {}
    for method in ("minmax", "percentile", "mse"):
        net = QNetwork(MLPEncoder(4, (32,)), QHead(32, 2))
        torch.manual_seed(1)
        net.load_state_dict(QNetwork(MLPEncoder(4, (32,)), QHead(32, 2)).state_dict())
        quantize_(net, W8, obs[:2])
        ranges = calibrate(net, obs, method=method, percentile=99.9)
        nets[method] = (net, ranges)
        assert is_quantized(net) and all(m.act.frozen for m in quant_layers(net))
    first = "encoder.net.0"
    assert nets["minmax"][1][first] == pytest.approx((float(obs.min()), 40.0))
    assert nets["percentile"][1][first][1] < 5 and nets["mse"][1][first][1] < 40.0

    def err(net):  # quantization error of the first layer's input
        act = net.encoder.net[0].act
        s, z = act.qparams()
        xq = ((torch.round(obs / s) + z).clamp(0, 255) - z) * s
        return float((xq - obs).pow(2).mean())
    assert err(nets["mse"][0]) < err(nets["minmax"][0])
    net = nets["minmax"][0]
    before = net.encoder.net[0].act.max_val
    net(obs * 10)  # frozen observers do not move
    assert before == net.encoder.net[0].act.max_val


def test_calibrate_errors():
    net = QNetwork(MLPEncoder(4, (8,)), QHead(8, 2))
    with pytest.raises(ValueError, match="quantize_"):
        calibrate(net, torch.randn(10, 4))
    quantize_(net, W8, torch.randn(2, 4))
    with pytest.raises(ValueError, match="method 'bad'"):
        calibrate(net, torch.randn(10, 4), method="bad")


def _skewed_mlp(dueling: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """A float MLP Q-network whose hidden units have very different ranges (what equalization is for)."""
    torch.manual_seed(0)
    head = DuelingHead(32, 3, 0) if dueling else QHead(32, 3)
    net = QNetwork(MLPEncoder(4, (32, 32)), head)
    with torch.no_grad():
        first = net.encoder.net[0]
        first.weight.mul_(torch.logspace(-2, 1, 32)[:, None])  # unit ranges spread over three decades
    return net, torch.randn(2000, 4)


@pytest.mark.parametrize("dueling", [False, True])
def test_equalize_keeps_the_function_and_equalizes_the_hidden_ranges(dueling):
    net, obs = _skewed_mlp(dueling)
    with torch.no_grad():
        before = net(obs)
    with torch.no_grad():
        h0 = net.encoder.net[1](net.encoder.net[0](obs)).amax(0)
    ratios = equalize_(net, obs, alpha=1.0)
    with torch.no_grad():
        torch.testing.assert_close(net(obs), before, rtol=1e-5, atol=1e-5)
    assert set(ratios) == {"encoder.net.0", "encoder.net.2"}  # both hidden layers (dueling: both streams scaled)
    with torch.no_grad():
        h1 = net.encoder.net[1](net.encoder.net[0](obs)).amax(0)
    live = h0 > 0
    assert float(h0[live].max() / h0[live].min()) > 100
    assert float(h1[live].max() / h1[live].min()) == pytest.approx(1.0, rel=1e-3)  # alpha=1: equal maxima
    assert bool((h1[~live] == 0).all())


def test_equalize_keeps_a_sac_actor_tuple_output():
    from rlq.agents.sac import GaussianActor
    torch.manual_seed(0)
    actor = GaussianActor(3, 1, [32, 32], -5.0, 2.0)
    obs = torch.randn(500, 3)
    with torch.no_grad():
        before = actor(obs)
    assert set(equalize_(actor, obs)) == {"net.0", "net.2"}  # the trunk feeds both the mean and the log-std
    with torch.no_grad():
        for a, b in zip(actor(obs), before):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_equalize_then_ptq_is_closer_to_the_float_network():
    net, obs = _skewed_mlp()
    with torch.no_grad():
        ref_q = net(obs)
    errs = {}
    for eq in (False, True):
        n, _ = _skewed_mlp()
        if eq:
            equalize_(n, obs, alpha=0.5)
        quantize_(n, W8, obs[:2])
        calibrate(n, obs)
        with torch.no_grad():
            errs[eq] = float((n(obs) - ref_q).abs().mean())
    assert errs[True] < 0.8 * errs[False]


def test_equalize_refuses_what_it_cannot_rescale():
    net, obs = _skewed_mlp()
    quantize_(net, W8, obs[:2])
    with pytest.raises(ValueError, match="before quantize_"):
        equalize_(net, obs)
    net, obs = _skewed_mlp()
    with pytest.raises(ValueError, match="alpha=2"):
        equalize_(net, obs, alpha=2.0)

    class Skip(nn.Module):  # the hidden ReLU output is also added to the output: rescaling it changes the function
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) + h

    torch.manual_seed(0)
    skip = Skip()
    with torch.no_grad():
        skip.a.weight.mul_(torch.tensor([0.01, 1.0, 10.0])[:, None])
    w = skip.a.weight.clone()
    with pytest.raises(ValueError, match="weights restored"):
        equalize_(skip, torch.randn(100, 4))
    assert torch.equal(skip.a.weight, w)


def test_bias_correction_matches_every_channel_mean_and_leaves_the_quantizers_alone():
    net, obs = _skewed_mlp()
    float_net, _ = _skewed_mlp()
    quantize_(net, QuantConfig(name="w4a8", weight_bits=4, first_bits=4, last_bits=4), obs[:2])
    calibrate(net, obs)
    layers = list(quant_layers(net))
    state = [(m.act.qparams(), m.wq.enabled, m.act.enabled) for m in layers]

    def means(model):
        out = []
        hooks = [m.register_forward_hook(lambda m, a, y: out.append(y.mean(0))) for m in model.modules()
                 if isinstance(m, nn.Linear)]
        with torch.no_grad():
            model(obs)
        for h in hooks:
            h.remove()
        return out
    before = [float((a - b).abs().max()) for a, b in zip(means(net), means(float_net))]
    corr = bias_correct(net, obs)
    after = [float((a - b).abs().max()) for a, b in zip(means(net), means(float_net))]
    assert set(corr) == {"encoder.net.0", "encoder.net.2", "head.q"}
    assert before[-1] > 1e-3 and all(x < 1e-4 for x in after)  # every channel's mean is the float one
    assert [(m.act.qparams(), m.wq.enabled, m.act.enabled) for m in layers] == state
    with pytest.raises(ValueError, match="quantize_"):
        bias_correct(float_net, obs)
    # layers the forward never reaches are left alone
    head_bias = net.head.q.bias.clone()
    assert set(bias_correct(net, obs, forward=lambda x: net.encoder(x))) == {"encoder.net.0", "encoder.net.2"}
    assert torch.equal(net.head.q.bias, head_bias)


# -- agents -------------------------------------------------------------------------------------------
def _agent(quant, **over):
    from rlq.agents import make_agent
    from rlq.train import _compose
    cfg = _compose(["agent=dqn", f"quant={quant}"] + [f"agent.{k}={v}" for k, v in over.items()])
    return make_agent(cfg.agent, gym.spaces.Box(-5, 5, (4,), np.float32), gym.spaces.Discrete(2), seed=0,
                      quant=cfg.quant)


def _batch(n=32):
    from rlq.replay.base import Batch
    g = torch.Generator().manual_seed(0)
    return Batch(obs=torch.randn(n, 4, generator=g), action=torch.randint(0, 2, (n,), generator=g),
                 reward=torch.randn(n, generator=g), discount=torch.full((n,), 0.99),
                 next_obs=torch.randn(n, 4, generator=g), idx=torch.arange(n), weights=torch.ones(n))


def test_dqn_agent_qat_online_and_target_consistent():
    agent = _agent("w4a8", target_update_period=3)
    assert len(list(quant_layers(agent.online))) == 3 and len(list(quant_layers(agent.target))) == 3
    assert not is_quantized(agent.online)
    agent.update(_batch())
    agent.start_quantization()
    assert is_quantized(agent.online) and is_quantized(agent.target)
    for _ in range(2):
        agent.update(_batch())
    # after a hard update the target holds the online network's weights and quantizer state
    for (k, a), (_, b) in zip(agent.online.state_dict().items(), agent.target.state_dict().items()):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, k
    obs = torch.randn(64, 4)
    with torch.no_grad():
        assert torch.equal(agent.online(obs), agent.target(obs))


def test_soft_target_update_copies_observer_state():
    agent = _agent("w8a8", tau=0.5)
    agent.start_quantization()
    agent.update(_batch())
    ta, oa = agent.target.encoder.net[0].act, agent.online.encoder.net[0].act
    assert ta.max_val == oa.max_val and ta.enabled


def test_quantized_checkpoint_round_trip(tmp_path):
    from rlq.checkpoint import load_agent
    from rlq.train import build_config, _compose
    from rlq.trainer import Trainer
    ov = ["agent=dqn", "quant=w4a8", "quant.start_step=0.5", "total_steps=1200", "agent.learning_starts=200",
          "eval.every=0", "eval.final=false", "checkpoint.every=0", "log.progress=false", "log.tensorboard=false"]
    cfg = build_config(_compose(ov), ov)
    tr = Trainer(cfg, tmp_path / "run")
    tr.train()
    tr.close()
    assert is_quantized(tr.agent.online)
    from rlq.logging import read_metrics
    assert [r["step"] for r in read_metrics(tmp_path / "run", "event")] == [600]
    agent = load_agent(tmp_path / "run")
    assert is_quantized(agent.online)
    assert agent.online.encoder.net[2].wq.bits == 4 and agent.online.encoder.net[0].wq.bits == 8
    obs = np.random.default_rng(0).normal(size=(256, 4)).astype(np.float32)
    assert np.array_equal(agent.act(obs, explore=False), tr.agent.act(obs, explore=False))
    sd_a, sd_b = agent.online.state_dict(), tr.agent.online.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) if torch.is_tensor(sd_b[k]) else sd_a[k] == sd_b[k] for k in sd_b)


def test_bad_quant_preset_and_key_give_one_line_errors():
    from rlq.config import ConfigError, validate
    from rlq.train import _compose, build_config
    with pytest.raises(ConfigError, match="act_mode='x'"):
        ov = ["quant=w8a8", "quant.act_mode=x"]
        build_config(_compose(ov), ov)


def test_pixel_inputs_are_their_own_codes():
    torch.manual_seed(0)
    net = QNetwork(NatureCNN(4, 512), QHead(512, 6))
    x = torch.randint(0, 120, (4, 4, 84, 84), dtype=torch.uint8)  # max pixel far below 255
    quantize_(net, W8, x, pixel_input=True)
    net(x)
    set_quant_enabled(net)
    first = net.encoder.convs[0]
    il = integer_layer(first)
    assert il.in_scale == np.float32(1 / 255) and il.in_zero_point == 0
    q = ref.quantize_input(x.numpy().astype(np.float32) / np.float32(255), il.in_scale, 0, 8)
    assert np.array_equal(q, x.numpy())
    xf = x.float() / 255
    assert torch.equal(first.act(xf), xf)  # the fake quantization of pixels is the identity
    calibrate(net, x)  # PTQ keeps the pixel grid
    assert integer_layer(first).in_scale == np.float32(1 / 255)
