"""Tests of the latent noise (src.noise), of the ConvNet's noise wiring
(src.model) and of the transductive batch norm (src.layers.batch_norm),
each against an independent numpy computation.

Statistical tests use fixed seeds (so they are repeatable) and tolerances of
about 5 standard errors derived from the number of draws.
"""

import math

import numpy as np
import pytest

import src  # noqa: F401  (sets TensorFlow's environment defaults first)
import tensorflow as tf
from numpy.polynomial.hermite_e import hermegauss

from src.layers import BN_EPSILON, add_bias, batch_norm, channel_sum
from src.model import ConvNet
from src.noise import (AdditiveHeadNoise, MultiplicativeMetaDropout, NoNoise,
                       normal)

Z = 5.0  # standard errors allowed by the statistical tests


def softplus(a):
    """Numerically stable softplus in numpy: log(1 + e^a)."""
    return np.logaddexp(0.0, a)


def seed(a, b):
    return tf.constant([a, b], tf.int32)


# ------------------------------------------------------------------ normal


@pytest.fixture(scope="module")
def million_draws():
    """10^6 float32 draws of normal() as float64 numpy, for the moment tests."""
    return normal([1000, 1000], seed(7, 11), tf.float32).numpy().astype(np.float64).ravel()


@pytest.mark.parametrize("shape", [[0], [1], [7], [3, 5, 7], [2, 0, 3], [4, 1, 9, 1]])
def test_normal_shape(shape):
    """normal() returns exactly the requested shape, also for odd element
    counts (Box-Muller makes pairs) and empty shapes, from a list or a tensor."""
    for s in (shape, tf.constant(shape, tf.int32)):
        z = normal(s, seed(1, 2), tf.float32)
        assert z.shape == tuple(shape)
        assert z.dtype == tf.float32
        assert np.all(np.isfinite(z.numpy()))


def test_normal_moments(million_draws):
    """10^6 draws: mean 0, variance 1, skewness 0, kurtosis 3, within 5
    standard errors (sqrt(1/n), sqrt(2/n), sqrt(6/n), sqrt(24/n))."""
    z = million_draws
    n = z.size
    mean = z.mean()
    c = z - mean
    var = np.mean(c ** 2)
    skew = np.mean(c ** 3) / var ** 1.5
    kurt = np.mean(c ** 4) / var ** 2
    assert abs(mean) < Z * math.sqrt(1 / n), mean
    assert abs(var - 1) < Z * math.sqrt(2 / n), var
    assert abs(skew) < Z * math.sqrt(6 / n), skew
    assert abs(kurt - 3) < Z * math.sqrt(24 / n), kurt


def test_normal_kolmogorov_smirnov(million_draws):
    """The empirical CDF of 10^6 draws is within the Kolmogorov-Smirnov
    critical distance at level 1e-3 (1.95/sqrt(n)) of the normal CDF
    (computed with math.erf)."""
    z = np.sort(million_draws)
    n = z.size
    erf = np.frompyfunc(math.erf, 1, 1)
    cdf = 0.5 * (1.0 + erf(z / math.sqrt(2.0)).astype(np.float64))
    i = np.arange(1, n + 1)
    d = max(np.max(i / n - cdf), np.max(cdf - (i - 1) / n))
    assert d < 1.95 / math.sqrt(n), d


def test_normal_halves_uncorrelated(million_draws):
    """Box-Muller pairs (cos half, sin half) and neighbouring draws are
    uncorrelated, and so are their squares (a shared radius would show here)."""
    z = million_draws
    half = z.size // 2
    for a, b in ((z[:half], z[half:2 * half]), (z[:-1], z[1:])):
        tol = Z / math.sqrt(a.size)
        assert abs(np.corrcoef(a, b)[0, 1]) < tol
        assert abs(np.corrcoef(a ** 2, b ** 2)[0, 1]) < tol


def test_normal_seeding():
    """Same seed -> identical draws (also int64 seeds equal to int32 ones);
    a different seed in either component -> different draws."""
    a = normal([101], seed(3, 4), tf.float32).numpy()
    b = normal([101], seed(3, 4), tf.float32).numpy()
    c = normal([101], tf.constant([3, 4], tf.int64), tf.float32).numpy()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    for other in (seed(3, 5), seed(4, 4)):
        d = normal([101], other, tf.float32).numpy()
        assert np.mean(a == d) < 0.01
        assert abs(np.corrcoef(a, d)[0, 1]) < 0.4


def test_normal_repeatable_inside_tf_function():
    """Inside a tf.function, the same seed gives the same draws as eagerly."""
    f = tf.function(lambda s: normal([5, 7], s, tf.float32))
    np.testing.assert_array_equal(f(seed(9, 9)).numpy(),
                                  normal([5, 7], seed(9, 9), tf.float32).numpy())


def test_normal_float64():
    """float64 draws have dtype float64 and the moments of N(0, 1)."""
    z = normal([200001], seed(5, 6), tf.float64)
    assert z.dtype == tf.float64 and z.shape == (200001,)
    z = z.numpy()
    n = z.size
    assert abs(z.mean()) < Z * math.sqrt(1 / n)
    assert abs(z.var() - 1) < Z * math.sqrt(2 / n)


# ----------------------------------------------------- multiplicative noise


def test_meta_dropout_deterministic_is_mu_times_softplus_alpha():
    """sample=False: output = mu * softplus(alpha) (numpy), elementwise,
    including large |alpha| where a naive softplus would overflow."""
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(4, 5, 5, 3))
    alpha = rng.normal(scale=3.0, size=(4, 5, 5, 3))
    alpha[0, 0, 0] = [-60.0, 60.0, 0.0]
    noise = MultiplicativeMetaDropout()
    for dtype in (np.float32, np.float64):
        taps = {}
        out = noise(None, tf.constant(mu, dtype), [tf.constant(alpha, dtype)],
                    {}, sample=False, seed=None, taps=taps).numpy()
        tol = 1e-6 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(out, mu * softplus(alpha), rtol=tol, atol=tol)
        np.testing.assert_allclose(taps["mask"].numpy(), softplus(alpha),
                                   rtol=tol, atol=tol)


def test_meta_dropout_sampled_is_mu_times_softplus_alpha_plus_eps():
    """sample=True: output = mu * softplus(alpha + eps) with eps the
    normal() draws of the given seed and alpha's shape."""
    rng = np.random.default_rng(1)
    mu = tf.constant(rng.normal(size=(3, 4, 4, 2)), tf.float64)
    alpha = tf.constant(rng.normal(size=(3, 4, 4, 2)), tf.float64)
    s = seed(2, 3)
    out = MultiplicativeMetaDropout()(None, mu, [alpha], {}, sample=True,
                                      seed=s).numpy()
    eps = normal(tf.shape(alpha), s, tf.float64).numpy()
    np.testing.assert_allclose(out, mu.numpy() * softplus(alpha.numpy() + eps),
                               rtol=1e-12)


def gauss_hermite_moments(alpha, order=120):
    """E[f], Var[f] and the 4th central moment of f = softplus(alpha + eps),
    eps ~ N(0, 1), by Gauss-Hermite (probabilists') quadrature."""
    x, w = hermegauss(order)
    w = w / math.sqrt(2 * math.pi)
    f = softplus(alpha + x)
    mean = np.sum(w * f)
    var = np.sum(w * (f - mean) ** 2)
    m4 = np.sum(w * (f - mean) ** 4)
    return mean, var, m4


def test_gauss_hermite_reference_is_right():
    """Sanity check of the reference: quadrature of eps, eps^2, eps^4 gives
    0, 1, 3, and softplus(alpha + eps) at alpha=-40 has mean ~ E[e^(alpha+eps)]."""
    x, w = hermegauss(120)
    w = w / math.sqrt(2 * math.pi)
    np.testing.assert_allclose([w.sum(), (w * x).sum(), (w * x ** 2).sum(),
                                (w * x ** 4).sum()], [1, 0, 1, 3], atol=1e-12)
    mean, _, _ = gauss_hermite_moments(-40.0)
    np.testing.assert_allclose(mean, math.exp(-40 + 0.5), rtol=1e-10)


@pytest.mark.parametrize("alpha", [-3.0, 0.0, 2.0])
def test_meta_dropout_sampled_mask_moments(alpha):
    """With mu = 1, the mean and variance of 4*10^5 sampled masks
    softplus(alpha + eps) match Gauss-Hermite quadrature, within 5 standard
    errors (sqrt(Var/n) for the mean, sqrt((m4 - Var^2)/n) for the variance)."""
    n = 400_000
    a = tf.fill([n // 16, 4, 4, 1], tf.constant(alpha, tf.float32))
    out = MultiplicativeMetaDropout()(None, tf.ones_like(a), [a], {}, sample=True,
                                      seed=seed(int(alpha * 10) + 100, 1))
    f = out.numpy().astype(np.float64).ravel()
    mean, var, m4 = gauss_hermite_moments(alpha)
    assert abs(f.mean() - mean) < Z * math.sqrt(var / n), (f.mean(), mean)
    assert abs(f.var() - var) < Z * math.sqrt((m4 - var ** 2) / n), (f.var(), var)
    assert f.min() > 0  # softplus is positive: the mask never flips a sign


# ---------------------------------------------------------- additive head


def head_params(rng, features, dtype):
    return {"noise_kernel": tf.constant(rng.normal(scale=0.5, size=(features, 1)), dtype),
            "noise_bias": tf.constant([0.3], dtype)}


def head_maps(h, p):
    """What DenseHead hands the head noise: its input map h . w_phi + b_phi."""
    return [tf.matmul(h, p["noise_kernel"]) + p["noise_bias"]]


def test_head_noise_deterministic_returns_mu():
    """sample=False: the head noise returns mu exactly and taps nothing."""
    rng = np.random.default_rng(2)
    mu = tf.constant(rng.normal(size=(6, 5)), tf.float32)
    h = tf.constant(rng.normal(size=(6, 8)), tf.float32)
    taps = {}
    p = head_params(rng, 8, tf.float32)
    out = AdditiveHeadNoise()(h, mu, head_maps(h, p), p,
                              sample=False, seed=None, taps=taps)
    np.testing.assert_array_equal(out.numpy(), mu.numpy())
    assert taps == {}


def test_head_noise_sampled_formula():
    """sample=True: logits = mu + softplus(h . w + b) * eps, sigma [N, 1]
    (numpy) shared by the way logits, eps the normal() draws of mu's shape."""
    rng = np.random.default_rng(3)
    mu = rng.normal(size=(6, 5))
    h = rng.normal(size=(6, 8))
    p = head_params(rng, 8, tf.float64)
    s = seed(4, 4)
    taps = {}
    out = AdditiveHeadNoise()(tf.constant(h), tf.constant(mu),
                              head_maps(tf.constant(h), p), p, sample=True,
                              seed=s, taps=taps).numpy()
    sigma = softplus(h @ p["noise_kernel"].numpy() + p["noise_bias"].numpy())
    assert sigma.shape == (6, 1)
    np.testing.assert_allclose(taps["sigma"].numpy(), sigma, rtol=1e-12)
    eps = normal(tf.shape(mu), s, tf.float64).numpy()
    np.testing.assert_allclose(out, mu + sigma * eps, rtol=1e-12, atol=1e-12)


def test_head_noise_sampled_statistics():
    """Over 20000 replicas of 4 examples, the sampled logits of each example
    and each of the 5 way outputs have mean mu and std softplus(h.w + b)
    (numpy), i.e. the scale is per example and shared across outputs."""
    rng = np.random.default_rng(4)
    n_ex, way, feat, reps = 4, 5, 8, 20000
    mu = rng.normal(size=(n_ex, way))
    h = rng.normal(size=(n_ex, feat))
    p = head_params(rng, feat, tf.float32)
    sigma = softplus(h @ p["noise_kernel"].numpy().astype(np.float64)
                     + p["noise_bias"].numpy())  # [n_ex, 1]
    assert np.ptp(sigma) > 0.2  # examples have clearly different scales
    big_h = np.tile(h, (reps, 1))
    big_mu = np.tile(mu, (reps, 1))
    big_h = tf.constant(big_h, tf.float32)
    out = AdditiveHeadNoise()(big_h, tf.constant(big_mu, tf.float32),
                              head_maps(big_h, p), p,
                              sample=True, seed=seed(8, 8)).numpy()
    out = out.astype(np.float64).reshape(reps, n_ex, way)
    mean, std = out.mean(0), out.std(0)
    sig = np.broadcast_to(sigma, (n_ex, way))
    assert np.all(np.abs(mean - mu) < Z * sig / math.sqrt(reps))
    assert np.all(np.abs(std - sig) < Z * sig / math.sqrt(2 * reps))


def test_no_noise_returns_mu():
    """NoNoise (MAML) returns mu unchanged, sampling or not."""
    mu = tf.constant([[1.0, -2.0]])
    for sample in (False, True):
        out = NoNoise()(None, mu, [], {}, sample=sample, seed=seed(1, 1))
        np.testing.assert_array_equal(out.numpy(), mu.numpy())


# ------------------------------------------------------------------ ConvNet


def images(n, rng, dtype=np.float32):
    """n Omniglot-like binary images [n, 28, 28, 1]."""
    return (rng.random((n, 28, 28, 1)) < 0.25).astype(dtype)


def randomize(model, rng):
    """Gives every variable random values of a useful scale (the noise
    generator's zero bias and tiny kernels would make the masks ~constant)."""
    for name, v in model.params().items():
        shape = v.shape.as_list()
        if name.endswith("kernel"):
            fan_in = int(np.prod(shape[:-1]))
            scale = (2.0 if "noise" in name else 1.5) / math.sqrt(fan_in)
            v.assign(rng.normal(scale=scale, size=shape))
        else:
            v.assign(rng.normal(scale=0.5, size=shape))


@pytest.fixture(scope="module")
def maml_net():
    return ConvNet("omniglot", 5, noise="none", seed=3)


@pytest.fixture(scope="module")
def md_net():
    net = ConvNet("omniglot", 5, noise="meta_dropout", seed=3)
    randomize(net, np.random.default_rng(10))
    return net


@pytest.fixture(scope="module")
def md_net64():
    net = ConvNet("omniglot", 5, noise="meta_dropout", seed=3, dtype="float64")
    randomize(net, np.random.default_rng(10))
    return net


BLOCKS = [f"block{i}" for i in range(1, 5)]


def test_maml_groups_and_noise_free_forward(maml_net):
    """noise='none': no phi at all; theta = 4 conv kernels/biases + dense,
    beta = 4 offsets; the sampled forward equals the deterministic one."""
    assert maml_net.group("phi") == {}
    assert set(maml_net.group("theta")) == (
        {f"{b}/{k}" for b in BLOCKS for k in ("kernel", "bias")}
        | {"head/kernel", "head/bias"})
    assert set(maml_net.group("beta")) == {f"{b}/offset" for b in BLOCKS}
    x = tf.constant(images(6, np.random.default_rng(0)))
    det = maml_net.forward(x).numpy()
    smp = maml_net.forward(x, sample=True, seed=seed(1, 2)).numpy()
    assert det.shape == (6, 5)
    np.testing.assert_array_equal(det, smp)


def test_meta_dropout_parameter_shapes_and_init():
    """noise='meta_dropout': phi holds one conv per block with theta's
    shapes, a dense column [64, 1] and a scalar bias; every weight has its own
    draw (no two kernels equal); conv kernels are truncated normal
    (stddev 0.02 before truncation: |w| <= 0.04, std ~ 0.0176), dense kernels
    normal std 0.02, biases and offsets 0."""
    net = ConvNet("omniglot", 5, noise="meta_dropout", seed=0)
    theta, phi = net.group("theta"), net.group("phi")
    assert set(phi) == ({f"{b}/noise_{k}" for b in BLOCKS for k in ("kernel", "bias")}
                        | {"head/noise_kernel", "head/noise_bias"})
    for b, cin in zip(BLOCKS, (1, 64, 64, 64)):
        assert theta[f"{b}/kernel"].shape == (3, 3, cin, 64)
        assert phi[f"{b}/noise_kernel"].shape == (3, 3, cin, 64)
        assert phi[f"{b}/noise_bias"].shape == (64,)
    assert theta["head/kernel"].shape == (64, 5)
    assert phi["head/noise_kernel"].shape == (64, 1)
    assert phi["head/noise_bias"].shape == (1,)
    kernels = {k: v.numpy().ravel() for k, v in net.params().items()
               if k.endswith("kernel")}
    firsts = [tuple(v[:8]) for v in kernels.values()]
    assert len(set(firsts)) == len(firsts)  # all distinct draws
    for name, v in kernels.items():
        if name.startswith("block") and v.size > 10000:
            assert np.abs(v).max() <= 0.04 + 1e-7, name
            assert abs(v.std() - 0.02 * 0.8796) < 0.001, (name, v.std())
    head = np.concatenate([kernels["head/kernel"], kernels["head/noise_kernel"]])
    assert 0.015 < head.std() < 0.025
    for name, v in net.params().items():
        if not name.endswith("kernel"):
            assert not np.any(v.numpy()), name


@pytest.mark.parametrize("init", ["glorot_uniform", "pytorch_default"])
def test_uniform_init_options(init):
    """init='glorot_uniform': every kernel (θ and φ) is uniform on
    ±sqrt(6 / (fan_in + fan_out)); init='pytorch_default' (PyTorch's
    kaiming_uniform_ with a = sqrt(5)): uniform on ±1/sqrt(fan_in).  Fans
    as Keras and PyTorch count them (receptive field x channels); the
    variance is limit² / 3; draws stay distinct and seeded, biases and
    offsets stay 0."""
    net = ConvNet("omniglot", 20, noise="meta_dropout", seed=0, init=init)
    again = ConvNet("omniglot", 20, noise="meta_dropout", seed=0, init=init)
    kernels = {k: v.numpy() for k, v in net.params().items() if k.endswith("kernel")}
    assert len({tuple(v.ravel()[:8]) for v in kernels.values()}) == len(kernels)
    for name, v in kernels.items():
        np.testing.assert_array_equal(v, again.params()[name].numpy())
        receptive = int(np.prod(v.shape[:-2])) if v.ndim == 4 else 1
        fan_in, fan_out = receptive * v.shape[-2], receptive * v.shape[-1]
        limit = (np.sqrt(6.0 / (fan_in + fan_out)) if init == "glorot_uniform"
                 else 1.0 / np.sqrt(fan_in))
        assert np.abs(v).max() <= limit * (1 + 1e-6), name  # float32 rounding
        assert np.abs(v).max() > 0.9 * limit, name  # not a narrower law
        if v.size > 10000:
            assert abs(v.var() / (limit ** 2 / 3) - 1) < 0.05, name
    for name, v in net.params().items():
        if not name.endswith("kernel"):
            assert not np.any(v.numpy()), name


def test_meta_dropout_forward_seeding(md_net):
    """noise='meta_dropout': the deterministic forward is repeatable; the
    sampled one is repeatable with the same seed, changes with the seed, and
    differs from the deterministic one."""
    x = tf.constant(images(6, np.random.default_rng(1)))
    det1 = md_net.forward(x).numpy()
    det2 = md_net.forward(x).numpy()
    np.testing.assert_array_equal(det1, det2)
    a = md_net.forward(x, sample=True, seed=seed(1, 2)).numpy()
    b = md_net.forward(x, sample=True, seed=seed(1, 2)).numpy()
    c = md_net.forward(x, sample=True, seed=seed(1, 3)).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2
    assert np.abs(a - det1).max() > 1e-2


def reference_forward(net, x):
    """Deterministic forward of a meta-dropout ConvNet written out in numpy
    (tf.nn.conv2d for the convolutions only), from its variables.
    Returns (logits [N, way], [mask of each block])."""
    p = {k: v.numpy().astype(np.float64) for k, v in net.params().items()}
    conv = lambda h, k: tf.nn.conv2d(h, k, 1, "SAME").numpy()
    h, masks = np.asarray(x, np.float64), []
    for b in BLOCKS:
        mu = conv(h, p[f"{b}/kernel"]) + p[f"{b}/bias"]
        alpha = conv(h, p[f"{b}/noise_kernel"]) + p[f"{b}/noise_bias"]
        mask = softplus(alpha)
        masks.append(mask)
        a = mu * mask
        mean, var = a.mean((0, 1, 2)), a.var((0, 1, 2))
        a = (a - mean) / np.sqrt(var + 1e-3) + p[f"{b}/offset"]
        a = np.maximum(a, 0.0)
        n, hh, ww, c = a.shape
        a = a[:, :hh // 2 * 2, :ww // 2 * 2]
        h = a.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    h = h.reshape(h.shape[0], -1)
    assert h.shape[1] == 64
    return h @ p["head/kernel"] + p["head/bias"], masks


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_meta_dropout_taps_and_logits_match_numpy(md_net, md_net64, dtype):
    """Deterministic forward with taps: each block's "mask" equals
    softplus(conv(block input, noise_kernel) + noise_bias), and the logits
    equal a numpy re-implementation of the whole network (conv → ×mask →
    BN with batch statistics, eps 1e-3, offset → ReLU → 2x2 max-pool; dense).
    float32 uses the fused batch norm, float64 the explicit one."""
    net = md_net if dtype == "float32" else md_net64
    x = images(6, np.random.default_rng(2))
    taps = {}
    logits = net.forward(tf.constant(x, dtype), taps=taps).numpy()
    ref_logits, ref_masks = reference_forward(net, x)
    assert set(taps) >= set(BLOCKS)
    tol = 2e-4 if dtype == "float32" else 1e-9
    for b, ref in zip(BLOCKS, ref_masks):
        mask = taps[b]["mask"].numpy()
        assert mask.shape == ref.shape
        assert ref.std() > 0.1  # the masks really vary
        np.testing.assert_allclose(mask, ref, rtol=tol, atol=tol, err_msg=b)
    assert ref_logits.std() > 0.1
    np.testing.assert_allclose(logits, ref_logits, rtol=tol * 10, atol=tol * 10)


def test_block1_mask_recomputed_from_variables(md_net):
    """Block 1's tapped mask (deterministic) equals softplus of
    conv2d(x, block1/noise_kernel) + block1/noise_bias computed with tf ops
    from the variables directly."""
    x = tf.constant(images(4, np.random.default_rng(3)))
    taps = {}
    md_net.forward(x, taps=taps)
    p = md_net.params()
    alpha = tf.nn.conv2d(x, p["block1/noise_kernel"], 1, "SAME") + p["block1/noise_bias"]
    np.testing.assert_allclose(taps["block1"]["mask"].numpy(),
                               softplus(alpha.numpy().astype(np.float64)),
                               rtol=1e-5, atol=1e-6)


def test_sampled_block1_mask_has_unit_gaussian_noise(md_net64):
    """Sampled forward (float64): inverting block 1's mask,
    softplus^-1(mask) - alpha is the noise eps; over 6*28*28*64 elements its
    mean is 0 and its variance 1 (within 5 standard errors), so the noise is
    added to alpha with unit scale before the softplus."""
    x = tf.constant(images(6, np.random.default_rng(4), np.float64))
    det, smp = {}, {}
    md_net64.forward(x, taps=det)
    md_net64.forward(x, sample=True, seed=seed(5, 5), taps=smp)
    alpha = np.log(np.expm1(det["block1"]["mask"].numpy()))
    mask = smp["block1"]["mask"].numpy()
    ok = mask > 1e-12  # where the inversion is numerically meaningful
    assert ok.mean() > 0.999
    eps = np.log(np.expm1(mask[ok])) - alpha[ok]
    n = eps.size
    assert abs(eps.mean()) < Z / math.sqrt(n)
    assert abs(eps.var() - 1) < Z * math.sqrt(2 / n)
    # The head noise is tapped only when sampling.
    assert "sigma" in smp["head"] and "sigma" not in det.get("head", {})


def test_grouped_forward_equals_separate_forwards(md_net):
    """Deterministic forward of G=3 stacked copies of a batch with groups=3
    equals three separate forwards (each pass keeps its batch statistics),
    while stacking 3 *different* batches with groups=1 does not."""
    rng = np.random.default_rng(5)
    xs = [images(4, rng) for _ in range(3)]
    sep = np.concatenate([md_net.forward(tf.constant(x)).numpy() for x in xs])
    grp = md_net.forward(tf.constant(np.concatenate(xs)), groups=3).numpy()
    np.testing.assert_allclose(grp, sep, rtol=1e-4, atol=1e-4)
    one = md_net.forward(tf.constant(np.concatenate(xs)), groups=1).numpy()
    assert np.abs(one - sep).max() > 1e-3


# --------------------------------------------------------------- batch norm


def bn_reference(x, offset):
    """Batch norm in float64 numpy: per channel over N, H, W, biased var."""
    x = np.asarray(x, np.float64)
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    return (x - mean) / np.sqrt(var + BN_EPSILON) + offset


def bn_input(rng, n=8, c=16):
    """[n, 6, 6, c] float32 with per-channel means and scales (some channels
    with a variance close to eps; means up to ~10 stds, see the last test)."""
    scales = np.exp(rng.uniform(np.log(0.02), np.log(5.0), size=c))
    locs = scales * rng.uniform(-10.0, 10.0, size=c)
    return (rng.normal(size=(n, 6, 6, c)) * scales + locs).astype(np.float32)


def test_batch_norm_eps_constant():
    """The batch-norm epsilon is the original code's 1e-3."""
    assert BN_EPSILON == 1e-3


def test_batch_norm_fused_and_explicit_agree_with_numpy():
    """float32: the fused kernel and the explicit ops both equal the float64
    numpy batch norm (and hence each other) to 1e-4."""
    rng = np.random.default_rng(6)
    x = bn_input(rng)
    offset = rng.normal(size=16).astype(np.float32)
    ref = bn_reference(x, offset)
    fused = batch_norm(tf.constant(x), tf.constant(offset), fused=True).numpy()
    expl = batch_norm(tf.constant(x), tf.constant(offset), fused=False).numpy()
    np.testing.assert_allclose(fused, ref, atol=1e-4)
    np.testing.assert_allclose(expl, ref, atol=1e-4)
    np.testing.assert_allclose(fused, expl, atol=1e-4)


def test_batch_norm_float64_explicit_exact():
    """float64 (explicit path even with fused=True) matches numpy to 1e-10."""
    rng = np.random.default_rng(7)
    x = bn_input(rng).astype(np.float64)
    offset = rng.normal(size=16)
    out = batch_norm(tf.constant(x), tf.constant(offset), fused=True)
    assert out.dtype == tf.float64
    np.testing.assert_allclose(out.numpy(), bn_reference(x, offset), atol=1e-10)


def _bn_double_backward(x, dy, g, g_offset, offset, fused, groups=1,
                        epsilon=BN_EPSILON):
    """Gradients (w.r.t. x, dy) of <g, dx> + <g_offset, d offset>, where dx,
    d offset is the batch norm's backward pass for the output gradient dy."""
    with tf.GradientTape() as outer:
        outer.watch([x, dy])
        with tf.GradientTape() as inner:
            inner.watch([x, offset])
            y = batch_norm(x, offset, groups=groups, fused=fused, epsilon=epsilon)
        dx, doffset = inner.gradient(y, [x, offset], output_gradients=dy)
    return [dx, doffset] + outer.gradient([dx, doffset], [x, dy],
                                          output_gradients=[g, g_offset])


@pytest.mark.parametrize("shape,groups,spread,epsilon", [
    ((20, 14, 14, 16), 1, 1.0, BN_EPSILON), ((300, 3, 3, 16), 1, 1.0, BN_EPSILON),
    ((20, 1, 1, 16), 1, 1.0, BN_EPSILON), ((3 * 10, 7, 7, 16), 3, 1.0, BN_EPSILON),
    ((20, 14, 14, 16), 1, 0.02, BN_EPSILON), ((20, 14, 14, 16), 1, 0.02, 1e-5)])
def test_fused_batch_norm_second_derivative_matches_explicit_float64(
        shape, groups, spread, epsilon):
    """The fused path's closed-form gradient of the backward pass (float32)
    equals autodiff through the explicit ops in float64, to float32
    rounding: this is the term second-order MAML needs from batch norm.
    With groups > 1 (stacked Monte-Carlo passes) the fused path moves the
    passes into the channel axis; the reference normalises each pass alone.
    ``spread`` 0.02 puts the channel variances near epsilon (as in block 1
    at initialisation), where epsilon's value changes the result."""
    rng = np.random.default_rng(8)
    x = (rng.normal(size=shape) * rng.uniform(0.1, 3.0, size=shape[-1])
         + rng.uniform(-2, 2, size=shape[-1])) * spread
    dy, g = rng.normal(size=shape), rng.normal(size=shape)
    g_offset, offset = rng.normal(size=shape[-1]), rng.normal(size=shape[-1])
    args = lambda dtype: [tf.constant(a, dtype) for a in (x, dy, g, g_offset, offset)]
    ref = _bn_double_backward(*args(tf.float64), fused=False, groups=groups,
                              epsilon=epsilon)
    out = _bn_double_backward(*args(tf.float32), fused=True, groups=groups,
                              epsilon=epsilon)
    if spread < 1.0:  # the other epsilon gives a visibly different answer
        other = _bn_double_backward(*args(tf.float64), fused=False, groups=groups,
                                    epsilon=1e-5 if epsilon == BN_EPSILON else BN_EPSILON)
        assert np.linalg.norm(other[2].numpy() - ref[2].numpy()) > 0.1 * np.linalg.norm(ref[2].numpy())
    for name, o, r in zip(["dx", "d offset", "d x", "d dy"], out, ref):
        r = r.numpy()
        err = np.linalg.norm(o.numpy().astype(np.float64) - r)
        assert err < 1e-5 * np.linalg.norm(r), name


@pytest.mark.parametrize("fused", [True, False])
def test_batch_norm_groups_equal_separate_calls(fused):
    """groups=G on G stacked batches equals G separate batch-norm calls (on
    both paths), and differs from normalising the whole stack at once."""
    rng = np.random.default_rng(8)
    g = 4
    parts = [bn_input(rng, n=3) for _ in range(g)]
    offset = rng.normal(size=16).astype(np.float32)
    stacked = tf.constant(np.concatenate(parts))
    out = batch_norm(stacked, tf.constant(offset), groups=g, fused=fused).numpy()
    sep = np.concatenate([batch_norm(tf.constant(p), tf.constant(offset),
                                     fused=fused).numpy() for p in parts])
    np.testing.assert_allclose(out, sep, atol=1e-4)
    np.testing.assert_allclose(
        out, np.concatenate([bn_reference(p, offset) for p in parts]), atol=1e-4)
    whole = batch_norm(stacked, tf.constant(offset), groups=1, fused=fused).numpy()
    assert np.abs(whole - sep).max() > 0.1


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("epsilon", [1e-3, 1e-5])
def test_batch_norm_output_moments(fused, epsilon):
    """After normalisation each channel has mean = offset and variance
    var / (var + eps) (so < 1 for channels whose variance is near eps)."""
    rng = np.random.default_rng(9)
    x = bn_input(rng, n=20)
    if epsilon < 1e-3:
        x = x / 10.0  # bring the smallest variances near this epsilon
    offset = rng.normal(size=16).astype(np.float32)
    y = batch_norm(tf.constant(x), tf.constant(offset), fused=fused,
                   epsilon=epsilon).numpy()
    y = y.astype(np.float64)
    var_in = x.astype(np.float64).var((0, 1, 2))
    np.testing.assert_allclose(y.mean((0, 1, 2)), offset, atol=1e-5)
    np.testing.assert_allclose(y.var((0, 1, 2)), var_in / (var_in + epsilon), atol=1e-5)
    assert (var_in / (var_in + epsilon)).min() < 0.5  # eps visibly matters


def test_bn_epsilon_key_reaches_every_block():
    """The config key ``bn_epsilon`` is the epsilon of all four blocks, and
    it changes the logits of Omniglot-like inputs at initialisation (block
    1's pre-activation variance is near 1e-3 there)."""
    from src.config import load_config
    from src.train import build
    rng = np.random.default_rng(12)
    x = tf.constant((rng.uniform(size=(10, 28, 28, 1)) < 0.1).astype(np.float32))
    logits = {}
    for eps in (1e-3, 1e-5):
        model, _ = build(load_config(None, ["noise=none", "way=5", f"bn_epsilon={eps}"]))
        assert [b.bn_epsilon for b in model.blocks] == [eps] * 4
        logits[eps] = model.forward(x).numpy()
    assert np.abs(logits[1e-3] - logits[1e-5]).max() > 0.1 * np.abs(logits[1e-3]).max()


def test_bn_scale_key_multiplies_the_normalised_output():
    """``bn_scale=true`` gives every block a scale γ [C] in the β group,
    initialised to 1, that leaves every other weight's draw unchanged (the
    same logits as without it); block 1's output with γ set is
    relu(γ·(x − m)/sqrt(v + ε) + β) max-pooled, computed in numpy."""
    from src.config import load_config
    from src.train import build
    rng = np.random.default_rng(13)
    x = (rng.uniform(size=(10, 28, 28, 1)) < 0.1).astype(np.float32)
    plain, _ = build(load_config(None, ["noise=meta_dropout", "way=5"]))
    scaled, _ = build(load_config(None, ["noise=meta_dropout", "way=5", "bn_scale=true"]))
    assert set(scaled.group("beta")) - set(plain.group("beta")) == {
        f"block{i}/scale" for i in range(1, 5)}
    np.testing.assert_array_equal(scaled.forward(tf.constant(x)).numpy(),
                                  plain.forward(tf.constant(x)).numpy())
    block = scaled.blocks[0]
    gamma = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    beta = rng.normal(size=64).astype(np.float32)
    block.groups["beta"]["scale"].assign(gamma)
    block.groups["beta"]["offset"].assign(beta)
    out = block(tf.constant(x)).numpy()
    kernel = block.groups["theta"]["kernel"].numpy().astype(np.float64)
    alpha = block.groups["phi"]["noise_kernel"].numpy().astype(np.float64)
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([padded[:, i:i + 28, j:j + 28, 0]
                        for i in range(3) for j in range(3)], -1)
    mu = patches @ kernel.reshape(9, 64)
    pre = mu * np.log1p(np.exp(patches @ alpha.reshape(9, 64)))
    m, v = pre.mean((0, 1, 2)), pre.var((0, 1, 2))
    y = np.maximum(gamma * (pre - m) / np.sqrt(v + 1e-3) + beta, 0.0)
    pooled = y.reshape(10, 14, 2, 14, 2, 64).max((2, 4))
    np.testing.assert_allclose(out, pooled, atol=2e-4)


def test_batch_norm_explicit_large_mean_relative_to_std():
    """The explicit float32 batch norm (the mean first, then the variance of
    the centred values) stays as close to numpy as the fused kernel when
    the channel means are 30x the stds (both about 1e-5 off, measured),
    where the one-sweep E[x^2] - E[x]^2 is about 3e-3 off (numpy, float32)."""
    rng = np.random.default_rng(11)
    x = (rng.normal(size=(20, 7, 7, 8)) + 30.0).astype(np.float32)
    offset = np.zeros(8, np.float32)
    ref = bn_reference(x, offset)
    expl = batch_norm(tf.constant(x), tf.constant(offset), fused=False).numpy()
    fused = batch_norm(tf.constant(x), tf.constant(offset), fused=True).numpy()
    np.testing.assert_allclose(fused, ref, atol=1e-4)
    np.testing.assert_allclose(expl, ref, atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 5, 5, 3), (7, 4)])
def test_add_bias_value_and_two_derivatives(shape):
    """``add_bias`` (its bias gradient a matrix product with ones) equals a
    plain broadcast ``+`` in value, in its gradient w.r.t. x and the bias,
    and in the second derivative that second-order MAML takes of that
    gradient (here of a gradient through a nonlinearity, so that dy depends
    on x); float64, against numpy and against autodiff of ``+``."""
    rng = np.random.default_rng(12)
    x = tf.constant(rng.normal(size=shape))
    bias = tf.constant(rng.normal(size=shape[-1]))
    w = tf.constant(rng.normal(size=shape))
    np.testing.assert_allclose(channel_sum(x).numpy(),
                               x.numpy().reshape(-1, shape[-1]).sum(0), rtol=1e-12)

    def grads(add):
        with tf.GradientTape() as outer:
            outer.watch([x, bias])
            with tf.GradientTape() as inner:
                inner.watch([x, bias])
                y = add(x, bias)
                loss = tf.reduce_sum(w * tf.tanh(y))
            gx, gb = inner.gradient(loss, [x, bias])
            second = tf.reduce_sum(gb ** 2) + tf.reduce_sum(gx * w)
        return [y, gx, gb] + outer.gradient(second, [x, bias])

    ours, ref = grads(add_bias), grads(lambda a, b: a + b)
    y_np = x.numpy() + bias.numpy()
    np.testing.assert_allclose(ours[0].numpy(), y_np, rtol=1e-12)
    np.testing.assert_allclose(
        ours[2].numpy(),
        (w.numpy() / np.cosh(y_np) ** 2).reshape(-1, shape[-1]).sum(0), rtol=1e-10)
    for name, o, r in zip(["y", "dx", "dbias", "d2 x", "d2 bias"], ours, ref):
        np.testing.assert_allclose(o.numpy(), r.numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=name)
        assert np.abs(r.numpy()).max() > 1e-3, name
