"""Step 2 of the gradient cross-check: the same meta-gradient in PyTorch.

  /tmp/torchvenv/bin/python docs/crosscheck/gradient_torch.py OUT.npz

Loads what gradient_tf.py saved, recomputes the meta-loss and its
second-order gradient with maml_torch.py's network and inner loop (float64;
for meta-dropout, fed the noise draws TensorFlow recorded, in the order it
drew them) and prints, per variable, the largest difference from
TensorFlow's.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import maml_torch  # noqa: E402

# maml_torch.py's names of the TensorFlow variables: (group, key)
NAMES = {f"block{l}/{tf_name}:0": (group, f"{key}{l}")
         for l in range(1, 5)
         for tf_name, group, key in [("kernel", "p", "w"), ("bias", "p", "b"),
                                     ("noise_kernel", "phi", "v"), ("noise_bias", "phi", "c"),
                                     ("offset", "beta", "beta")]}
NAMES.update({"head/kernel:0": ("p", "wd"), "head/bias:0": ("p", "bd"),
              "head/noise_kernel:0": ("phi", "vd"), "head/noise_bias:0": ("phi", "cd")})


def to_torch_variable(a):
    """A TensorFlow variable in PyTorch's layout ([3, 3, in, out] kernels to
    [out, in, 3, 3]), float64."""
    a = torch.tensor(a, dtype=torch.float64)
    return a.permute(3, 2, 0, 1).contiguous() if a.ndim == 4 else a


def to_torch_maps(a):
    """[.., H, W, C] images or noise maps to PyTorch's [.., C, H, W], float64
    (other arrays only to float64)."""
    return (maml_torch.to_torch(a) if a.ndim == 4 else torch.from_numpy(a)).double()


def feeder(d):
    """A maml_torch ``eps`` that returns TensorFlow's recorded draws in order."""
    draws = iter(sorted((k for k in d.files if k.startswith("noise:")),
                        key=lambda k: int(k.split(":")[1])))

    def eps(shape):
        a = to_torch_maps(d[next(draws)])
        assert a.shape == shape, (a.shape, shape)
        return a
    return eps


def main(path):
    d = np.load(path)
    params = {"p": {}, "phi": {}, "beta": {}}
    tf_names = [k[len("var:"):] for k in d.files if k.startswith("var:")]
    for name in tf_names:
        group, key = NAMES[name]
        params[group][key] = to_torch_variable(d["var:" + name]).requires_grad_(True)
    p, phi, beta = params["p"], params["phi"], params["beta"]
    samples = int(d["mc_samples"]) if "mc_samples" in d.files else 1
    eps = feeder(d) if phi else None
    tasks = d["batch:support_x"].shape[0]
    loss = 0
    for b in range(tasks):
        xs, xq = to_torch_maps(d["batch:support_x"][b]), to_torch_maps(d["batch:query_x"][b])
        ys = torch.tensor(d["batch:support_y"][b]).long()
        yq = torch.tensor(d["batch:query_y"][b]).long()
        theta = maml_torch.adapt(p, beta, xs, ys, True, phi, eps, samples)
        loss = loss + F.cross_entropy(maml_torch.forward(xq, theta, beta, phi), yq) / tasks
    leaves = [params[NAMES[n][0]][NAMES[n][1]] for n in tf_names]
    grads = torch.autograd.grad(loss, leaves)
    print(f"meta-loss: PyTorch {loss.item():.12f}, TensorFlow {float(d['loss']):.12f}"
          f" ({len(tf_names)} variables, S = {samples})")
    for name, g in zip(tf_names, grads):
        g = g.numpy()
        if g.ndim == 4:
            g = g.transpose(2, 3, 1, 0)
        ref = d["grad:" + name]
        print(f"{name:23s} max |difference| {np.abs(g - ref).max():.1e}   "
              f"max |gradient| {np.abs(ref).max():.1e}")


if __name__ == "__main__":
    main(sys.argv[1])
