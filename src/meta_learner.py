"""MAML / Meta-SGD with meta-dropout: the inner loop and the meta-step.

One meta-iteration, top to bottom:

1. ``MetaLearner.train_step(batch, seed)`` calls ``meta_gradients``, which
   opens one outer tape per task.
2. Inside task b's tape, ``task_loss`` runs ``adapt``: K inner SGD steps on the
   support set, from θ, with the noise sampled (S Monte-Carlo passes), each
   step's gradient taken with an inner tape *inside* the outer one, so that
   the outer gradient goes through it (second order).  θ is handled as
   tensors; no variable is assigned inside a tape.
3. The adapted θ_K classifies the query set with the noise deterministic; the
   cross-entropy, averaged over the meta-batch, is the meta-loss.
4. The meta-gradient w.r.t. θ, φ, β (and Meta-SGD's step sizes) is clipped
   element-wise to [-clip, clip] and applied with Adam.
"""

import tensorflow as tf


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy; logits [N, way], labels int [N] -> scalar."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=logits))


def accuracy(logits, labels):
    """Fraction of argmax hits; logits [N, way], labels int [N] -> scalar."""
    hits = tf.equal(tf.argmax(logits, -1, output_type=labels.dtype), labels)
    return tf.reduce_mean(tf.cast(hits, tf.float32))


def support_loss(model, params, x, y, mc_samples, seed):
    """Inner-loop loss: cross-entropy with sampled noise, averaged over the N
    support examples and S Monte-Carlo samples.

    The S passes are stacked into one batch [S*N, ...] whose batch norm keeps
    each pass's own statistics, which equals S separate forward passes.

    Args:
      model: a ``ConvNet``.  params: flat dict of (adapted) parameters.
      x: [N, H, W, C] support images.  y: int [N] labels.
      mc_samples: S.  seed: int [2] stateless noise seed.
    Returns:
      scalar loss.
    """
    xs = tf.tile(x, [mc_samples, 1, 1, 1])
    ys = tf.tile(y, [mc_samples])
    logits = model.forward(xs, params, sample=True, seed=seed,
                           groups=mc_samples)
    return cross_entropy(logits, ys)


def adapt(model, params, inner_lr, x, y, steps, mc_samples, seed,
          first_order=False):
    """K inner SGD steps on the support set, as a pure function.

    Args:
      model: a ``ConvNet``.
      params: flat dict of θ, φ, β (variables or tensors).
      inner_lr: {key: scalar or tensor of that parameter's shape} step
        sizes; its keys name the parameters adapted (θ's, and β's too with
        ``MetaLearner(adapt_offsets=True)``), the rest stay fixed.
      x: [N, H, W, C], y: int [N] the support set.
      steps: K.  mc_samples: S.  seed: int [2].
      first_order: stop the gradient of each inner gradient (first-order
        MAML); the default keeps the full second-order meta-gradient.
    Returns:
      flat dict {adapted key: adapted tensor}.
    """
    fast = {k: tf.identity(params[k]) for k in inner_lr}
    for k in range(steps):
        step_seed = tf.random.experimental.stateless_fold_in(seed, k)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(fast)
            loss = support_loss(model, {**params, **fast}, x, y, mc_samples,
                                step_seed)
        grads = tape.gradient(loss, fast)
        if first_order:
            grads = {n: tf.stop_gradient(g) for n, g in grads.items()}
        fast = {n: fast[n] - inner_lr[n] * grads[n] for n in fast}
    return fast


def task_loss(model, params, inner_lr, support_x, support_y, query_x,
              query_y, steps, mc_samples, seed, first_order=False):
    """Adapts on one task's support set and scores the query set.

    Shapes: support_x [Ns, H, W, C], support_y int [Ns], query_x
    [Nq, H, W, C], query_y int [Nq].  Returns (query loss, query accuracy),
    the query pass having deterministic noise.
    """
    fast = adapt(model, params, inner_lr, support_x, support_y, steps,
                 mc_samples, seed, first_order)
    logits = model.forward(query_x, {**params, **fast}, sample=False)
    return cross_entropy(logits, query_y), accuracy(logits, query_y)


class MetaLearner(tf.Module):
    """Owns the meta-parameters' optimiser and the compiled steps.

    Args:
      model: a built ``ConvNet`` (owns θ, φ, β).
      inner_lr: α, the inner step size.
      inner_steps: K.
      meta_lr: Adam's learning rate.
      meta_sgd: learn one inner step size per θ element (Meta-SGD),
        initialised to ``inner_lr``; otherwise α is a constant (MAML).
      first_order: drop second-order terms (an option, never the default).
      mc_samples: S at meta-training.
      clip: element-wise meta-gradient clip to [-clip, clip]; 0 disables.
      parallel_tasks: tasks of a meta-batch whose graphs may run side by
        side (bounds memory, see ``meta_gradients``); 0 = all.
      adapt_offsets: also adapt the batch-norm offsets β in the inner loop,
        with the same step size (a diagnostic: PyTorch ports of MAML adapt
        batch norm's parameters; the original code only meta-learns β).
        With the model's ``bn_scale``, the scales γ (in the β group) are
        adapted too.
    """

    def __init__(self, model, inner_lr, inner_steps, meta_lr, meta_sgd=False,
                 first_order=False, mc_samples=1, clip=3.0, parallel_tasks=0,
                 adapt_offsets=False):
        super().__init__(name="meta_learner")
        self.parallel_tasks = parallel_tasks
        self.model = model
        self.inner_steps = inner_steps
        self.first_order = first_order
        self.mc_samples = mc_samples
        self.clip = clip
        adapted = model.group("theta")
        if adapt_offsets:
            adapted = {**adapted, **model.group("beta")}
        # The step sizes' keys are the parameters the inner loop adapts.
        if meta_sgd:
            self.inner_lr = {k: tf.Variable(tf.fill(v.shape, tf.constant(inner_lr, v.dtype)),
                                            name="lr/" + k)
                             for k, v in adapted.items()}
        else:
            self.inner_lr = {k: tf.constant(inner_lr, v.dtype)
                             for k, v in adapted.items()}
        self.variables_list = list(model.params().values())
        if meta_sgd:
            self.variables_list += list(self.inner_lr.values())
        # epsilon 1e-8 as in tf.compat.v1.train.AdamOptimizer, the original code's.
        self.optimizer = tf.keras.optimizers.Adam(meta_lr, epsilon=1e-8)
        # Create Adam's slots now, so that the compiled step is traced once.
        self.optimizer.build(self.variables_list)

    def task(self, batch, b, seed, mc_samples):
        """(query loss, query accuracy) of task b of ``batch``, adapted with
        ``mc_samples`` noise samples per inner step; its noise seed is
        fold_in(seed, b)."""
        return task_loss(
            self.model, self.model.params(), self.inner_lr,
            batch["support_x"][b], batch["support_y"][b],
            batch["query_x"][b], batch["query_y"][b],
            self.inner_steps, mc_samples,
            tf.random.experimental.stateless_fold_in(seed, b), self.first_order)

    def meta_loss(self, batch, seed, mc_samples=None):
        """Mean query loss and accuracy over a meta-batch.

        Args:
          batch: dict with support_x [B, Ns, H, W, C], support_y int [B, Ns],
            query_x [B, Nq, H, W, C], query_y int [B, Nq] (B static).
          seed: int [2] noise seed.
          mc_samples: S for the inner loop (default: the training S).
        Returns:
          (scalar loss, [B] per-task accuracies).
        """
        mc = self.mc_samples if mc_samples is None else mc_samples
        losses, accs = zip(*[self.task(batch, b, seed, mc)
                             for b in range(batch["support_x"].shape[0])])
        return tf.add_n(list(losses)) / len(losses), tf.stack(accs)

    def meta_gradients(self, batch, seed):
        """(mean loss, [B] accuracies, gradients aligned with ``variables_list``)
        of the meta-loss ``meta_loss(batch, seed)``.

        Each task's gradient comes from its own tape, and task b starts only
        once the gradient of task b - ``parallel_tasks`` is done: the
        second-order graph keeps every inner step's activations until the
        backward pass, so this bounds the memory by ``parallel_tasks`` tasks
        instead of the whole meta-batch.  Parameters without a path to the
        meta-loss (the head's φ under first order) get zeros, not None.
        """
        num_tasks = batch["support_x"].shape[0]
        losses, accs, grads = [], [], []
        for b in range(num_tasks):
            wait = self.parallel_tasks and b >= self.parallel_tasks
            with tf.control_dependencies(grads[b - self.parallel_tasks] if wait else []):
                with tf.GradientTape() as tape:
                    loss, acc = self.task(batch, b, seed, self.mc_samples)
                grads.append(tape.gradient(
                    loss, self.variables_list,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO))
            losses.append(loss)
            accs.append(acc)
        mean_grads = [tf.add_n(list(g)) / num_tasks for g in zip(*grads)]
        return tf.add_n(losses) / num_tasks, tf.stack(accs), mean_grads

    @tf.function
    def train_step(self, batch, seed):
        """One meta-iteration; returns a dict of scalar metrics."""
        loss, accs, grads = self.meta_gradients(batch, seed)
        grad_norm = tf.linalg.global_norm(grads)
        if self.clip:
            grads = [tf.clip_by_value(g, -self.clip, self.clip) for g in grads]
        self.optimizer.apply_gradients(zip(grads, self.variables_list))
        return {"loss": loss, "accuracy": tf.reduce_mean(accs),
                "grad_norm": grad_norm}

    @tf.function
    def eval_step(self, batch, seed, mc_samples):
        """Per-episode query accuracies [B] after adaptation with
        ``mc_samples`` (Python int) noise samples per inner step."""
        _, accs = self.meta_loss(batch, seed, mc_samples)
        return accs
