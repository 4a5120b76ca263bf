"""Latent noise kinds, one small class each.

A noise kind sits between a layer's linear map μ (computed with θ) and what
follows it.  If it needs linear maps of the layer's input h of its own (α =
conv_φ(h)), it lists their (kernel, bias) in ``input_maps``; the host layer
computes them with its own conv / matmul and hands the results over.  It may
own variables, which it registers on its host layer in ``build``: in group
``phi`` if they are meta-learned only (meta-dropout's noise generator), or in
group ``theta`` if the inner loop adapts them.  The meta-learner never needs
to know which kind is in use.

Adding a Table 2 / Table 3 variant means adding one class here and one entry
in ``BLOCK_NOISES`` or ``HEAD_NOISES``.
"""

import numpy as np
import tensorflow as tf


def normal(shape, seed, dtype):
    """ε ~ N(0, I) of ``shape`` from an int [2] stateless seed.

    Box-Muller on stateless uniforms: repeatable inside tf.function, and
    measured 1.9x faster on a CPU than ``tf.random.stateless_normal`` (whose
    kernel transforms one pair at a time, while these element-wise ops are
    vectorised); at meta-test, drawing the noise is a quarter of the time.
    """
    n = tf.reduce_prod(shape)
    half = (n + 1) // 2
    tiny = np.finfo(dtype.as_numpy_dtype).tiny
    u = tf.random.stateless_uniform(tf.stack([2, half]), seed=seed,
                                    minval=tiny, maxval=1.0, dtype=dtype)
    radius = tf.sqrt(-2.0 * tf.math.log(u[0]))
    angle = (2.0 * np.pi) * u[1]
    z = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)
    return tf.reshape(z[:n], shape)


class NoNoise:
    """Plain MAML: the block / head output is μ."""

    def build(self, layer, fan_in, units):
        pass

    def input_maps(self, p):
        """[(kernel, bias)] of extra linear maps of the layer input."""
        return []

    def __call__(self, h, mu, maps, p, sample, seed, taps=None):
        """Args: h the layer input, mu its θ map, maps the results of
        ``input_maps`` on h, p the layer's parameters, sample / seed as in
        the layer.  Returns the layer's output before batch norm."""
        return mu


class MultiplicativeMetaDropout(NoNoise):
    """Meta-dropout in a conv block (paper Eq. 5; original code).

    α = conv_φ(h);  a = α + ε (sample) or a = α (deterministic);
    output = μ ⊙ softplus(a).
    """

    def build(self, layer, fan_in, units):
        layer.new_weight("phi", "noise_kernel", [3, 3, fan_in, units], "conv")
        layer.new_weight("phi", "noise_bias", [units], "zeros")

    def input_maps(self, p):
        return [(p["noise_kernel"], p["noise_bias"])]

    def __call__(self, h, mu, maps, p, sample, seed, taps=None):
        alpha, = maps
        a = alpha + normal(tf.shape(alpha), seed, alpha.dtype) if sample else alpha
        z = tf.nn.softplus(a)
        if taps is not None:
            taps["mask"] = z
        return mu * z


class AdditiveHeadNoise(NoNoise):
    """Meta-dropout's dense head (original code).

    σ = softplus(h · w_φ + b_φ), with one column w_φ [F, 1] and a scalar b_φ
    shared by (tiled across) the ``way`` logits;
    logits = μ + σ ⊙ ε (sample) or μ (deterministic).

    σ never reaches the deterministic query pass, so its φ gets a
    meta-gradient only through the inner loop: zero under first order.
    """

    def build(self, layer, fan_in, units):
        layer.new_weight("phi", "noise_kernel", [fan_in, 1], "dense")
        layer.new_weight("phi", "noise_bias", [1], "zeros")

    def input_maps(self, p):
        return [(p["noise_kernel"], p["noise_bias"])]

    def __call__(self, h, mu, maps, p, sample, seed, taps=None):
        if not sample:
            return mu
        pre_sigma, = maps
        sigma = tf.nn.softplus(pre_sigma)
        if taps is not None:
            taps["sigma"] = sigma
        return mu + sigma * normal(tf.shape(mu), seed, mu.dtype)


BLOCK_NOISES = {"none": NoNoise, "meta_dropout": MultiplicativeMetaDropout}
HEAD_NOISES = {"none": NoNoise, "meta_dropout": AdditiveHeadNoise}


def make_block_noise(name):
    """Returns a new conv-block noise of kind ``name`` (see BLOCK_NOISES)."""
    return BLOCK_NOISES[name]()


def make_head_noise(name):
    """Returns a new dense-head noise of kind ``name`` (see HEAD_NOISES)."""
    return HEAD_NOISES[name]()
