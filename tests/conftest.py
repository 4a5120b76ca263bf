"""Loads ``src`` before any test module imports TensorFlow, so that every
test (and any subprocess a test starts) runs with the environment defaults
that training uses (oneDNN on; see ``src/__init__.py``), whichever test file
pytest collects first."""

import src  # noqa: F401
