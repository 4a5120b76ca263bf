"""Step 2 of the gradient cross-check: the same meta-gradient in PyTorch.

  /tmp/torchvenv/bin/python docs/crosscheck/gradient_torch.py OUT.npz

Loads what gradient_tf.py saved, recomputes the meta-loss and its
second-order gradient with maml_torch.py's network and inner loop (float64)
and prints, per variable, the largest difference from TensorFlow's.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import maml_torch  # noqa: E402

NAMES = ([f"block{l}/{k}:0" for l in range(1, 5) for k in ("kernel", "bias")]
         + ["head/kernel:0", "head/bias:0"] + [f"block{l}/offset:0" for l in range(1, 5)])


def main(path):
    d = np.load(path)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    # TensorFlow's kernels are [3, 3, in, out]; PyTorch's [out, in, 3, 3].
    p = {}
    for l in range(1, 5):
        p[f"w{l}"] = t(d[f"var:block{l}/kernel:0"]).permute(3, 2, 0, 1).contiguous()
        p[f"b{l}"] = t(d[f"var:block{l}/bias:0"])
    p["wd"], p["bd"] = t(d["var:head/kernel:0"]), t(d["var:head/bias:0"])
    beta = {f"beta{l}": t(d[f"var:block{l}/offset:0"]) for l in range(1, 5)}
    for v in list(p.values()) + list(beta.values()):
        v.requires_grad_(True)
    tasks = d["batch:support_x"].shape[0]
    loss = 0
    for b in range(tasks):
        xs = t(np.moveaxis(d["batch:support_x"][b], -1, 1))
        xq = t(np.moveaxis(d["batch:query_x"][b], -1, 1))
        ys = torch.tensor(d["batch:support_y"][b]).long()
        yq = torch.tensor(d["batch:query_y"][b]).long()
        theta = maml_torch.adapt(p, beta, xs, ys, create_graph=True)
        loss = loss + F.cross_entropy(maml_torch.forward(xq, theta, beta), yq) / tasks
    grads = torch.autograd.grad(loss, list(p.values()) + list(beta.values()))
    print(f"meta-loss: PyTorch {loss.item():.12f}, TensorFlow {float(d['loss']):.12f}")
    for name, g in zip(NAMES, grads):
        g = g.numpy()
        if g.ndim == 4:
            g = g.transpose(2, 3, 1, 0)
        ref = d["grad:" + name]
        print(f"{name:17s} max |difference| {np.abs(g - ref).max():.1e}   "
              f"max |gradient| {np.abs(ref).max():.1e}")


if __name__ == "__main__":
    main(sys.argv[1])
