r"""
One command that proves the CUDA path: the encoders against transformers on the GPU, and train.py end to end
the ways a user runs it. Each check prints one line, `PASS|FAIL <name>: <figures>`, then comes a verdict line;
the exit code is 0 only if every check passed.

    python tests/gpu_check.py          # on a GPU, full-size encoders: meant to take under 10 min (not yet run)
    python tests/gpu_check.py --cpu    # the same checks on the CPU at small sizes: tests this script (~4 min)
    python tests/gpu_check.py --logs DIR   # also keep each train.py run's output as DIR/<check>.log

The checks, in order (the slowest last, so a run cut short still reports the others):
  train.py --precision  the flag is in train.py --help; every run below passes --precision bf16 (fp32 on the CPU)
  parity fp32 <enc>     ViT-B/16, BERT-base, AST against transformers' CLIPVisionModel, BertModel, ASTModel on the
                        same random full-size weights in the published layouts: max abs diff <= 1e-4
  parity bf16 <enc>     the same under torch.autocast(bf16), measured against the fp32 output (see BF16_FACTOR)
  train.py              python train.py --data food101 --data-root <fixture> --weights <published layouts> --gpu 0
                        --epochs 1 --limit N --precision bf16  ends with metrics.json
  torchrun              the same under torchrun --nproc_per_node 1: init_process_group("nccl") on a GPU
  resume after kill     a --save-every 1 run SIGKILLed once last.safetensors exists, then --resume: metrics.json,
                        compared with the uninterrupted run (equal required on the CPU, where runs are exact)
  train.py --compile    the train.py run with --compile (graph breaks and recompiles counted from TORCH_LOGS)

The data is tests/test_data.py's Food-101 fixture (real JPEGs and title CSVs in the public layout), the weights
tests/checkpoints.py's random encoders saved exactly as the hub files are (save_published_encoders; small ones
with --cpu), all written to a temporary folder and removed at the end. Not collected by pytest (no test_ prefix);
tests/test_gpu_check.py runs its cheapest part on the CPU.

On the lent GPU (the `device` tool; its machine has torch, transformers, peft, safetensors, tokenizers, pillow,
numpy, tqdm, but not soundfile, which data.py reads audio with). Once, here, in the repository root (.whl/ is
git-ignored): soundfile and what it needs, and the transformers and peft that the CPU tests compare against
(the machine's transformers is older):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 transformers==5.23.0 peft==0.21.2

(~16 MB), then call the tool's `run` with carry [".whl"], timeout_s 600 and this command (the logs of
the five train.py runs come back from $OUT):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 tests/gpu_check.py --logs $OUT
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is built from local files: never download
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project's modules

import torch
import transformers
from safetensors.torch import load_file

import checkpoints    # tests/checkpoints.py: random encoders in the published layouts
import test_data      # tests/test_data.py: the Food-101 fixture
import test_encoders  # tests/test_encoders.py: our encoder classes, transformers' reference, example inputs
import train
import u2a

# -----------------------------------------------------------------------------
# Settings

FP32_TOL = 1e-4  # max abs diff, as the full-size parity tests on the CPU (which see 3.8e-6 to 9.1e-6)
# bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3), so any bf16 forward of a 12-block encoder lands
# ~1e-2 of the output's norm away from the fp32 one: transformers' own bf16 run of these random checkpoints is
# 6e-3 (ViT) to 9e-3 (BERT) away on the CPU. A fixed bound that close to the noise would be flaky, so ours is
# held to a multiple of transformers' own error, on the same inputs against the same fp32 output: a real fault
# in a bf16 path (a padding mask that no longer hides keys, a LayerNorm or softmax left in bf16, a lost
# residual) costs far more than twice the rounding of a correct one. NaN fails every comparison.
BF16_FACTOR = 2.0
PARITY = {"vit": "image", "bert": "text", "ast": "audio"}  # encoder -> the modality whose --weights folder has it
PRECISION = {"cuda": "bf16", "cpu": "fp32"}  # what each run asks train.py for (fp32: train.py's CPU default)
FIXTURE_PER_CLASS = (24, 4)  # Food-101 fixture, 3 classes: 72 train (7 go to val), 12 test images and titles
LIMIT = 48                   # --limit: 6 steps of the recipe's batch 8, time enough to be killed mid-run
RUN_TIMEOUT = 480            # seconds for one train.py run; compiling the full-size model takes the longest
POLL = 0.05                  # seconds between looks for the checkpoint that the resume check waits for
TAIL = 15                    # lines of a failed run's output printed under its FAIL line


class Report:
    """Prints each check as one line and remembers the outcome for the verdict."""

    def __init__(self):
        self.failed, self.count = [], 0

    def add(self, name, ok, figures, log=None):
        self.count += 1
        print(f"{'PASS' if ok else 'FAIL'} {name}: {figures}", flush=True)
        if not ok:
            self.failed.append(name)
            if log:  # enough of the run's own output to see why, without the whole log
                print("\n".join(f"    | {line}" for line in log.splitlines()[-TAIL:]), flush=True)

    def verdict(self, seconds):
        if self.failed:
            print(f"VERDICT: FAIL, {len(self.failed)} of {self.count} checks failed ({', '.join(self.failed)}); "
                  f"{seconds:.0f} s", flush=True)
            return 1
        print(f"VERDICT: PASS, all {self.count} checks; {seconds:.0f} s", flush=True)
        return 0


# -----------------------------------------------------------------------------
# Parity of the encoders with transformers, fp32 and bf16 autocast

def relative_error(x, truth):
    return ((x - truth).norm() / truth.norm()).item()


def parity(report, weights, device):
    """Ours and transformers on the checkpoints train.py will read, in fp32 and under bf16 autocast."""
    for kind, modality in PARITY.items():
        directory = weights / u2a.ENCODER_FOLDERS["paper"][modality]
        ours = test_encoders.OURS[kind].from_pretrained(directory, device=device)
        ref = test_encoders.reference(kind, directory).to(device)  # eager attention: independent of our SDPA
        args, kwargs, valid = test_encoders.example_inputs(ours)
        args = [a.to(device) for a in args]
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        with torch.no_grad():
            truth, ours32 = ref(**kwargs).last_hidden_state, ours(*args)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                ours16, ref16 = ours(*args).float(), ref(**kwargs).last_hidden_state.float()
        if valid is not None:  # BERT: padded query positions are meaningless in both
            valid = valid.to(device)
            truth, ours32, ours16, ref16 = truth[valid], ours32[valid], ours16[valid], ref16[valid]
        shape = "x".join(map(str, truth.shape))
        diff = (ours32 - truth).abs().max().item()
        report.add(f"parity fp32 {kind}", diff <= FP32_TOL,
                   f"max |ours - transformers| {diff:.1e} (tolerance {FP32_TOL:g}), {shape} outputs")
        err, err_ref = relative_error(ours16, truth), relative_error(ref16, truth)
        report.add(f"parity bf16 {kind}", err <= BF16_FACTOR * err_ref,
                   f"|ours_bf16 - fp32| / |fp32| {err:.1e}, transformers' own {err_ref:.1e} "
                   f"(tolerance {BF16_FACTOR:g}x transformers')")
        del ours, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the train.py runs that follow need the memory


# -----------------------------------------------------------------------------
# train.py end to end, as a user types it

def precision_flag(report, help_text, device):
    """The --precision arguments for every run: train.py's own default if it has no such flag yet."""
    if "--precision" in help_text:
        report.add("train.py --precision", True, f"listed in train.py --help; the runs use --precision "
                                                  f"{PRECISION[device.type]}")
        return ["--precision", PRECISION[device.type]]
    report.add("train.py --precision", False, "absent from train.py --help; the runs below use train.py's "
                                              "default (bf16 autocast on CUDA, fp32 on the CPU)")
    return []


def run_train(command, env, log_file):
    """Runs a train.py command from the repository root; returns (returncode, output, seconds)."""
    t0 = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code, output = None, f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {RUN_TIMEOUT} s"
    log_file.write_text(output)
    return code, output, time.perf_counter() - t0


def finished(out, code):
    """(ok, figures) for a run folder: exit code 0 and a metrics.json with the paper's scenarios."""
    if code != 0:
        return False, "timed out" if code is None else f"exit code {code}"
    if not (out / "metrics.json").is_file():
        return False, "exit code 0 but no metrics.json"
    scenarios = json.loads((out / "metrics.json").read_text())["scenarios"]
    complete = scenarios["image 100% + text 100%"]["accuracy"]
    step = u2a.open_checkpoint(out / "last.safetensors")[1]["step"]
    return True, f"metrics.json, {len(scenarios)} scenarios, {step} steps, test accuracy {complete:.1f}% (complete)"


def trained_tensors(out):
    return {k: v for k, v in load_file(str(out / "last.safetensors")).items() if k.startswith("model.")}


def same_run(a, b):
    """(same, max abs diff of the trained tensors) of two run folders."""
    ta, tb = trained_tensors(a), trained_tensors(b)
    diff = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta) if ta.keys() == tb.keys() \
        else float("inf")
    scenarios = [json.loads((x / "metrics.json").read_text())["scenarios"] for x in (a, b)]
    return diff == 0 and scenarios[0] == scenarios[1], diff


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_checks(report, data_root, weights, work, logs, device, precision):
    base = ["train.py", "--data", "food101", "--data-root", str(data_root), "--weights", str(weights),
            "--epochs", "1", "--warmup-epochs", "0", "--limit", str(LIMIT), *precision]
    # On the CPU, DataLoader worker processes only add start-up time to these few batches.
    single = [sys.executable, *base, *(["--gpu", "0"] if device.type == "cuda" else ["--workers", "0"])]
    env = {**os.environ, "TQDM_DISABLE": "1"}

    plain = work / "train"
    code, output, seconds = run_train(single + ["--out", str(plain)], env, logs / "train.log")
    ok, figures = finished(plain, code)
    report.add("train.py", ok, f"{figures}; {seconds:.0f} s", output)

    # torchrun's process: train.py picks NCCL when CUDA is there, gloo otherwise. With one process it does no
    # collective, so the evidence is ProcessGroupNCCL's own start-up line, logged at the C++ INFO level.
    out = work / "torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *base, "--out", str(out),
               *([] if device.type == "cuda" else ["--workers", "0"])]
    code, output, seconds = run_train(command, {**env, "TORCH_CPP_LOG_LEVEL": "INFO"}, logs / "torchrun.log")
    ok, figures = finished(out, code)
    if device.type == "cuda":
        nccl = re.search(r"NCCL version:? ([\w.+]+)", output)
        ok = ok and "ProcessGroupNCCL" in output
        backend = f"NCCL {nccl.group(1) if nccl else ''} (ProcessGroupNCCL logged)" if "ProcessGroupNCCL" in output \
            else "no ProcessGroupNCCL line in the log: NCCL not shown"
    else:
        backend = "gloo (train.py's choice without CUDA)"
    report.add("torchrun", ok, f"{backend}; {figures}; {seconds:.0f} s", output)

    resume_after_kill(report, single, env, work / "killed", plain, logs, exact=device.type == "cpu")

    out = work / "compiled"
    code, output, seconds = run_train(single + ["--compile", "--out", str(out)],
                                      {**env, "TORCH_LOGS": "graph_breaks,recompiles"}, logs / "compile.log")
    ok, figures = finished(out, code)
    breaks = len(re.findall(r"\[__graph_breaks\] Graph break", output))
    recompiles = len(re.findall(r"\[__recompiles\] Recompiling", output))
    report.add("train.py --compile", ok, f"{figures}; {breaks} graph breaks, {recompiles} recompiles logged; "
                                         f"{seconds:.0f} s (compiling included)", output)


def resume_after_kill(report, single, env, out, uninterrupted, logs, exact):
    """SIGKILL a run as soon as its first resumable checkpoint exists, resume it, compare with `uninterrupted`;
    exact: require the same metrics and trained tensors. On the CPU every run is exact (tests/test_train.py
    checks resume bit for bit); on a GPU, kernels that accumulate with atomics may round differently from run
    to run, so there the comparison is a figure."""
    last = out / "last.safetensors"
    with open(logs / "killed.log", "w") as log:
        # A session of its own, so that the kill reaches the DataLoader's worker processes too.
        proc = subprocess.Popen(single + ["--out", str(out), "--save-every", "1"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.perf_counter() + RUN_TIMEOUT
        while proc.poll() is None and not last.is_file() and time.perf_counter() < deadline:
            time.sleep(POLL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if not last.is_file() or (out / "metrics.json").is_file():
        report.add("resume after kill", False, "the run ended before it could be killed mid-way (exit code "
                                               f"{proc.returncode}); a larger LIMIT would give it more steps",
                   (logs / "killed.log").read_text())
        return
    killed_at = u2a.open_checkpoint(last)[1]["step"]
    code, output, seconds = run_train(single + ["--out", str(out), "--save-every", "1", "--resume"], env,
                                      logs / "resume.log")
    ok, figures = finished(out, code)
    ok = ok and re.search(rf"resumed \S+ at step {killed_at}\b", output) is not None  # train.py's own line
    if ok:
        same, diff = same_run(out, uninterrupted)
        ok = same or not exact
        figures += f"; vs the uninterrupted run: {'same' if same else 'different'} metrics, trained tensors " \
                   f"max |diff| {diff:.1e}"
    report.add("resume after kill", ok, f"killed (SIGKILL) at step {killed_at}, resumed: {figures}; "
                                        f"{seconds:.0f} s", output)


# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU at small sizes (tests this script)")
    p.add_argument("--logs", type=Path, help="folder to keep each train.py run's output in, as <check>.log")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        p.error("no GPU visible to torch: on a machine without one, --cpu runs the dry run")
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)  # CUDA_VISIBLE_DEVICES picks another
    if device.type == "cuda":
        # fp32 means IEEE fp32 here: cuDNN would otherwise run the patch convolutions in TF32 (10-bit mantissa).
        # The bf16 checks and train.py's runs are unaffected: autocast sends the convolutions to bf16 anyway.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{'small' if args.cpu else 'full-size'} encoders", flush=True)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="u2a-gpu-check-") as tmp:
        work = Path(tmp)
        logs = args.logs or work
        logs.mkdir(parents=True, exist_ok=True)
        help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                                   text=True).stdout
        precision = precision_flag(report, help_text, device)
        words = ["best", "recipe"] + [w for c in test_data.FOOD_CLASSES for w in c.split("_")]
        save = checkpoints.save_run_encoders if args.cpu else checkpoints.save_published_encoders
        weights = Path(save(work / "weights", u2a.ENCODER_FOLDERS["paper"], words))
        parity(report, weights, device)
        data_root = test_data.make_food101(work / "food101", per_class=FIXTURE_PER_CLASS)
        train_checks(report, data_root, weights, work, logs, device, precision)
    return report.verdict(time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
