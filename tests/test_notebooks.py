"""
The teaching notebooks run top to bottom without an error, as a student would run them, from notebooks/ as
the working directory (where Jupyter starts a notebook's kernel):
  - by default (no U2A_RUN): synthetic data and the toy encoders; 03 trains with `python train.py`;
  - pointed at a train.py run folder of a real dataset layout: a tiny fake MM-IMDb (multi-label, F1) trained for
    one epoch with small random encoders saved in the paper's checkpoint layouts by transformers.
They are committed without outputs, and none of them (nor notebooks/helpers.py) imports train.py.

Each notebook runs in a fresh kernel of this interpreter: a kernelspec written into a temporary folder, so
that whatever `python3` kernels the machine has installed elsewhere are never picked.
"""
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from PIL import Image

import train

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_pipeline.ipynb", "02_lora.ipynb", "03_missing_modalities.ipynb"]
# seconds. The longest cell trains U2A and the naive baseline (03): ~12 s on 2 idle cores, but several minutes
# when other processes compete for the same cores, so the limit only catches a cell that hangs.
CELL_TIMEOUT = 600
PLOTS = {"01_pipeline.ipynb": 3, "02_lora.ipynb": 3, "03_missing_modalities.ipynb": 7}  # figures each one draws


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """A folder holding one kernelspec, `python3`, that starts ipykernel with this very interpreter."""
    folder = tmp_path_factory.mktemp("kernels")
    (folder / "python3").mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (u2a tests)", "language": "python"}
    (folder / "python3" / "kernel.json").write_text(json.dumps(spec))
    return folder


def execute(name, kernels, tmp, run=None):
    """Run every cell of notebooks/<name> in a fresh kernel; any cell error raises CellExecutionError.
    The kernel's temporary files (03's run folder) go to `tmp`, which pytest cleans up."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    env = {k: v for k, v in os.environ.items() if k != "U2A_RUN"}
    env["TMPDIR"] = str(tmp)
    if run is not None:
        env["U2A_RUN"] = str(run)
    NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(env=env)
    return nb


def text_of(nb):
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def figures(nb):
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


# -----------------------------------------------------------------------------
# As committed

@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and code[0].source.startswith("#"), "cell 1: a comment, then the imports and the seed"
    assert nb.cells[0].cell_type == "markdown" and "Runtime" in nb.cells[0].source
    assert all(not cell.outputs and cell.execution_count is None for cell in code), \
        f"{name} has outputs: clear them before committing"
    assert all(cell.source.lstrip().startswith("#") for cell in code), "every code cell opens with a comment"
    assert not any(re.search(r"\bimport train\b|(?<![\w.])train\.(?!py)", cell.source) for cell in code), \
        "notebooks import only the library modules: train.py is the command line"


def test_helpers_import_only_the_library():
    imported = {line.split()[1] for line in (NOTEBOOKS / "helpers.py").read_text().splitlines()
                if line.startswith(("import ", "from "))}
    assert "train" not in imported and {"data", "u2a"} <= imported


# -----------------------------------------------------------------------------
# The default: synthetic data, toy encoders, no U2A_RUN

@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_clean_on_the_synthetic_default(name, kernels, tmp_path):
    nb = execute(name, kernels, tmp=tmp_path)
    out = text_of(nb)
    assert f"{name.split('.')[0]} OK" in out, "the final cell prints its check"
    assert "synthetic" in out
    assert figures(nb) >= PLOTS[name]


# -----------------------------------------------------------------------------
# A run folder of a real dataset layout: a fake MM-IMDb and small random encoders in the published layouts

GENRES = [["Drama", "Comedy"], ["Horror"], ["Drama", "Romance"], ["Action", "Thriller"], ["Comedy"],
          ["Documentary"], ["Horror", "Thriller"], ["Animation", "Family"], ["Drama"], ["Sci-Fi", "Action"]]
SPLITS = {"train": range(0, 5), "dev": range(5, 7), "test": range(7, 10)}
WORDS = ["a", "the", "film", "about", "love", "war", "ghost", "city", "family", "robot", "space", "killer"]


def make_mmimdb(root):
    """The MM-IMDb archive layout that data.py reads: split.json, dataset/<id>.jpeg and dataset/<id>.json."""
    (root / "dataset").mkdir(parents=True)
    for i, genres in enumerate(GENRES):
        colour = (40 * i % 255, 90, 200 - 15 * i)
        Image.new("RGB", (60 + 3 * i, 90), colour).save(root / "dataset" / f"{i:04d}.jpeg")
        plot = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8))
        (root / "dataset" / f"{i:04d}.json").write_text(json.dumps({"genres": genres, "plot": [plot]}))
    (root / "split.json").write_text(json.dumps({s: [f"{i:04d}" for i in r] for s, r in SPLITS.items()}))
    return root


@pytest.fixture(scope="module")
def mmimdb_run(tmp_path_factory):
    """A train.py run folder on the fake MM-IMDb: U2A and the naive baseline, one epoch each."""
    pytest.importorskip("transformers")
    import checkpoints  # tests/checkpoints.py: needs transformers, a test-only dependency
    tmp = tmp_path_factory.mktemp("mmimdb")
    checkpoints.save_run_encoders(tmp / "weights", train.ENCODER_FOLDERS, WORDS)
    run = tmp / "run"
    train.main(["--data", "mmimdb", "--data-root", str(make_mmimdb(tmp / "data")), "--weights", str(tmp / "weights"),
                "--out", str(run), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "2", "--workers", "0",
                "--method", "naive", "u2a"])
    return run


def test_notebooks_read_a_run_folder_of_a_real_dataset(mmimdb_run, kernels, tmp_path):
    for name in NAMES:
        nb = execute(name, kernels, tmp=tmp_path, run=mmimdb_run)
        out = text_of(nb)
        assert f"{name.split('.')[0]} OK" in out and "mmimdb" in out
        assert figures(nb) >= PLOTS[name]
    assert "f1_macro" in out and "reproduce metrics.json's f1_macro" in out  # 03: multi-label scores
