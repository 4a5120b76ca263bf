"""The 4-block ConvNet of Finn et al. with pluggable meta-dropout noise.

Parameters travel as flat dicts keyed ``"<layer>/<short name>"`` (e.g.
``"block1/kernel"``, ``"head/noise_bias"``), so that the inner loop can hand
the network any mix of variables and adapted tensors.
"""

import tensorflow as tf

from src.layers import BN_EPSILON, ConvBlock, DenseHead

# (input shape, channels) of the two datasets.
DATASETS = {"omniglot": ((28, 28, 1), 64), "miniimagenet": ((84, 84, 3), 32)}
NUM_BLOCKS = 4


class ConvNet(tf.keras.Model):
    """4 x [conv → noise → BN → ReLU → max-pool] → flatten → dense.

    Args:
      dataset: 'omniglot' (28x28x1, 64 channels, 64 features) or
        'miniimagenet' (84x84x3, 32 channels, 800 features).
      way: number of logits.
      noise: noise kind of the blocks and head ('none' = MAML,
        'meta_dropout'); see ``src.noise``.
      smooth: softplus / average-pool variant (for finite-difference tests).
      fused_bn: use the fused batch-norm kernel where possible.
      bn_second_order: False drops the second-order terms through batch
        norm's backward pass, as the authors' TF1 code did (see
        ``layers.batch_norm``).
      bn_epsilon: batch norm's variance epsilon (the original code's 1e-3).
      bn_scale: also a meta-learned batch-norm scale γ per channel (a
        diagnostic; the original code has none, see ``layers.ConvBlock``).
      seed: initialisation seed; every weight gets its own draw.
      init: kernel initialisers, 'original' (std 0.02), 'glorot_uniform'
        or 'pytorch_default' (see ``layers.kernel_initializer``).
      dtype: 'float32', or 'float64' for numerical tests.
    """

    def __init__(self, dataset, way, noise="none", smooth=False, fused_bn=True,
                 bn_second_order=True, bn_epsilon=BN_EPSILON, bn_scale=False,
                 seed=0, init="original", dtype="float32"):
        super().__init__(name="convnet", dtype=dtype)
        self.input_shape_hwc, channels = DATASETS[dataset]
        self.blocks = [
            ConvBlock(channels, noise=noise, smooth=smooth, fused_bn=fused_bn,
                      bn_second_order=bn_second_order, bn_epsilon=bn_epsilon,
                      bn_scale=bn_scale, seed=seed * 10 + i,
                      init=init, name=f"block{i + 1}", dtype=dtype)
            for i in range(NUM_BLOCKS)]
        self.head = DenseHead(way, noise=noise, seed=seed * 10 + NUM_BLOCKS,
                              init=init, name="head", dtype=dtype)
        self.layers_by_name = {l.name: l for l in self.blocks + [self.head]}
        self.build_params()

    def build_params(self):
        """Creates all variables by tracing one dummy forward pass."""
        x = tf.zeros((2,) + self.input_shape_hwc, dtype=self.dtype)
        self.forward(x, sample=True, seed=tf.constant([0, 0]))

    def group(self, name):
        """{"<layer>/<short>": variable} of group 'theta', 'phi' or 'beta'."""
        return {f"{layer_name}/{k}": v
                for layer_name, layer in self.layers_by_name.items()
                for k, v in layer.groups[name].items()}

    def params(self):
        """All variables as one flat dict (θ ∪ φ ∪ β)."""
        return {**self.group("theta"), **self.group("phi"), **self.group("beta")}

    def forward(self, x, params=None, sample=False, seed=None, groups=1,
                taps=None):
        """Logits of a batch.

        Args:
          x: [G*N, H, W, C] images (G stacked passes, see ``groups``).
          params: optional flat dict overriding any subset of the variables.
          sample: sample the noise (inner loop) or make it deterministic
            (query pass, and MAML always).
          seed: int32 [2] stateless seed of the noise; needed if sampling.
          groups: G, the number of independent passes stacked in the batch;
            batch norm normalises each with its own statistics.
          taps: optional dict that receives per-layer diagnostics
            (``taps["block1"]["mask"]`` ...).
        Returns:
          [G*N, way] logits.
        """
        params = params or {}
        seeds = (tf.random.experimental.stateless_split(seed, NUM_BLOCKS + 1)
                 if sample else [None] * (NUM_BLOCKS + 1))
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h, params=_sub(params, block.name), sample=sample,
                      seed=seeds[i], groups=groups,
                      taps=_tap(taps, block.name))
        h = tf.reshape(h, [tf.shape(h)[0], -1])
        return self.head(h, params=_sub(params, "head"), sample=sample,
                         seed=seeds[NUM_BLOCKS], taps=_tap(taps, "head"))

    def call(self, x, training=False):
        """Deterministic logits [N, way] of images x [N, H, W, C] with the
        current variables (Keras API).  ``training`` is accepted for Keras and
        changes nothing: batch norm is transductive, always normalising with
        the statistics of ``x`` (there are no moving averages), and the noise
        is sampled only through ``forward(..., sample=True)``."""
        del training
        return self.forward(x)


def _sub(flat, layer_name):
    prefix = layer_name + "/"
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def _tap(taps, name):
    if taps is None:
        return None
    return taps.setdefault(name, {})
