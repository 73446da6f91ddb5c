"""
Runs the teaching notebooks top to bottom in a fresh kernel, as a reader would, and (with --write) saves them
with their outputs, so that they read on GitHub without being run. The committed notebooks are made by:

    python notebooks/execute.py --write

It runs all three by default (a few minutes on 2 CPU cores, mostly 03 training with train.py); name some to
run only those: `python notebooks/execute.py --write 03_missing_modalities.ipynb`. U2A_RUN is ignored: the
committed outputs are those of the synthetic default, which anyone can reproduce offline.

The kernel is this interpreter's (a kernelspec written into a temporary folder, so that whatever `python3`
kernels the machine has installed elsewhere are never picked). Its temporary files (03's run folders) go to
a temporary folder removed afterwards. tests/test_notebooks.py executes the notebooks with the same function.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent
NAMES = ["01_pipeline.ipynb", "02_lora.ipynb", "03_missing_modalities.ipynb"]
# seconds. The longest cell trains four methods (03): a few minutes when other processes share 2 cores, so
# the limit only catches a cell that hangs.
CELL_TIMEOUT = 900
KERNEL_NAME = "python3"


def write_kernelspec(folder):
    """A kernelspec `python3` in `folder` that starts ipykernel with this very interpreter."""
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3", "language": "python"}
    (Path(folder) / KERNEL_NAME).mkdir(parents=True, exist_ok=True)
    (Path(folder) / KERNEL_NAME / "kernel.json").write_text(json.dumps(spec))
    return folder


def execute(name, kernels, tmp, run=None):
    """Run every cell of notebooks/<name> in a fresh kernel from the kernelspec folder `kernels`, with the
    notebook's folder as working directory (where Jupyter starts a kernel); any cell error raises
    nbclient's CellExecutionError. `tmp`: the kernel's TMPDIR. run: a train.py run folder for U2A_RUN.
    Returns the executed notebook (nbformat), outputs in place."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    env = {k: v for k, v in os.environ.items() if k != "U2A_RUN"}
    env.update(TMPDIR=str(tmp), TQDM_DISABLE="1")
    if run is not None:
        env["U2A_RUN"] = str(run)
    # record_timing off: no timestamps in the saved file, so a refresh changes only what the code printed
    NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, record_timing=False,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute(env=env)
    return nb


def coalesce_streams(nb):
    """Join a cell's consecutive prints to one stream (how the kernel splits them depends on timing), so
    that a refresh changes the saved file only where the printed text changed."""
    for cell in nb.cells:
        merged = []
        for out in cell.get("outputs", []):
            if merged and out.output_type == "stream" and merged[-1].output_type == "stream" \
                    and merged[-1].name == out.name:
                merged[-1].text += out.text
            else:
                merged.append(out)
        if cell.cell_type == "code":
            cell.outputs = merged
    return nb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=NAMES, help=f"notebooks to run (default: {' '.join(NAMES)})")
    parser.add_argument("--write", action="store_true", help="save each executed notebook over its file")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in NAMES]
    if unknown:
        parser.error(f"unknown notebook {', '.join(unknown)}: expected some of {', '.join(NAMES)}")
    with tempfile.TemporaryDirectory(prefix="u2a-notebooks-") as tmp:
        kernels = write_kernelspec(Path(tmp) / "kernels")
        for name in args.names:
            t0 = time.time()
            nb = coalesce_streams(execute(name, kernels, tmp))
            nb.metadata.kernelspec = {"display_name": "Python 3", "language": "python", "name": KERNEL_NAME}
            if args.write:
                nbformat.write(nb, NOTEBOOKS / name)
            print(f"{name}: ran clean in {time.time() - t0:.0f} s" + (", saved with its outputs" if args.write else ""))


if __name__ == "__main__":
    main()
