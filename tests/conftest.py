"""Loads ``src`` before any test module imports TensorFlow, so that every
test (and any subprocess a test starts) runs with the environment defaults
that training uses (oneDNN on; see ``src/__init__.py``), whichever test file
pytest collects first; and holds ``real_out``, the real Omniglot prepared
once per module, for the data-preparation and the slow accuracy tests."""

import time
from pathlib import Path

import pytest

import src  # noqa: F401
from data_prep import omniglot

REAL_OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


@pytest.fixture(scope="module")
def real_out(tmp_path_factory):
    """(archives folder, prepared folder): the real Omniglot archives in
    ../shared/data/omniglot prepared into a temporary folder, once per test
    module; skips where the archives are absent (a user's clone)."""
    if not all((REAL_OMNIGLOT / a).is_file() for a in omniglot.ARCHIVES):
        pytest.skip("real Omniglot archives not found in {} (only on the development "
                    "machine)".format(REAL_OMNIGLOT))
    out = tmp_path_factory.mktemp("omniglot_real")
    start = time.time()
    assert omniglot.prepare(str(REAL_OMNIGLOT), str(out)) == "prepared"
    print("full Omniglot preparation: {:.1f} s".format(time.time() - start))
    return REAL_OMNIGLOT, out
