"""
The teaching notebooks run top to bottom without an error, as a student would run them, from notebooks/ as
the working directory (where Jupyter starts a notebook's kernel):
  - by default (no U2A_RUN): synthetic data and the toy encoders; 03 trains with `python train.py`;
  - pointed at a train.py run folder of a real dataset layout: a tiny fake MM-IMDb (multi-label, F1) trained for
    one epoch with small random encoders saved in the paper's checkpoint layouts by transformers.
They are committed executed (outputs of a clean run of the synthetic default, made by
`python notebooks/execute.py --write`), so that a reader sees them without running them: every code cell ran,
in order, without an error, and no output names a folder of the machine that ran it. None of them (nor
notebooks/helpers.py) imports train.py.

Each notebook runs in a fresh kernel of this interpreter (notebooks/execute.py: a kernelspec written into a
temporary folder, so that whatever `python3` kernels the machine has installed elsewhere are never picked).
"""
import getpass
import importlib.util
import json
import re
import tempfile
from pathlib import Path

import nbformat
import pytest
from PIL import Image

import train
import u2a

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# notebooks/execute.py (the refresh command) runs the notebooks; the tests run them with the same function
_spec = importlib.util.spec_from_file_location("notebook_execute", NOTEBOOKS / "execute.py")
notebook_execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebook_execute)
NAMES = notebook_execute.NAMES
PLOTS = {"01_pipeline.ipynb": 3, "02_lora.ipynb": 3, "03_missing_modalities.ipynb": 7}  # figures each one draws


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """A folder holding one kernelspec, `python3`, that starts ipykernel with this very interpreter."""
    return notebook_execute.write_kernelspec(tmp_path_factory.mktemp("kernels"))


def execute(name, kernels, tmp, run=None):
    """Run every cell of notebooks/<name> in a fresh kernel; any cell error raises CellExecutionError.
    The kernel's temporary files (03's run folders) go to `tmp`, which pytest cleans up."""
    return notebook_execute.execute(name, kernels, tmp, run)


def text_of(nb):
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def figures(nb):
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


def kinds(cell):
    """What a code cell showed: printed text and/or figures (warnings on stderr aside)."""
    shown = set()
    for out in cell.outputs:
        if out.output_type == "stream" and out.name == "stdout" or "text/plain" in out.get("data", {}):
            shown.add("text")
        if "image/png" in out.get("data", {}):
            shown.add("figure")
    return shown


def readable(nb):
    """Every text the notebook holds, decoded (a backslash is one character): metadata, sources and outputs,
    less the figures' base64, where a short path could appear by chance."""
    parts = [json.dumps(nb.metadata)]
    for cell in nb.cells:
        parts += [json.dumps(cell.metadata), cell.source]
        for out in cell.get("outputs", []):
            parts += [out.get("text", ""), out.get("evalue", ""), *out.get("traceback", [])]
            parts += [value for kind, value in out.get("data", {}).items() if kind != "image/png"]
    return "\n".join(part if isinstance(part, str) else "".join(part) for part in parts)


def machine_paths():
    """Strings that would tie a saved output to one machine: this checkout, the temporary and home folders,
    the user's name as a folder, and the usual roots of home and scratch folders."""
    user = getpass.getuser()
    found = {str(ROOT), str(Path(tempfile.gettempdir()).resolve()), str(Path.home())}
    found = {path for path in found if len(Path(path).parts) > 1}  # a home of "/" would match every path
    return sorted(found | {f"/{user}/", f"\\{user}\\", "/tmp/", "/home/", "/Users/", "/work/", "/root/", "C:\\Users"})


# -----------------------------------------------------------------------------
# As committed: executed by a clean run, without machine-specific paths

@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_executed(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and code[0].source.startswith("#"), "cell 1: a comment, then the imports and the seed"
    assert nb.cells[0].cell_type == "markdown" and "Runtime" in nb.cells[0].source
    assert all(cell.source.lstrip().startswith("#") for cell in code), "every code cell opens with a comment"
    assert not any(re.search(r"\bimport train\b|(?<![\w.])train\.(?!py)", cell.source) for cell in code), \
        "notebooks import only the library modules: train.py is the command line"
    refresh = "refresh it with `python notebooks/execute.py --write " + name + "`"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), \
        f"{name}: its code cells did not all run once, top to bottom, in one kernel: {refresh}"
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{name} was saved with an error ({errors[0].ename}: {errors[0].evalue}): {refresh}"
    out = text_of(nb)
    assert f"{name.split('.')[0]} OK" in out and "synthetic" in out, f"{name}: saved from another run: {refresh}"
    assert figures(nb) >= PLOTS[name]
    saved = readable(nb)
    leaks = [path for path in machine_paths() if path in saved]
    assert not leaks, f"{name} names folders of the machine that ran it ({leaks}): print them relative, then {refresh}"


@pytest.mark.parametrize("spoil, message", [("unexecuted", "did not all run once"), ("error", "saved with an error"),
                                            ("path", "names folders of the machine")])
def test_the_committed_check_catches_a_spoilt_notebook(spoil, message, tmp_path, monkeypatch):
    """The check above can fail: a notebook saved unexecuted, with an error, or printing a local folder."""
    nb = nbformat.read(NOTEBOOKS / NAMES[1], as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    if spoil == "unexecuted":
        for cell in code:
            cell.outputs, cell.execution_count = [], None
    if spoil == "error":
        code[-1].outputs.append(nbformat.v4.new_output("error", ename="RuntimeError", evalue="boom", traceback=[]))
    if spoil == "path":
        code[0].outputs.append(nbformat.v4.new_output("stream", name="stdout", text=f"run {ROOT / 'runs' / 'a'}\n"))
    monkeypatch.setitem(globals(), "NOTEBOOKS", tmp_path)
    nbformat.write(nb, tmp_path / NAMES[1])
    with pytest.raises(AssertionError, match=message):
        test_notebook_is_committed_executed(NAMES[1])


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
    # the committed outputs are this notebook's: every cell that prints or draws now did so when saved
    committed = [cell for cell in nbformat.read(NOTEBOOKS / name, as_version=4).cells if cell.cell_type == "code"]
    fresh = [cell for cell in nb.cells if cell.cell_type == "code"]
    stale = [i + 1 for i, (now, saved) in enumerate(zip(fresh, committed)) if not kinds(now) <= kinds(saved)]
    assert not stale, f"{name}: code cells {stale} show outputs the committed file lacks: " \
                      f"refresh it with `python notebooks/execute.py --write {name}`"
    assert not [path for path in machine_paths() if path in readable(nb)], "a fresh run prints a machine path"


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
    checkpoints.save_run_encoders(tmp / "weights", u2a.ENCODER_FOLDERS["paper"], WORDS)
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
