"""A second, independent MAML (and MAML + meta-dropout) for Omniglot 20-way 1-shot, in PyTorch.

Written from DESIGN.md alone, to cross-check the TensorFlow port's learning
(docs/experiments.md, "An independent MAML in PyTorch"): the same arrays
(data/omniglot) and the same 1000 fixed test episodes (taken from
src.data.fixed_episodes, numpy only, so that the two are paired episode by
episode), but its own network, batch norm, second-order inner loop, Adam,
clipping and training sampler. Not part of the library; PyTorch is not a
project dependency, so run it from a venv of its own:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python docs/crosscheck/maml_torch.py --out runs/torch_maml_s0   # ~75 min
  /tmp/torchvenv/bin/python docs/crosscheck/maml_torch.py --out runs/torch_metadrop_s0 \
      --noise meta_dropout   # meta lr 3e-4; S = 1 at meta-training, 30 at test
  ... --iters 2000 --resume 1000   # continue from OUT/ckpt-1000.pt, as if never stopped

``--noise meta_dropout`` adds DESIGN.md's noise generator φ (a conv per block,
a = α + ε, output μ ⊙ softplus(a); an additive head σ ⊙ ε with σ =
softplus(h·w + b) tiled over the logits), sampled in the inner loop and
deterministic on the query set. Without it the script draws exactly the
random numbers it drew before φ was added, so the MAML runs repeat.

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


def truncated_normal(shape, gen):
    w = torch.empty(*shape, dtype=torch.float32)
    return torch.nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04, generator=gen)


def init_params(gen, noise="none"):
    """θ, φ ({} for MAML) and β, each a dict of leaf tensors."""
    p = {}
    cin = 1
    for l in range(1, 5):
        p[f"w{l}"] = truncated_normal((C, cin, 3, 3), gen)
        p[f"b{l}"] = torch.zeros(C)
        cin = C
    p["wd"] = torch.randn(C, WAY, generator=gen) * 0.02
    p["bd"] = torch.zeros(WAY)
    phi = {}
    if noise == "meta_dropout":
        cin = 1
        for l in range(1, 5):
            phi[f"v{l}"] = truncated_normal((C, cin, 3, 3), gen)
            phi[f"c{l}"] = torch.zeros(C)
            cin = C
        phi["vd"] = torch.randn(C, 1, generator=gen) * 0.02
        phi["cd"] = torch.zeros(1)
    beta = {f"beta{l}": torch.zeros(C) for l in range(1, 5)}
    for t in list(p.values()) + list(phi.values()) + list(beta.values()):
        t.requires_grad_(True)
    return p, phi, beta


def batch_norm(x, offset, samples):
    """Transductive batch norm, centre only, eps 1e-3, of x [S*N, C, H, W]
    holding S forward passes (sample-major), each with its own statistics."""
    if samples > 1:  # the S passes side by side as S*C channels of N images
        s, (n, c, h, w) = samples, (x.shape[0] // samples, *x.shape[1:])
        x = x.view(s, n, c, h, w).transpose(0, 1).reshape(n, s * c, h, w)
        x = batch_norm(x, offset.repeat(s), 1)
        return x.view(n, s, c, h, w).transpose(0, 1).reshape(s * n, c, h, w)
    if EXPLICIT_BN:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-3) + offset.view(1, -1, 1, 1)
    # the native kernel: batch statistics (biased variance), double backward
    return F.batch_norm(x, None, None, None, offset, training=True, eps=1e-3)


def forward(x, p, beta, phi=None, eps=None, samples=1):
    """x [S*N, 1, 28, 28] -> logits [S*N, WAY].

    phi: the noise generator's parameters ({} or None: MAML). eps: None for
    the deterministic pass (a = α, logits = μ), else a function shape ->
    N(0, I) draws of that shape. samples: S, the passes stacked in x.
    """
    for l in range(1, 5):
        mu = F.conv2d(x, p[f"w{l}"], p[f"b{l}"], padding=1)
        if phi:
            a = F.conv2d(x, phi[f"v{l}"], phi[f"c{l}"], padding=1)
            if eps is not None:
                a = a + eps(a.shape)
            mu = mu * F.softplus(a)
        x = F.max_pool2d(F.relu(batch_norm(mu, beta[f"beta{l}"], samples)), 2)  # 28 -> 14 -> 7 -> 3 -> 1
    h = x.flatten(1)
    logits = h @ p["wd"] + p["bd"]
    if phi and eps is not None:
        logits = logits + F.softplus(h @ phi["vd"] + phi["cd"]) * eps(logits.shape)
    return logits


def adapt(p, beta, xs, ys, create_graph, phi=None, eps=None, samples=1):
    """STEPS inner SGD steps on θ from the support set xs [N, 1, 28, 28], ys [N],
    the loss averaged over the N images and S noise samples; returns θ_K."""
    theta = dict(p)
    keys = list(theta)
    xs, ys = xs.repeat(samples, 1, 1, 1), ys.repeat(samples)
    for _ in range(STEPS):
        loss = F.cross_entropy(forward(xs, theta, beta, phi, eps, samples), ys)
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


def evaluate(p, phi, beta, test_images, episodes=1000, samples=30, seed=1000):
    """Per-episode query accuracies in percent, [episodes]; meta-dropout
    adapts with ``samples`` noise draws per inner step (MAML: 1, no noise)."""
    gen = torch.Generator().manual_seed(seed)
    eps = (lambda shape: torch.randn(shape, generator=gen)) if phi else None
    samples = samples if phi else 1
    accs = []
    for batch in fixed_episodes(test_images, (28, 28, 1), WAY, SHOT, QUERY, episodes, 1000, 2):
        for i in range(batch["support_x"].shape[0]):
            xs, xq = to_torch(batch["support_x"][i]), to_torch(batch["query_x"][i])
            ys = torch.from_numpy(batch["support_y"][i]).long()
            yq = torch.from_numpy(batch["query_y"][i]).long()
            theta = adapt(p, beta, xs, ys, False, phi, eps, samples)
            with torch.no_grad():
                accs.append((forward(xq, theta, beta, phi).argmax(1) == yq).float().mean().item())
    return np.array(accs) * 100


def restore(path, p, phi, beta, opt):
    """Loads a checkpoint written by main() into the leaf tensors and Adam."""
    ckpt = torch.load(path)
    with torch.no_grad():
        for mine, saved in ((p, ckpt["p"]), (phi, ckpt["phi"]), (beta, ckpt["beta"])):
            for k in mine:
                mine[k].copy_(saved[k])
    opt.load_state_dict(ckpt["opt"])


def replay(iters, images, rng, eps):
    """Advances the episode stream (rng) and the noise stream (eps, None for
    MAML) past ``iters`` meta-iterations by drawing what they drew, in the
    same order and shapes, so that a resumed run continues the one it resumes."""
    sizes = [28, 14, 7, 3]  # the four blocks' map sizes
    for _ in range(iters):
        sample_batch(images, rng)
        if eps is None:
            continue
        for _ in range(B * STEPS):  # per task and inner step: each block's map, then the head's logits
            for s in sizes:
                eps((WAY * SHOT, C, s, s))
            eps((WAY * SHOT, WAY))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--noise", choices=["none", "meta_dropout"], default="none")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--meta_lr", type=float, help="default: 1e-3 for MAML, 3e-4 for meta-dropout")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval_every", type=int, default=500)
    ap.add_argument("--test_episodes", type=int, default=1000)
    ap.add_argument("--test_samples", type=int, default=30, help="S at test (meta-dropout)")
    ap.add_argument("--resume", type=int, default=0,
                    help="continue from OUT/ckpt-N.pt, with the random streams replayed to iteration N")
    args = ap.parse_args()
    meta_lr = args.meta_lr or (3e-4 if args.noise == "meta_dropout" else 1e-3)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator().manual_seed(args.seed + 1)  # unused by MAML
    eps = lambda shape: torch.randn(shape, generator=noise_gen)  # noqa: E731
    rng = np.random.default_rng(args.seed + 12345)
    train = np.load(f"{REPO}/data/omniglot/train.npy")
    test = np.load(f"{REPO}/data/omniglot/test.npy")
    p, phi, beta = init_params(gen, args.noise)
    params = list(p.values()) + list(phi.values()) + list(beta.values())
    opt = torch.optim.Adam(params, lr=meta_lr)
    if args.resume:
        restore(os.path.join(args.out, f"ckpt-{args.resume}.pt"), p, phi, beta, opt)
        replay(args.resume, train, rng, eps if phi else None)
    log = open(os.path.join(args.out, "train.log"), "a")

    def say(line):
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(f"{vars(args)}, meta lr {meta_lr}")
    t0 = time.time()
    acc_hist, loss_hist = [], []
    for it in range(args.resume + 1, args.iters + 1):
        opt.zero_grad()
        meta_loss, meta_acc = 0.0, 0.0
        for xs, ys, xq, yq in sample_batch(train, rng):
            theta = adapt(p, beta, xs, ys, True, phi, eps)
            logits = forward(xq, theta, beta, phi)  # deterministic noise on the query set
            meta_loss = meta_loss + F.cross_entropy(logits, yq) / B
            meta_acc += (logits.argmax(1) == yq).float().mean().item() / B
        meta_loss.backward()
        for t in params:
            t.grad.clamp_(-3.0, 3.0)
        opt.step()
        acc_hist.append(meta_acc)
        loss_hist.append(meta_loss.item())
        if it % 25 == 0:
            say(f"iter {it} loss {np.mean(loss_hist[-25:]):.3f} acc {100 * np.mean(acc_hist[-25:]):.1f} "
                f"{(time.time() - t0) / (it - args.resume):.2f} s/iter")
        if it % args.eval_every == 0 or it == args.iters:
            torch.save({"p": p, "phi": phi, "beta": beta, "opt": opt.state_dict()},
                       os.path.join(args.out, f"ckpt-{it}.pt"))
            te = time.time()
            accs = evaluate(p, phi, beta, test, args.test_episodes, args.test_samples)
            ci = 1.96 * accs.std() / np.sqrt(len(accs))
            say(f"test {it}: {accs.mean():.2f} +- {ci:.2f} on {len(accs)} episodes ({time.time() - te:.0f} s)")
            with open(os.path.join(args.out, f"test_accuracies-{it}.json"), "w") as f:
                json.dump(accs.tolist(), f)


if __name__ == "__main__":
    main()
