"""Imported by pytest before any test module: ``bench`` caps the CPU kernels' ISA (bench.numerics)
before a test computes anything, so tests see the numerics that runs and golden files see."""
import bench  # noqa: F401

import pytest  # noqa: E402

from bench.data.synth import corpus as corpus_mod  # noqa: E402


@pytest.fixture(scope="module")
def micro_mimic(tmp_path_factory):
    """A micro synthetic MIMIC-CXR (image-report pairs) for the pretraining tests, once per module."""
    root = tmp_path_factory.mktemp("corpus")
    corpus_mod.generate_corpus(root, "micro", 0, datasets=["mimic-cxr"], workers=1)
    return root / corpus_mod.WRITERS["mimic_cxr"]
