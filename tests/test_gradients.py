"""Second-order meta-gradients against independent computations.

* On the smooth variant of the network (softplus for ReLU, average for max
  pooling) in float64, the reverse-mode meta-gradient along random directions
  in θ, φ and β matches central finite differences of the meta-loss.  The
  same check fails for a first-order inner loop and for a batch norm whose
  variance stops the gradient of its mean (``tf.nn.moments``), so it does see
  second-order terms.
* On the real network (ReLU, max-pool), where finite differences do not
  converge, a forward-mode directional derivative (ForwardAccumulator)
  matches the reverse-mode gradient; and the fused float32 batch norm gives
  the same meta-gradient as the explicit float64 one (on a tiny network,
  and on the smooth network at Omniglot 20-way 1-shot's real shapes).
* On the real network, batch norm's scale invariance gives an exact
  identity between two meta-gradients, θ_b · ∂L/∂θ_b = −2 Σ α_b ∂L/∂α_b
  per block; with one inner step its right side is first-order only.  It
  holds, and fails for a first-order inner loop, the authors' TF1
  batch-norm gradient and a stopped-mean variance.
"""

import numpy as np
import pytest
import tensorflow as tf

from src import layers
from src.meta_learner import MetaLearner, adapt, support_loss
from src.model import ConvNet

WAY, QUERY = 2, 2
SEED = tf.constant([7, 11], tf.int64)


def episode(dtype, tasks=1, seed=0, way=WAY, query=QUERY):
    """A meta-batch of random 28x28 'images' (1-shot, tiny by default) with
    class-ordered labels."""
    rng = np.random.default_rng(seed)
    def images(n):
        return tf.constant(rng.random((tasks, n, 28, 28, 1)), dtype)
    labels = lambda k: tf.constant(np.tile(np.repeat(np.arange(way), k), (tasks, 1)), tf.int32)
    return {"support_x": images(way), "support_y": labels(1),
            "query_x": images(way * query), "query_y": labels(query)}


def make(dtype="float64", smooth=True, noise="meta_dropout", first_order=False,
         fused_bn=False, meta_sgd=False, inner_lr=0.4, seed=3, way=WAY,
         inner_steps=2, bn_second_order=True, adapt_offsets=False,
         bn_scale=False, bn_epsilon=layers.BN_EPSILON):
    model = ConvNet("omniglot", way, noise=noise, smooth=smooth,
                    fused_bn=fused_bn, bn_second_order=bn_second_order,
                    bn_epsilon=bn_epsilon, bn_scale=bn_scale, seed=seed, dtype=dtype)
    learner = MetaLearner(model, inner_lr=inner_lr, inner_steps=inner_steps, meta_lr=1e-3,
                          first_order=first_order, meta_sgd=meta_sgd,
                          adapt_offsets=adapt_offsets)
    return model, learner


def gradient(learner, batch):
    """{variable name: meta-gradient} (zeros where there is no path)."""
    _, _, grads = learner.meta_gradients(batch, SEED)
    return {v.name: g for v, g in zip(learner.variables_list, grads)}


def directional_fd(learner, batch, direction, h=1e-6):
    """Central difference of the meta-loss along ``direction`` [(var, array)].

    Its truncation error falls as h² (measured: 7e-7 relative at h=1e-5,
    6e-9 at h=1e-6), so h=1e-6 resolves the 1e-6 tolerance below."""
    def loss_at(t):
        for v, d in direction:
            v.assign_add(t * d)
        loss, _ = learner.meta_loss(batch, SEED)
        for v, d in direction:
            v.assign_add(-t * d)
        return float(loss)
    return (loss_at(h) - loss_at(-h)) / (2 * h)


def random_direction(variables, seed):
    rng = np.random.default_rng(seed)
    return [(v, rng.standard_normal(v.shape)) for v in variables]


def along(grads, direction):
    return sum(float(np.sum(grads[v.name].numpy() * d)) for v, d in direction)


def set_scales(model, seed):
    """Sets every block's batch-norm scale γ away from 1 (uniform 0.5-2)."""
    rng = np.random.default_rng(seed)
    for block in model.blocks:
        block.groups["beta"]["scale"].assign(rng.uniform(0.5, 2.0, block.channels))


GROUPS = {
    "theta": lambda m: list(m.group("theta").values()),
    "phi_blocks": lambda m: [v for k, v in m.group("phi").items() if k.startswith("block")],
    "phi_head": lambda m: [v for k, v in m.group("phi").items() if k.startswith("head")],
    "beta": lambda m: list(m.group("beta").values()),
}


@pytest.fixture(scope="module")
def smooth_setup():
    model, learner = make()
    batch = episode(tf.float64)
    return model, learner, batch, gradient(learner, batch)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_second_order_matches_finite_differences(smooth_setup, group):
    """Reverse-mode meta-gradient · v == central finite difference (float64)."""
    model, learner, batch, grads = smooth_setup
    for k in range(2):
        direction = random_direction(GROUPS[group](model), seed=k)
        analytic = along(grads, direction)
        numeric = directional_fd(learner, batch, direction)
        assert abs(analytic) > 1e-6, "direction with no effect tests nothing"
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-10)


def test_first_order_fails_the_finite_difference_check(smooth_setup):
    """A first-order inner loop gives a measurably different θ gradient, and
    exactly zero for the head's φ, which acts only through the inner loop."""
    model, _, batch, _ = smooth_setup
    fo_model, fo_learner = make(first_order=True)
    fo_grads = gradient(fo_learner, batch)
    direction = random_direction(GROUPS["theta"](fo_model), seed=0)
    numeric = directional_fd(fo_learner, batch, direction)
    assert abs(along(fo_grads, direction) - numeric) > 1e-3 * abs(numeric)
    for v in GROUPS["phi_head"](fo_model):
        assert np.all(fo_grads[v.name].numpy() == 0.0)


def moments_batch_norm(x, offset, groups=1, fused=True, second_order=True,
                       epsilon=layers.BN_EPSILON):
    """Batch norm through tf.nn.moments: its variance uses stop_gradient(mean),
    right in value and first derivative, wrong in the second."""
    mean, var = tf.nn.moments(x, axes=[0, 1, 2], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + epsilon) + offset


def test_stopped_mean_batch_norm_fails_the_finite_difference_check(monkeypatch):
    """The check notices the tf.nn.moments trap of DESIGN.md."""
    monkeypatch.setattr(layers, "batch_norm", moments_batch_norm)
    model, learner = make()
    batch = episode(tf.float64)
    grads = gradient(learner, batch)
    worst = 0.0
    for group in ("theta", "phi_blocks", "beta"):
        direction = random_direction(GROUPS[group](model), seed=1)
        numeric = directional_fd(learner, batch, direction)
        worst = max(worst, abs(along(grads, direction) - numeric) / abs(numeric))
    assert worst > 1e-3


def test_head_phi_acts_only_through_the_inner_loop(smooth_setup):
    """Second order: the additive head noise's φ gets a non-zero gradient."""
    model, _, _, grads = smooth_setup
    for v in GROUPS["phi_head"](model):
        assert np.max(np.abs(grads[v.name].numpy())) > 1e-8


def test_maml_has_no_phi():
    model, _ = make(noise="none")
    assert model.group("phi") == {}
    assert set(model.group("theta")) == {f"block{i}/{w}" for i in range(1, 5)
                                          for w in ("kernel", "bias")} | {"head/kernel", "head/bias"}


def test_forward_mode_matches_reverse_mode_on_the_real_network():
    """ReLU and max-pool network (float64): jvp of the meta-loss along a random
    direction in all meta-parameters equals the reverse-mode gradient · v."""
    model, learner = make(smooth=False)
    batch = episode(tf.float64, tasks=2, seed=1)
    grads = gradient(learner, batch)
    variables = learner.variables_list
    direction = random_direction(variables, seed=5)
    tangents = [tf.constant(d) for _, d in direction]
    with tf.autodiff.ForwardAccumulator(variables, tangents) as acc:
        loss, _ = learner.meta_loss(batch, SEED)
    jvp = float(acc.jvp(loss))
    assert abs(jvp) > 1e-6
    assert along(grads, direction) == pytest.approx(jvp, rel=1e-8)


def scale_identity_sides(model, learner, batch):
    """Per conv block b of a Meta-SGD learner: (θ_b · ∂L/∂θ_b,
    −2 Σ α_b ∂L/∂α_b), θ_b its kernel and bias, α_b their step sizes."""
    grads = gradient(learner, batch)
    theta = model.group("theta")
    dot = lambda vs: sum(float(np.sum(v.numpy() * grads[v.name].numpy())) for v in vs)
    sides = []
    for i in range(1, 5):
        keys = [f"block{i}/kernel", f"block{i}/bias"]
        sides.append((dot([theta[k] for k in keys]),
                      -2 * dot([learner.inner_lr[k] for k in keys])))
    return sides


@pytest.mark.parametrize("noise", ["none", "meta_dropout"])
def test_kernel_scale_identity_on_the_real_network(noise):
    """Batch norm makes a block's output ignore the scale of its conv
    weights, and the gradient of a loss then scales as 1/c when they do, so
    L(c·θ_b; α_b) = L(θ_b; α_b / c²): scaling a block's kernel and bias is
    the same as dividing its inner step sizes by c².  At c = 1:
    θ_b · ∂L/∂θ_b = −2 Σ α_b ∂L/∂α_b, for each block, exactly (with a
    negligible batch-norm epsilon).  Checked on the real network (ReLU,
    max-pool; float64, Meta-SGD for the per-block α), with 1 and 2 inner
    steps.  With one inner step the right side needs no second derivative
    (∂L/∂α = −∇L_q(θ')·∇L_s(θ)), so it checks the left side's second-order
    terms independently.  This radial part of the meta-gradient is what
    grows MAML's kernels (docs/experiments.md)."""
    batch = episode(tf.float64, tasks=2, seed=4)
    for steps in (1, 2):
        model, learner = make(smooth=False, noise=noise, meta_sgd=True, inner_steps=steps,
                              bn_epsilon=1e-20)
        for lhs, rhs in scale_identity_sides(model, learner, batch):
            assert abs(rhs) > 1e-8
            assert lhs == pytest.approx(rhs, rel=1e-8)


def test_kernel_scale_identity_fails_without_second_order_terms(monkeypatch):
    """The identity sees the second-order terms: the radial part of the
    second-order term is θ_b·H·∇L_q = −∇L_s·∇L_q, all of it carried by
    batch norm's second derivative, so a first-order inner loop and the
    authors' TF1 batch-norm gradient (``bn_second_order=False``) both give
    exactly half the left side, and a variance with a stopped mean
    (``tf.nn.moments``) gives another value altogether.  One inner step."""
    batch = episode(tf.float64, tasks=2, seed=4)
    for option in ({"first_order": True}, {"bn_second_order": False}):
        model, learner = make(smooth=False, noise="none", meta_sgd=True, inner_steps=1,
                              bn_epsilon=1e-20, **option)
        for lhs, rhs in scale_identity_sides(model, learner, batch):
            assert lhs == pytest.approx(rhs / 2, rel=1e-6), option
    monkeypatch.setattr(layers, "batch_norm", moments_batch_norm)
    model, learner = make(smooth=False, noise="none", meta_sgd=True, inner_steps=1,
                          bn_epsilon=1e-20)
    worst = max(abs(lhs - rhs) / abs(rhs)
                for lhs, rhs in scale_identity_sides(model, learner, batch))
    assert worst > 0.1


@pytest.mark.parametrize("adapt_offsets,bn_scale", [(False, False), (True, False),
                                                    (False, True)])
def test_fused_float32_batch_norm_gives_the_same_meta_gradient(adapt_offsets, bn_scale):
    """The fused kernel's second derivative agrees with explicit float64 ops
    (MAML, since the noise draws differ between float32 and float64); with
    the offsets adapted, this covers its gradient w.r.t. the offset's own
    backward pass too; with ``bn_scale`` (γ away from 1), the scale applied
    around the fused kernel."""
    ref_model, ref = make(smooth=False, dtype="float64", noise="none",
                          adapt_offsets=adapt_offsets, bn_scale=bn_scale)
    if bn_scale:
        set_scales(ref_model, seed=10)
    _, fused = make(smooth=False, dtype="float32", fused_bn=True, noise="none",
                    adapt_offsets=adapt_offsets, bn_scale=bn_scale)
    for v64, v32 in zip(ref.variables_list, fused.variables_list):
        v32.assign(tf.cast(v64, tf.float32))
    g64 = gradient(ref, episode(tf.float64))
    g32 = gradient(fused, episode(tf.float32))
    a = np.concatenate([g.numpy().ravel() for g in g64.values()])
    b = np.concatenate([g.numpy().ravel() for g in g32.values()])
    assert np.linalg.norm(a - b) < 1e-3 * np.linalg.norm(a)


def test_fused_batch_norm_meta_gradient_at_real_shapes():
    """Omniglot 20-way 1-shot, 15 queries, 5 inner steps (one task of random
    images, the same weights in every precision): the fused float32 batch
    norm's meta-gradient is within float32 rounding of explicit float64 ops,
    and its error is tiny against the second-order part (second- minus
    first-order meta-gradient) that it must get right.

    On the smooth network: with ReLU and max-pool, random images at
    initialisation make the 5-step inner loop so sensitive to rounding (the
    pooling choices flip) that float32 and float64 meta-gradients differ by
    their own size whatever the batch norm (measured: explicit float32 ops
    as far off as the fused kernel)."""
    def grads(dtype, fused, first_order=False):
        _, learner = make(dtype, noise="none", fused_bn=fused, first_order=first_order,
                          inner_lr=0.1, seed=5, way=20, inner_steps=5)
        for v, ref_v in zip(learner.variables_list, ref_learner.variables_list):
            v.assign(tf.cast(ref_v, v.dtype))
        g = gradient(learner, episode(dtype, seed=3, way=20, query=15))
        return {name: x.numpy().astype(np.float64) for name, x in g.items()}

    _, ref_learner = make(noise="none", seed=5, way=20, inner_steps=5)
    ref, first = grads("float64", False), grads("float64", False, first_order=True)
    fused = grads("float32", True)
    for name in ref:
        if name.startswith("block") and name.endswith("bias:0"):
            continue  # batch norm cancels conv biases: their gradient is rounding noise
        err = np.linalg.norm(fused[name] - ref[name])
        # measured: at most 2.4e-4 of the gradient and 4e-4 of its second-order part
        assert err < 2e-3 * np.linalg.norm(ref[name]), name
        assert err < 1e-2 * np.linalg.norm(ref[name] - first[name]), name


def test_adapted_offsets_meta_gradient_matches_finite_differences():
    """``adapt_offsets``: β is adapted in the inner loop too, and the
    second-order meta-gradient along θ and β still matches central finite
    differences (float64, smooth network)."""
    model, learner = make(adapt_offsets=True)
    batch = episode(tf.float64)
    grads = gradient(learner, batch)
    for group in ("theta", "beta"):
        direction = random_direction(GROUPS[group](model), seed=2)
        analytic = along(grads, direction)
        assert abs(analytic) > 1e-6
        assert analytic == pytest.approx(directional_fd(learner, batch, direction),
                                         rel=1e-6, abs=1e-10)
    # The option changes the meta-gradient (β's most: it now also acts
    # through the inner steps).
    _, plain = make()
    plain_grads = gradient(plain, batch)
    for v in GROUPS["beta"](model):
        diff = np.linalg.norm(grads[v.name].numpy() - plain_grads[v.name].numpy())
        assert diff > 1e-3 * np.linalg.norm(plain_grads[v.name].numpy()), v.name


def test_bn_scale_meta_gradient_matches_finite_differences():
    """``bn_scale``: the meta-learned γ, set away from 1 so that its own
    value matters, gets a second-order meta-gradient that matches central
    finite differences, and so does θ (float64, smooth network; the fused
    float32 path is checked in
    ``test_fused_float32_batch_norm_gives_the_same_meta_gradient``)."""
    model, learner = make(bn_scale=True)
    set_scales(model, seed=9)
    batch = episode(tf.float64)
    grads = gradient(learner, batch)
    scales = [b.groups["beta"]["scale"] for b in model.blocks]
    for direction in (random_direction(scales, seed=5),
                      random_direction(GROUPS["theta"](model), seed=6)):
        analytic = along(grads, direction)
        assert abs(analytic) > 1e-6
        assert analytic == pytest.approx(directional_fd(learner, batch, direction),
                                         rel=1e-6, abs=1e-10)


def test_adapted_offsets_take_a_gradient_step():
    """One inner step moves β by -α times the support loss's gradient w.r.t.
    β, checked along a random direction against a central finite difference
    of the support loss (MAML, float64); the inner loop returns θ and β
    with the option, θ alone without it."""
    lr = 0.4
    model, learner = make(noise="none", adapt_offsets=True, inner_lr=lr)
    batch = episode(tf.float64)
    x, y = batch["support_x"][0], batch["support_y"][0]
    fast = adapt(model, model.params(), learner.inner_lr, x, y, steps=1,
                 mc_samples=1, seed=SEED)
    beta = model.group("beta")
    assert set(fast) == set(model.group("theta")) | set(beta)
    rng = np.random.default_rng(4)
    direction = {k: rng.standard_normal(v.shape) for k, v in beta.items()}
    step = sum(float(np.sum((fast[k].numpy() - beta[k].numpy()) * d))
               for k, d in direction.items())

    def loss_at(t):
        moved = {k: beta[k] + t * d for k, d in direction.items()}
        return float(support_loss(model, {**model.params(), **moved}, x, y, 1, SEED))
    h = 1e-6
    numeric = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert abs(numeric) > 1e-6
    assert step == pytest.approx(-lr * numeric, rel=1e-6)
    _, plain = make(noise="none")
    assert set(plain.inner_lr) == set(model.group("theta"))
