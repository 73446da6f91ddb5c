"""Shared test set-up: the project's modules are imported from the repository root."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest


@pytest.fixture(scope="session")
def published_weights(tmp_path_factory):
    """A --weights folder with all three encoders, small and random, in the folders and file layouts that
    weights/download.py fetches (written by transformers, a test-only dependency)."""
    pytest.importorskip("transformers")
    import checkpoints
    import u2a
    words = ["best", "recipe", "plot", "film"]
    return checkpoints.save_run_encoders(tmp_path_factory.mktemp("weights"), u2a.ENCODER_FOLDERS["paper"], words)
