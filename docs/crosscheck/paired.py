"""maml_torch.py's test accuracies against a TensorFlow run's, episode by episode.

  .venv/bin/python docs/crosscheck/paired.py runs/torch_maml_s0/test_accuracies-2000.json \\
      runs/omniglot_1shot_maml_zen4_s23    # or runs/X/results.ckpt-500.json

Both must hold the 1000 fixed test episodes of test_seed 1000 on the same
data/omniglot arrays. Prints each model's accuracy and the PyTorch run's
minus the TensorFlow run's, mean ± 1.96·std/√n in points (as src.report).
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from src import records  # noqa: E402
from src.report import results_path, summarize  # noqa: E402


def main(torch_file, run):
    torch_accs = np.asarray(json.load(open(torch_file))) / 100  # maml_torch.py writes percent
    workdir, path = results_path(run)
    results = json.load(open(path))
    if results["config"]["test_seed"] != 1000 or results["config"]["way"] != 20:
        sys.exit(f"error: {path} was not tested on maml_torch.py's episodes")
    tf_accs = records.load(workdir, records.record_key(
        results["config"], results["checkpoint"], results.get("data")))
    n = min(len(torch_accs), len(tf_accs))
    diff = torch_accs[:n] - tf_accs[:n]
    print("PyTorch {:.2f} ± {:.2f}, TensorFlow {:.2f} ± {:.2f}".format(
        *summarize(torch_accs[:n]), *summarize(tf_accs[:n])))
    print("PyTorch minus TensorFlow on the same {} episodes: {:+.2f} ± {:.2f} points "
          "(ahead on {}, behind on {}, level on {})".format(
              n, *summarize(diff), (diff > 0).sum(), (diff < 0).sum(), (diff == 0).sum()))


if __name__ == "__main__":
    main(*sys.argv[1:])
