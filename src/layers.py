"""Keras layers of the 4-block ConvNet with pluggable latent noise.

Every layer owns its variables (built the Keras way) but its ``call`` also
takes an explicit ``params`` dict that overrides them.  The meta-learner
therefore runs the inner loop as a pure function of tensors (θ after k inner
steps, φ, β) without assigning to any variable inside a tape.

Each layer sorts its variables into three groups, by short name:

* ``theta``: adapted in the inner loop (conv / dense kernels and biases);
* ``phi``:   the noise generator, meta-learned only;
* ``beta``:  batch-norm offsets, meta-learned only.

A noise kind (``src.noise``) may add variables to either ``theta`` (if the
variant adapts them in the inner loop) or ``phi``.
"""

import tensorflow as tf

from src import noise as noise_lib

BN_EPSILON = 1e-3  # tf.contrib.layers.batch_norm's default, the original code's


def conv_init(seed):
    """Original initialiser of the conv kernels: truncated normal, std 0.02."""
    return tf.keras.initializers.TruncatedNormal(stddev=0.02, seed=seed)


def dense_init(seed):
    """Original initialiser of the dense kernels: normal, std 0.02."""
    return tf.keras.initializers.RandomNormal(stddev=0.02, seed=seed)


def kernel_initializer(kind, init, seed):
    """The seeded initializer of one kernel.

    Args:
      kind: 'conv' or 'dense' (which original initialiser applies).
      init: 'original' (the authors' std-0.02 initialisers above);
        'glorot_uniform' (Keras' default for Conv2D / Dense); or
        'pytorch_default' (PyTorch's for Conv2d / Linear, uniform on
        ±1/sqrt(fan_in)).  The last two are diagnostics: with batch norm
        after every convolution, a kernel's scale sets how far an inner
        step moves it, relative to its size.
      seed: int.
    """
    if init == "glorot_uniform":
        return tf.keras.initializers.GlorotUniform(seed=seed)
    if init == "pytorch_default":
        # kaiming_uniform_(a=sqrt(5)): variance 1 / (3 fan_in).
        return tf.keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform", seed=seed)
    return {"conv": conv_init, "dense": dense_init}[kind](seed)


def batch_norm(x, offset, groups=1, fused=True, second_order=True,
               epsilon=BN_EPSILON):
    """Transductive batch norm (batch statistics, centre only, no scale).

    Args:
      x: [G*N, H, W, C] pre-activations; the batch is ``groups`` independent
        forward passes stacked (e.g. Monte-Carlo noise samples), each
        normalised with its own statistics, as if run separately.
      offset: [C] the β of this block.
      groups: number of stacked passes G.
      fused: use TensorFlow's fused kernels (float32; stacked passes are
        moved into the channel axis), with the second derivative in closed
        form (``_batch_norm_backward_grad``), which is faster; otherwise
        the mean and variance are written out so that both derivatives
        flow through them (``tf.nn.moments`` stops the gradient of the
        mean inside the variance, which breaks second-order MAML).
      second_order: False makes this layer's backward pass a constant to any
        gradient taken of it (its first derivative is unchanged).  That is
        the meta-gradient the authors' TensorFlow 1 code computed: there the
        inner loop ran inside ``tf.map_fn``, and inside a v1 while loop the
        gradient of ``FusedBatchNormGrad`` comes out as None, so every
        second-order term through batch norm's backward pass was dropped.
      epsilon: added to the variance.  It is not negligible at the original
        initialisation: block 1's pre-activations (std-0.02 kernels on
        Omniglot's 0/1 pixels) have per-channel variances of 3e-5 to 6e-4
        (median 1.6e-4, measured), so with 1e-3 that block's outputs have
        a std of about 0.4, not 1, and scale with its kernel.
    Returns:
      [G*N, H, W, C], normalised and shifted by ``offset``.
    """
    if fused and x.dtype == tf.float32:
        if groups == 1:
            return _fused_batch_norm(x, offset, second_order, epsilon)
        return _grouped_fused_batch_norm(x, offset, groups, second_order,
                                         epsilon)
    if not second_order:
        return _constant_backward(
            lambda x_, o_: _explicit_batch_norm(x_, o_, groups, epsilon),
            x, offset)
    return _explicit_batch_norm(x, offset, groups, epsilon)


def _explicit_batch_norm(x, offset, groups, epsilon):
    """``batch_norm`` in plain ops, so that autodiff differentiates the mean
    and variance to any order; any float dtype (the float64 checks)."""
    shape = tf.shape(x)
    xg = tf.reshape(x, tf.concat([[groups, -1], shape[1:]], 0))
    # Two passes (mean, then the centred variance) rather than
    # E[x²] - E[x]², which loses all precision when a channel's mean is
    # large against its spread.
    mean = tf.reduce_mean(xg, axis=[1, 2, 3], keepdims=True)
    centred = xg - mean
    var = tf.reduce_mean(tf.square(centred), axis=[1, 2, 3], keepdims=True)
    y = centred * tf.math.rsqrt(var + epsilon) + offset
    return tf.reshape(y, shape)


def _constant_backward(fn, x, offset):
    """fn(x, offset) with its usual gradient, but that gradient's own
    gradient (w.r.t. x, offset and the incoming dy) is zero."""

    @tf.custom_gradient
    def layer(x, offset):
        def grad(dy):
            xs, os_ = tf.stop_gradient(x), tf.stop_gradient(offset)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch([xs, os_])
                ys = fn(xs, os_)
            dx, doffset = tape.gradient(ys, [xs, os_],
                                        output_gradients=tf.stop_gradient(dy))
            return tf.stop_gradient(dx), tf.stop_gradient(doffset)
        return fn(x, offset), grad

    return layer(x, offset)


def _fused_batch_norm(x, offset, second_order, epsilon):
    """``FusedBatchNormV3`` (scale 1, batch statistics) whose backward pass is
    ``FusedBatchNormGradV3`` on the forward's saved statistics, and whose
    backward pass has in turn the closed-form gradient of
    ``_batch_norm_backward_grad`` (second_order) or none at all (the
    authors' TF1 meta-gradient)."""
    scale = tf.ones_like(offset)

    @tf.custom_gradient
    def layer(x, offset):
        empty = tf.constant([], x.dtype)
        y, _, _, saved_mean, saved_var, saved = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=empty, variance=empty,
            epsilon=epsilon, is_training=True)

        @tf.custom_gradient
        def backward(dy, x):
            dx, _, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=x, scale=scale, reserve_space_1=saved_mean,
                reserve_space_2=saved_var, reserve_space_3=saved,
                epsilon=epsilon, is_training=True)

            def backward_grad(g_dx, g_doffset):
                return _batch_norm_backward_grad(dy, x, g_dx, g_doffset,
                                                 epsilon)
            return (dx, doffset), backward_grad

        def grad(dy):
            if not second_order:
                return [tf.stop_gradient(t) for t in backward(dy, x)]
            return backward(dy, x)
        return y, grad

    return layer(x, offset)


def _grouped_fused_batch_norm(x, offset, groups, second_order, epsilon):
    """``_fused_batch_norm`` with one set of statistics per stacked pass: the
    G passes move into the channel axis ([G*N, H, W, C] -> [N, H, W, G*C]),
    where the kernel's per-channel statistics are per pass and channel.
    The transposes cost less than the explicit ops they replace (meta-test
    at S = 30: 13% less time per episode)."""
    shape = tf.shape(x)
    h, w, c = shape[1], shape[2], shape[3]
    per_pass = tf.reshape(x, [groups, -1, h, w, c])
    wide = tf.reshape(tf.transpose(per_pass, [1, 2, 3, 0, 4]),
                      [-1, h, w, groups * c])
    y = _fused_batch_norm(wide, tf.tile(offset, [groups]), second_order,
                          epsilon)
    y = tf.transpose(tf.reshape(y, [-1, h, w, groups, c]), [3, 0, 1, 2, 4])
    return tf.reshape(y, shape)


def _batch_norm_backward_grad(dy, x, g, g_offset, epsilon):
    """Gradient of batch norm's backward pass, in closed form.

    The backward pass of y = (x - m) r + offset, r = (var + eps)^-1/2 (per
    channel; m, var over the N*H*W positions, M of them) is
    dx = r (dy - mean(dy)) - r³ c mean(dy c) with c = x - m, and
    d offset = sum(dy).  Given the gradients g (for dx) and g_offset, this
    returns those of dy and x ([N, H, W, C] each): with A = sum(g c),
    B = mean(dy c) and G = sum(g (dy - mean(dy))),

      d dy = r (g - mean(g)) - (r³ A / M) c + g_offset
      d x  = -(r³ / M)(G - 3 r² A B) c - r³ B (g - mean(g)) - (r³ A / M)(dy - mean(dy)).

    TensorFlow's own gradient of ``FusedBatchNormGrad`` reruns the backward
    pass with explicit ops under a tape and differentiates them; this is
    cheaper (Omniglot 1-shot MAML: 12% less time per meta-iteration, 22%
    less memory).
    """
    axes = [0, 1, 2]
    # Recomputed rather than read from the forward's reserve spaces, whose
    # meaning depends on the device (the variance on CPU, its inverse square
    # root under cuDNN).
    c = x - tf.reduce_mean(x, axes)
    r = tf.math.rsqrt(tf.reduce_mean(tf.square(c), axes) + epsilon)
    m = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), x.dtype)
    g_c = g - tf.reduce_mean(g, axes)
    dy_c = dy - tf.reduce_mean(dy, axes)
    a = tf.reduce_sum(g * c, axes)
    b = tf.reduce_mean(dy * c, axes)
    big_g = tf.reduce_sum(g * dy_c, axes)
    r3 = r * r * r
    d_dy = r * g_c - (r3 * a / m) * c + g_offset
    d_x = ((-(r3 / m) * (big_g - 3.0 * r * r * a * b)) * c - (r3 * b) * g_c
           - (r3 * a / m) * dy_c)
    return d_dy, d_x


def linear_maps(h, maps, op):
    """Applies linear maps [(kernel, bias), ...] to the same input h with
    ``op`` (conv or matmul); returns their outputs in order.  (One conv on
    the concatenated kernels was measured slower with oneDNN: the split and
    concat of the activations cost more than the wider GEMM saves.)"""
    return [add_bias(op(h, kernel), bias) for kernel, bias in maps]


def channel_sum(x):
    """Sum of x [..., C] over all axes but the last -> [C].

    A matrix product with a row of ones: on a CPU, ``reduce_sum`` over the
    leading axes of block 1's query activations (300x28x28x64) takes 22 ms,
    this 4 ms.
    """
    channels = tf.shape(x)[-1]
    rows = tf.reshape(x, [-1, channels])
    ones = tf.ones([1, tf.shape(rows)[0]], x.dtype)
    return tf.reshape(tf.matmul(ones, rows), [channels])


@tf.custom_gradient
def add_bias(x, bias):
    """x [..., C] + bias [C], whose bias gradient is ``channel_sum``.

    With a plain ``+`` the bias gradient is a ``reduce_sum``; with
    ``tf.nn.bias_add``, TensorFlow fuses its ``BiasAddGrad`` into the
    convolution's filter gradient, which oneDNN then runs about as slowly.
    The gradient is made of differentiable ops, so second order holds.
    """
    def grad(dy):
        return dy, channel_sum(dy)
    return x + bias, grad


def conv3x3(h, kernel):
    return tf.nn.conv2d(h, kernel, 1, "SAME")


class _ParamLayer(tf.keras.layers.Layer):
    """Base: remembers which group each weight belongs to."""

    def __init__(self, seed=0, init="original", **kwargs):
        super().__init__(**kwargs)
        self._seed = seed
        self._init = init
        self._draws = 0
        self.groups = {"theta": {}, "phi": {}, "beta": {}}

    def new_weight(self, group, name, shape, kind):
        """Adds a weight to ``group`` ('theta', 'phi' or 'beta').

        ``kind`` is 'conv', 'dense', 'zeros' or 'ones'; kernels follow the
        layer's initialiser scheme (``kernel_initializer``).  Every weight gets its
        own seeded initializer, since a reused unseeded Keras initializer
        repeats its values.
        """
        self._draws += 1
        seed = self._seed * 1000 + self._draws
        constant = {"zeros": tf.keras.initializers.Zeros(),
                    "ones": tf.keras.initializers.Ones()}
        initializer = (constant[kind] if kind in constant
                       else kernel_initializer(kind, self._init, seed))
        var = self.add_weight(name=name, shape=shape, initializer=initializer,
                              trainable=True)
        self.groups[group][name] = var
        return var

    def own_params(self):
        """{short name: variable} of all groups of this layer (the defaults
        that a ``params`` override replaces key by key)."""
        return {k: v for g in self.groups.values() for k, v in g.items()}


class ConvBlock(_ParamLayer):
    """3x3 conv (θ) → noise → batch norm (β) → ReLU → 2x2 max-pool.

    With ``smooth=True``, softplus replaces ReLU and average pooling replaces
    max pooling: the same network made twice differentiable everywhere, for
    finite-difference checks of second-order meta-gradients.

    With ``bn_scale=True``, batch norm also multiplies by a meta-learned
    scale γ [C] (initialised to 1, in the β group), as Keras'
    ``BatchNormalization`` does by default; the original code has none.
    It is a diagnostic: γ sets how strongly each channel's normalised
    output moves the loss, and so, per channel, how far an inner step of
    the same learning rate moves the block.
    """

    def __init__(self, channels, noise="none", smooth=False, fused_bn=True,
                 bn_second_order=True, bn_epsilon=BN_EPSILON, bn_scale=False,
                 seed=0, init="original", **kwargs):
        super().__init__(seed=seed, init=init, **kwargs)
        self.channels = channels
        self.noise = noise_lib.make_block_noise(noise)
        self.smooth = smooth
        self.fused_bn = fused_bn
        self.bn_second_order = bn_second_order
        self.bn_epsilon = bn_epsilon
        self.bn_scale = bn_scale

    def build(self, input_shape):
        cin = int(input_shape[-1])
        self.new_weight("theta", "kernel", [3, 3, cin, self.channels], "conv")
        self.new_weight("theta", "bias", [self.channels], "zeros")
        self.new_weight("beta", "offset", [self.channels], "zeros")
        self.noise.build(self, cin, self.channels)
        if self.bn_scale:  # last, so that every other weight keeps its draw
            self.new_weight("beta", "scale", [self.channels], "ones")
        super().build(input_shape)

    def call(self, h, params=None, sample=False, seed=None, groups=1,
             taps=None):
        """Forward one block.

        Args:
          h: [G*N, H, W, Cin] block input.
          params: optional {short name: tensor} overriding this layer's weights.
          sample: draw the noise (inner loop) or use its deterministic value.
          seed: int32 [2] stateless seed for the noise (needed when sampling).
          groups: number of stacked passes in the batch (see ``batch_norm``).
          taps: optional dict; if given, the noise writes diagnostic tensors
            into it (e.g. the multiplicative mask).
        Returns:
          [G*N, H/2, W/2, C].
        """
        p = {**self.own_params(), **(params or {})}
        mu, *maps = linear_maps(
            h, [(p["kernel"], p["bias"])] + self.noise.input_maps(p), conv3x3)
        x = self.noise(h, mu, maps, p, sample=sample, seed=seed, taps=taps)
        x = self._batch_norm(x, p, groups)
        if self.smooth:
            x = tf.nn.softplus(x)
            return tf.nn.avg_pool2d(x, 2, 2, "VALID")
        x = tf.nn.relu(x)
        return tf.nn.max_pool2d(x, 2, 2, "VALID")

    def _batch_norm(self, x, p, groups):
        """Batch norm with β = p["offset"], and γ = p["scale"] if ``bn_scale``."""
        # γ multiplies outside batch_norm, whose fused kernel's closed-form
        # second derivative assumes a unit scale; β is added after it.
        offset = tf.zeros_like(p["offset"]) if self.bn_scale else p["offset"]
        x = batch_norm(x, offset, groups=groups, fused=self.fused_bn,
                       second_order=self.bn_second_order, epsilon=self.bn_epsilon)
        if self.bn_scale:
            x = x * p["scale"] + p["offset"]
        return x


class DenseHead(_ParamLayer):
    """Dense layer to ``way`` logits (θ), with optional head noise."""

    def __init__(self, way, noise="none", seed=0, init="original", **kwargs):
        super().__init__(seed=seed, init=init, **kwargs)
        self.way = way
        self.noise = noise_lib.make_head_noise(noise)

    def build(self, input_shape):
        features = int(input_shape[-1])
        self.new_weight("theta", "kernel", [features, self.way], "dense")
        self.new_weight("theta", "bias", [self.way], "zeros")
        self.noise.build(self, features, self.way)
        super().build(input_shape)

    def call(self, h, params=None, sample=False, seed=None, taps=None):
        """[N, F] features → [N, way] logits (see ConvBlock.call for args)."""
        p = {**self.own_params(), **(params or {})}
        mu, *maps = linear_maps(
            h, [(p["kernel"], p["bias"])] + self.noise.input_maps(p), tf.matmul)
        return self.noise(h, mu, maps, p, sample=sample, seed=seed, taps=taps)
