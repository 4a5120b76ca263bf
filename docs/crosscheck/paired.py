"""maml_torch.py's test accuracies against a TensorFlow run's, episode by episode.

  .venv/bin/python docs/crosscheck/paired.py runs/torch_maml_s0/test_accuracies-2000.json \\
      runs/omniglot_1shot_maml_zen4_s23    # or runs/X/results.ckpt-500.json
  .venv/bin/python docs/crosscheck/paired.py runs/torch_metadrop_s0/test_accuracies-1000.json \\
      runs/torch_maml_s0/test_accuracies-1000.json    # two PyTorch runs

Both must hold the fixed test episodes of test_seed 1000 on the same
data/omniglot arrays (the shorter list is compared with the same number of
the other's first episodes). Prints each model's accuracy and the first
minus the second, mean ± 1.96·std/√n in points (as src.report).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from src import records  # noqa: E402
from src.report import results_path, summarize  # noqa: E402


def tf_accuracies(run):
    """Per-episode accuracies (fractions) of a TensorFlow run's test record."""
    workdir, path = results_path(run)
    results = json.load(open(path))
    if results["config"]["test_seed"] != 1000 or results["config"]["way"] != 20:
        sys.exit(f"error: {path} was not tested on maml_torch.py's episodes")
    return records.load(workdir, records.record_key(
        results["config"], results["checkpoint"], results.get("data")))


def main(torch_file, other):
    torch_accs = np.asarray(json.load(open(torch_file))) / 100  # maml_torch.py writes percent
    if other.endswith(".json") and isinstance(json.load(open(other)), list):
        name, other_accs = "PyTorch (second file)", np.asarray(json.load(open(other))) / 100
    else:
        name, other_accs = "TensorFlow", tf_accuracies(other)
    n = min(len(torch_accs), len(other_accs))
    diff = torch_accs[:n] - other_accs[:n]
    print("PyTorch {:.2f} ± {:.2f}, {} {:.2f} ± {:.2f}".format(
        *summarize(torch_accs[:n]), name, *summarize(other_accs[:n])))
    print("PyTorch minus {} on the same {} episodes: {:+.2f} ± {:.2f} points "
          "(ahead on {}, behind on {}, level on {})".format(
              name, n, *summarize(diff), (diff > 0).sum(), (diff < 0).sum(), (diff == 0).sum()))


if __name__ == "__main__":
    main(*sys.argv[1:])
