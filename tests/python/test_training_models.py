"""Model factory and focal losses of cobalance.training."""

import builtins
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cobalance.training import models as models_mod  # noqa: E402
from cobalance.training import FocalLoss, create_model, list_encoders, list_models  # noqa: E402
from cobalance.training import sigmoid_focal_loss, softmax_focal_loss  # noqa: E402


# -- models --------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["conv-tiny", "resnet-tiny"])
@pytest.mark.parametrize("hw", [(32, 32), (37, 50)])
def test_unet_output_shape_any_size(encoder, hw):
    torch.manual_seed(0)
    model = create_model("unet", in_channels=3, classes=4, encoder=encoder).eval()
    out = model(torch.rand(2, 3, *hw))
    assert out.shape == (2, 4, *hw)


def test_unet_unaligned_input_equals_padded_then_cropped():
    # An input that is not a multiple of 8 is treated as its zero-padded version.
    torch.manual_seed(0)
    model = create_model("unet", classes=2, encoder="conv-tiny").eval()
    x = torch.rand(1, 3, 37, 50)
    with torch.no_grad():
        a = model(x)
        b = model(torch.nn.functional.pad(x, (0, 6, 0, 3)))
    assert b.shape[-2:] == (40, 56)
    torch.testing.assert_close(a, b[..., :37, :50])


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"name must be one of \['smp-unet', 'smp-unet-xception65', 'unet'\]"):
        create_model("unet++", classes=2)
    with pytest.raises(ValueError, match="encoder must be one of"):
        create_model("unet", classes=2, encoder="xception65")
    with pytest.raises(ValueError, match="classes must be a positive integer"):
        create_model("unet", classes=0)
    with pytest.raises(ValueError, match="uses encoder 'tu-xception65'"):
        create_model("smp-unet-xception65", classes=2, encoder="resnet18")
    assert "conv-tiny" in list_encoders() and "unet" in list_models()


def test_encoder_weights_from_local_file(tmp_path):
    torch.manual_seed(1)
    source = create_model("unet", classes=3, encoder="resnet-tiny")
    path = tmp_path / "enc.pt"
    torch.save(source.encoder.state_dict(), path)
    torch.manual_seed(2)
    loaded = create_model("unet", classes=3, encoder="resnet-tiny", encoder_weights_path=path)
    for (k, a), (_, b) in zip(source.encoder.state_dict().items(), loaded.encoder.state_dict().items()):
        assert torch.equal(a, b), k
    torch.save({"state_dict": source.encoder.state_dict()}, tmp_path / "wrapped.pt")
    create_model("unet", classes=3, encoder="resnet-tiny", encoder_weights_path=tmp_path / "wrapped.pt")
    with pytest.raises(ValueError, match="is not a file"):
        create_model("unet", classes=3, encoder_weights_path=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not fit encoder 'conv-tiny'"):
        create_model("unet", classes=3, encoder="conv-tiny", encoder_weights_path=path)


def test_smp_missing_gives_actionable_import_error(monkeypatch):
    real_import = builtins.__import__

    def fail_smp(name, *args, **kwargs):
        if name.startswith("segmentation_models_pytorch"):
            raise ModuleNotFoundError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fail_smp)
    with pytest.raises(ImportError, match=r"cobalance\[training\].*create_model\('unet'"):
        create_model("smp-unet-xception65", classes=3)


def test_smp_xception65_builds_and_trains_on_cpu():
    """The method's model: forward and backward on the CPU, gradients in every layer.

    Runs in the training environment (scripts/setup-training, torch 2.14.1 with
    torchvision), where scripts/test sets COBALANCE_REQUIRE_SMP=1 so that a missing
    segmentation_models_pytorch fails instead of skipping.
    """
    try:
        smp = models_mod._import_smp()
    except ImportError as err:
        if os.environ.get("COBALANCE_REQUIRE_SMP"):
            raise
        pytest.skip(f"segmentation_models_pytorch not importable here (scripts/setup-training builds it): {err}")
    torch.manual_seed(0)
    model = create_model("smp-unet-xception65", classes=5)
    assert isinstance(model, smp.Unet)
    assert type(model.encoder).__name__ == "TimmUniversalEncoder"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > 30_000_000  # Xception-65 (about 40 M with the U-Net decoder), not a small stand-in
    x = torch.rand(2, 3, 64, 64)
    target = (torch.rand(2, 5, 64, 64) < 0.1).float()
    out = model.train()(x)
    assert out.shape == (2, 5, 64, 64)
    loss = FocalLoss("multilabel", gamma=2.0)(out, target)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 5, 64, 64)


# -- focal loss: references written out by hand ---------------------------------------------


def _sigmoid_focal_reference(x, t, gamma, alpha):
    """torchvision.ops.sigmoid_focal_loss, element by element in float64 Python math."""
    out = np.empty(x.shape)
    for idx in np.ndindex(x.shape):
        p = 1.0 / (1.0 + math.exp(-x[idx]))
        ce = -(t[idx] * math.log(p) + (1 - t[idx]) * math.log(1 - p))
        p_t = p * t[idx] + (1 - p) * (1 - t[idx])
        loss = ce * (1 - p_t) ** gamma
        if alpha is not None:
            loss *= alpha * t[idx] + (1 - alpha) * (1 - t[idx])
        out[idx] = loss
    return out


def _softmax_focal_reference(x, y, gamma, alpha, ignore_index):
    b, c = x.shape[:2]
    out = np.zeros((b,) + x.shape[2:])
    for bi in range(b):
        for pos in np.ndindex(x.shape[2:]):
            cls = int(y[(bi,) + pos])
            if ignore_index is not None and cls == ignore_index:
                continue
            z = [x[(bi, k) + pos] for k in range(c)]
            m = max(z)
            p = math.exp(z[cls] - m) / sum(math.exp(v - m) for v in z)
            w = 1.0 if alpha is None else alpha[cls]
            out[(bi,) + pos] = -w * (1 - p) ** gamma * math.log(p)
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_sigmoid_focal_matches_hand_formula(gamma, alpha):
    rng = np.random.default_rng(3)
    x = rng.normal(scale=3, size=(2, 3, 4, 5))
    t = (rng.random(x.shape) < 0.3).astype(np.float64)
    ref = _sigmoid_focal_reference(x, t, gamma, alpha)
    got = sigmoid_focal_loss(torch.tensor(x), torch.tensor(t), gamma=gamma, alpha=alpha, reduction="none")
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    mean = FocalLoss("multilabel", gamma=gamma, alpha=alpha)(torch.tensor(x), torch.tensor(t))
    assert float(mean) == pytest.approx(ref.mean(), rel=1e-10)
    total = sigmoid_focal_loss(torch.tensor(x), torch.tensor(t), gamma=gamma, alpha=alpha, reduction="sum")
    assert float(total) == pytest.approx(ref.sum(), rel=1e-10)


def test_sigmoid_focal_gamma0_is_bce_and_stable():
    x = torch.tensor([[-80.0, -3.0, 0.0, 4.0, 90.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t, reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(x, t, gamma=0.0, reduction="none"), bce)
    assert torch.isfinite(sigmoid_focal_loss(x, t, gamma=2.0, reduction="none")).all()


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("alpha", [None, [0.5, 1.0, 2.0]])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_softmax_focal_matches_hand_formula(gamma, alpha, ignore_index):
    rng = np.random.default_rng(4)
    x = rng.normal(scale=2, size=(2, 3, 4, 3))
    y = rng.integers(0, 3, size=(2, 4, 3))
    if ignore_index is not None:
        y[0, 0, :] = ignore_index
    ref = _softmax_focal_reference(x, y, gamma, alpha, ignore_index)
    xt, yt = torch.tensor(x), torch.tensor(y)
    got = softmax_focal_loss(xt, yt, gamma=gamma, alpha=alpha, ignore_index=ignore_index, reduction="none")
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)
    n_valid = y.size if ignore_index is None else int((y != ignore_index).sum())
    mean = FocalLoss("multiclass", gamma=gamma, alpha=alpha, ignore_index=ignore_index)(xt, yt)
    assert float(mean) == pytest.approx(ref.sum() / n_valid, rel=1e-10)


def test_softmax_focal_gamma0_is_cross_entropy():
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(3, 4, 5, 5)))
    y = torch.tensor(rng.integers(0, 4, size=(3, 5, 5)))
    y[0, 0, 0] = -100
    ce = torch.nn.functional.cross_entropy(x, y, ignore_index=-100)
    torch.testing.assert_close(softmax_focal_loss(x, y, gamma=0.0, ignore_index=-100), ce)


def test_focal_gradients_match_finite_differences():
    rng = np.random.default_rng(6)
    x = torch.tensor(rng.normal(size=(1, 2, 3, 3)), requires_grad=True)
    t = torch.tensor((rng.random((1, 2, 3, 3)) < 0.5).astype(np.float64))
    assert torch.autograd.gradcheck(lambda z: sigmoid_focal_loss(z, t, gamma=2.0, alpha=0.25), (x,))
    y = torch.tensor(rng.integers(0, 2, size=(1, 3, 3)))
    assert torch.autograd.gradcheck(lambda z: softmax_focal_loss(z, y, gamma=1.5), (x,))


def test_focal_bad_input():
    x = torch.zeros(1, 2, 3, 3)
    with pytest.raises(ValueError, match="target must have the shape of logits"):
        sigmoid_focal_loss(x, torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        sigmoid_focal_loss(x, x, gamma=-1)
    with pytest.raises(ValueError, match="alpha must be in"):
        sigmoid_focal_loss(x, x, alpha=1.5)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 2\)"):
        softmax_focal_loss(x, torch.full((1, 3, 3), 2))
    with pytest.raises(ValueError, match="integer class ids"):
        softmax_focal_loss(x, torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="alpha must hold one weight per class"):
        softmax_focal_loss(x, torch.zeros(1, 3, 3, dtype=torch.long), alpha=[1.0])
    with pytest.raises(ValueError, match="mode must be one of"):
        FocalLoss("softmax")
    with pytest.raises(ValueError, match="reduction must be one of"):
        FocalLoss(reduction="avg")


# -- BCE + soft Dice and class weights ---------------------------------------------------------


def _bce_dice_reference(x, t, smooth, weights, bce_weight=1.0):
    """Per class: mean BCE over its elements + 1 - soft Dice over batch and pixels, float64 by hand."""
    c = x.shape[1]
    losses = []
    for k in range(c):
        xs, ts = x[:, k].ravel(), t[:, k].ravel()
        ps = [1.0 / (1.0 + math.exp(-v)) for v in xs]
        bce = sum(-(tt * math.log(p) + (1 - tt) * math.log(1 - p)) for p, tt in zip(ps, ts)) / len(ps)
        inter = sum(p * tt for p, tt in zip(ps, ts))
        dice = (2 * inter + smooth) / (sum(ps) + sum(ts) + smooth)
        losses.append(bce_weight * bce + 1 - dice)
    w = np.ones(c) if weights is None else np.asarray(weights, dtype=np.float64) * c / np.sum(weights)
    return np.asarray(losses) * w


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.5]])
@pytest.mark.parametrize("smooth,bce_weight", [(1.0, 1.0), (1e-3, 1.0), (1.0, 0.0), (1.0, 0.3)])
def test_bce_dice_matches_hand_formula(weights, smooth, bce_weight):
    from cobalance.training import BCEDiceLoss, bce_dice_loss

    rng = np.random.default_rng(5)
    x = rng.normal(scale=2, size=(2, 3, 4, 5))
    t = (rng.random(x.shape) < 0.2).astype(np.float64)
    ref = _bce_dice_reference(x, t, smooth, weights, bce_weight)
    got = bce_dice_loss(torch.tensor(x), torch.tensor(t), smooth=smooth, class_weights=weights, reduction="none",
                        bce_weight=bce_weight)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)
    mean = BCEDiceLoss(smooth=smooth, class_weights=weights, bce_weight=bce_weight)(torch.tensor(x), torch.tensor(t))
    assert float(mean) == pytest.approx(ref.mean(), rel=1e-10)
    # gradients by autograd against central finite differences (float64)
    xt = torch.tensor(x, requires_grad=True)
    bce_dice_loss(xt, torch.tensor(t), smooth=smooth, class_weights=weights, bce_weight=bce_weight).backward()
    eps = 1e-6
    for idx in [(1, 2, 3, 0), (0, 0, 1, 4)]:
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fd = (_bce_dice_reference(xp, t, smooth, weights, bce_weight).mean()
              - _bce_dice_reference(xm, t, smooth, weights, bce_weight).mean())
        assert float(xt.grad[idx]) == pytest.approx(fd / (2 * eps), rel=1e-5)


def test_class_weights_scale_each_class_of_the_focal_loss():
    rng = np.random.default_rng(6)
    x = torch.tensor(rng.normal(size=(2, 3, 4, 4)))
    t = torch.tensor((rng.random((2, 3, 4, 4)) < 0.3).astype(np.float64))
    w = [2.0, 1.0, 0.0]
    plain = sigmoid_focal_loss(x, t, reduction="none")
    got = sigmoid_focal_loss(x, t, reduction="none", class_weights=w)
    scale = torch.tensor(w, dtype=torch.float64) * 3 / sum(w)
    torch.testing.assert_close(got, plain * scale.view(1, 3, 1, 1))
    # weights of all 1 change nothing
    torch.testing.assert_close(FocalLoss(class_weights=[1, 1, 1])(x, t), FocalLoss()(x, t))


@pytest.mark.parametrize("bad", [[1.0, 2.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]])
def test_bad_class_weights_are_refused(bad):
    from cobalance.training import bce_dice_loss

    x, t = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="class_weights"):
        sigmoid_focal_loss(x, t, class_weights=bad)
    with pytest.raises(ValueError, match="class_weights"):
        bce_dice_loss(x, t, class_weights=bad)


def test_bce_dice_bad_input():
    from cobalance.training import bce_dice_loss

    with pytest.raises(ValueError, match="shape"):
        bce_dice_loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="smooth"):
        bce_dice_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), smooth=0)
    with pytest.raises(ValueError, match="bce_weight"):
        bce_dice_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), bce_weight=-1)
    with pytest.raises(ValueError, match="class_weights"):
        FocalLoss("multiclass", class_weights=[1, 2])


def test_head_prior_sets_the_output_bias():
    torch.manual_seed(0)
    model = create_model("unet", classes=4, encoder="conv-tiny", head_prior=0.01)
    np.testing.assert_allclose(model.head.bias.detach().numpy(), np.full(4, math.log(0.01 / 0.99)), rtol=1e-6)
    with torch.no_grad():
        p = torch.sigmoid(model.eval()(torch.rand(2, 3, 32, 32)))
    assert float(p.mean()) < 0.1  # starts near the prior, far below 0.5
    for bad in (0.0, 1.0, -0.5, "0.1"):
        with pytest.raises(ValueError, match="head_prior"):
            create_model("unet", classes=4, head_prior=bad)
