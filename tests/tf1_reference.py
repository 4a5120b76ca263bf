"""MAML's meta-gradient built the way the authors' TensorFlow 1 code built it.

Run as a script (it switches TensorFlow to v1 graph mode for the whole
process, so tests call it in a subprocess):

    python tests/tf1_reference.py IN.npz OUT.npz

IN.npz holds the weights under our variable names (``w:block1/kernel:0`` ...),
the episode (``support_x`` [B, Ns, 28, 28, 1], ``support_y`` int [B, Ns],
``query_x``, ``query_y``) and ``inner_lr``, ``inner_steps``, ``way``.

The graph is written independently of ``src``: placeholders, ``tf.map_fn``
over the tasks of the meta-batch, the inner steps with ``tf.gradients``,
``tf.compat.v1.nn.fused_batch_norm`` (centre only) followed by ReLU and
max-pooling, the mean softmax cross-entropy of ``tf.compat.v1.losses``.
OUT.npz receives the meta-gradient of the mean query loss under the same
names, twice: ``map_fn:<name>`` (the tasks inside ``tf.map_fn``, as the
authors ran it) and ``unrolled:<name>`` (the same tasks in a Python loop).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

v1 = tf.compat.v1


def conv_net(x, theta, beta, channels=64):
    """Logits of the 4-block ConvNet; x [N, 28, 28, 1]."""
    for l in range(1, 5):
        x = tf.nn.conv2d(x, theta[f"block{l}/kernel"], [1, 1, 1, 1], "SAME")
        x = x + theta[f"block{l}/bias"]
        x, _, _ = v1.nn.fused_batch_norm(x, tf.ones([channels]), beta[l - 1],
                                         epsilon=1e-3, is_training=True)
        x = tf.nn.max_pool2d(tf.nn.relu(x), 2, 2, "VALID")
    x = tf.reshape(x, [tf.shape(x)[0], -1])
    return tf.matmul(x, theta["head/kernel"]) + theta["head/bias"]


def main(path_in, path_out):
    v1.disable_v2_behavior()
    data = np.load(path_in)
    way, steps = int(data["way"]), int(data["inner_steps"])
    inner_lr = float(data["inner_lr"])
    names = [k[2:] for k in data.files if k.startswith("w:")]
    variables = {n: v1.Variable(data["w:" + n], name=n.split(":")[0].replace("/", "_"))
                 for n in names}
    short = {n.split(":")[0]: v for n, v in variables.items()}
    theta_keys = [k for k in short if not k.endswith("offset")]
    beta = [short[f"block{l}/offset"] for l in range(1, 5)]

    def task(inputs):
        xs, ys, xq, yq = inputs
        theta = {k: short[k] for k in theta_keys}
        for _ in range(steps):
            loss = v1.losses.softmax_cross_entropy(tf.one_hot(ys, way), conv_net(xs, theta, beta))
            grads = tf.gradients(loss, [theta[k] for k in theta_keys])
            theta = {k: theta[k] - inner_lr * g for k, g in zip(theta_keys, grads)}
        return v1.losses.softmax_cross_entropy(tf.one_hot(yq, way), conv_net(xq, theta, beta))

    episode = tuple(tf.constant(data[k]) for k in ("support_x", "support_y", "query_x", "query_y"))
    tasks = int(data["support_x"].shape[0])
    losses = {
        "map_fn": tf.reduce_mean(tf.map_fn(task, episode, dtype=tf.float32,
                                           parallel_iterations=tasks)),
        "unrolled": tf.reduce_mean(tf.stack(
            [task(tuple(e[b] for e in episode)) for b in range(tasks)])),
    }
    order = list(variables)
    fetch = {kind: tf.gradients(loss, [variables[n] for n in order],
                                unconnected_gradients="zero")
             for kind, loss in losses.items()}
    with v1.Session() as sess:
        sess.run(v1.global_variables_initializer())
        values = sess.run(fetch)
    np.savez(path_out, **{f"{kind}:{n}": g for kind, gs in values.items()
                          for n, g in zip(order, gs)})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
