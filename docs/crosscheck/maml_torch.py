"""A second, independent MAML for Omniglot 20-way 1-shot, in PyTorch.

Written from DESIGN.md alone, to cross-check the TensorFlow port's learning
(docs/experiments.md, "An independent MAML in PyTorch"): the same arrays
(data/omniglot) and the same 1000 fixed test episodes (taken from
src.data.fixed_episodes, numpy only, so that the two are paired episode by
episode), but its own network, batch norm, second-order inner loop, Adam,
clipping and training sampler. Not part of the library; PyTorch is not a
project dependency, so run it from a venv of its own:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python docs/crosscheck/maml_torch.py --out runs/torch_maml_s0   # ~75 min

It prints the meta-training loss and accuracy every 25 iterations and, every
``--eval_every`` iterations, the accuracy on the test episodes, whose
per-episode values go to OUT/test_accuracies-N.json (see paired.py).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from src.data import fixed_episodes  # numpy only: the test tasks, for pairing  # noqa: E402

EXPLICIT_BN = False  # True: batch norm written out (the same values, about twice as slow)
WAY, SHOT, QUERY, STEPS, INNER_LR, B, C = 20, 1, 15, 5, 0.1, 4, 64


def init_params(gen):
    p = {}
    cin = 1
    for l in range(1, 5):
        w = torch.empty(C, cin, 3, 3, dtype=torch.float32)
        torch.nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04, generator=gen)
        p[f"w{l}"] = w
        p[f"b{l}"] = torch.zeros(C)
        cin = C
    p["wd"] = torch.randn(C, WAY, generator=gen) * 0.02
    p["bd"] = torch.zeros(WAY)
    beta = {f"beta{l}": torch.zeros(C) for l in range(1, 5)}
    for t in list(p.values()) + list(beta.values()):
        t.requires_grad_(True)
    return p, beta


def forward(x, p, beta):
    """x [N, 1, 28, 28] -> logits [N, WAY]. Transductive batch norm, centre only, eps 1e-3."""
    for l in range(1, 5):
        x = F.conv2d(x, p[f"w{l}"], p[f"b{l}"], padding=1)
        if EXPLICIT_BN:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
            x = (x - mean) / torch.sqrt(var + 1e-3) + beta[f"beta{l}"].view(1, -1, 1, 1)
        else:  # the native kernel: batch statistics (biased variance), double backward
            x = F.batch_norm(x, None, None, None, beta[f"beta{l}"], training=True, eps=1e-3)
        x = F.max_pool2d(F.relu(x), 2)  # floor: 28 -> 14 -> 7 -> 3 -> 1
    return x.flatten(1) @ p["wd"] + p["bd"]


def adapt(p, beta, xs, ys, create_graph):
    theta = dict(p)
    keys = list(theta)
    for _ in range(STEPS):
        loss = F.cross_entropy(forward(xs, theta, beta), ys)
        grads = torch.autograd.grad(loss, [theta[k] for k in keys], create_graph=create_graph)
        theta = {k: theta[k] - INNER_LR * g for k, g in zip(keys, grads)}
    return theta


def to_torch(x):  # [.., 28, 28, 1] float32 -> [.., 1, 28, 28]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def sample_batch(images, rng):
    classes = rng.choice(images.shape[0], WAY, replace=False)  # shared by the meta-batch
    tasks = []
    for _ in range(B):
        idx = np.stack([rng.permutation(images.shape[1])[:SHOT + QUERY] for _ in range(WAY)])
        x = images[classes[:, None], idx].astype(np.float32) / 255.0  # [WAY, 16, 784]
        x = x.reshape(WAY, SHOT + QUERY, 1, 28, 28)
        xs = torch.from_numpy(x[:, :SHOT].reshape(-1, 1, 28, 28).copy())
        xq = torch.from_numpy(x[:, SHOT:].reshape(-1, 1, 28, 28).copy())
        ys = torch.arange(WAY).repeat_interleave(SHOT)
        yq = torch.arange(WAY).repeat_interleave(QUERY)
        tasks.append((xs, ys, xq, yq))
    return tasks


def evaluate(p, beta, test_images, episodes=1000):
    accs = []
    for batch in fixed_episodes(test_images, (28, 28, 1), WAY, SHOT, QUERY, episodes, 1000, 2):
        for i in range(batch["support_x"].shape[0]):
            xs, xq = to_torch(batch["support_x"][i]), to_torch(batch["query_x"][i])
            ys = torch.from_numpy(batch["support_y"][i]).long()
            yq = torch.from_numpy(batch["query_y"][i]).long()
            theta = adapt(p, beta, xs, ys, create_graph=False)
            with torch.no_grad():
                accs.append((forward(xq, theta, beta).argmax(1) == yq).float().mean().item())
    accs = np.array(accs) * 100
    return accs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--meta_lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval_every", type=int, default=500)
    ap.add_argument("--test_episodes", type=int, default=1000)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 12345)
    train = np.load(f"{REPO}/data/omniglot/train.npy")
    test = np.load(f"{REPO}/data/omniglot/test.npy")
    p, beta = init_params(gen)
    params = list(p.values()) + list(beta.values())
    opt = torch.optim.Adam(params, lr=args.meta_lr)
    log = open(os.path.join(args.out, "train.log"), "a")
    t0 = time.time()
    acc_hist, loss_hist = [], []
    for it in range(1, args.iters + 1):
        opt.zero_grad()
        meta_loss, meta_acc = 0.0, 0.0
        for xs, ys, xq, yq in sample_batch(train, rng):
            theta = adapt(p, beta, xs, ys, create_graph=True)
            logits = forward(xq, theta, beta)
            meta_loss = meta_loss + F.cross_entropy(logits, yq) / B
            meta_acc += (logits.argmax(1) == yq).float().mean().item() / B
        meta_loss.backward()
        for t in params:
            t.grad.clamp_(-3.0, 3.0)
        opt.step()
        acc_hist.append(meta_acc)
        loss_hist.append(meta_loss.item())
        if it % 25 == 0:
            line = (f"iter {it} loss {np.mean(loss_hist[-25:]):.3f} acc {100 * np.mean(acc_hist[-25:]):.1f} "
                    f"{(time.time() - t0) / it:.2f} s/iter")
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
        if it % args.eval_every == 0 or it == args.iters:
            torch.save({"p": p, "beta": beta, "opt": opt.state_dict()},
                       os.path.join(args.out, f"ckpt-{it}.pt"))
            te = time.time()
            accs = evaluate(p, beta, test, args.test_episodes)
            ci = 1.96 * accs.std() / np.sqrt(len(accs))
            line = f"test {it}: {accs.mean():.2f} +- {ci:.2f} on {len(accs)} episodes ({time.time() - te:.0f} s)"
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()
            with open(os.path.join(args.out, f"test_accuracies-{it}.json"), "w") as f:
                json.dump(accs.tolist(), f)


if __name__ == "__main__":
    main()
