"""Training you can trust: DDP, resume and evaluation give the answer of one clean process, and bad input or
a fault gives a clear error early (or a counted skip), never a silent wrong result. One test per defect of
the issue that asked for it; most run train.py as a user does (train.main or the command line)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import test_data
import train
import u2a

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--data", "synthetic", "--limit", "64", "--batch-size", "16", "--workers", "0", "--warmup-epochs", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def trained_tensors(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, cwd=ROOT, timeout=240):
    """train.py under torchrun with 2 gloo processes; a hang fails the test instead of the suite."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "train.py"), *args]
    done = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def one_process(args, cwd=ROOT):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def assert_same_weights(a, b, atol=1e-6):
    a, b = trained_tensors(a), trained_tensors(b)
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"max parameter difference {worst:.2e}"


# -----------------------------------------------------------------------------
# 1. Every epoch has the same, known number of steps on every process

@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_process_has_n_over_b_steps_of_b_over_w_samples(world):
    for n in (5, 8, 13, 32, 33, 34, 63, 64, 65, 101):
        for batch in (b for b in (1, 2, 4, 8, 16, 32) if b % world == 0 and b <= n):
            per_rank = [data.EpochSampler(n, batch, 0, 3, (r, world)).indices for r in range(world)]
            one = data.EpochSampler(n, batch, 0, 3).indices
            share = batch // world
            assert all(len(ix) == (n // batch) * share for ix in per_rank), (n, batch, world)
            for step in range(n // batch):  # the processes' shares of a step are one process's batch
                merged = sorted(i for ix in per_rank for i in ix[step * share:(step + 1) * share])
                assert merged == sorted(one[step * batch:(step + 1) * batch])
            resumed = data.EpochSampler(n, batch, 0, 3, (world - 1, world), skip=1).indices
            assert resumed == per_rank[-1][share:]


def test_ddp_finishes_when_the_last_batch_is_smaller_than_the_processes(tmp_path):
    # 33 % 32 = 1 < 2 processes: the run used to revalidate forever at the barrier. Also: no --out, so the
    # processes must agree on one timestamped run folder (chosen on rank 0).
    torchrun(["--data", "synthetic", "--limit", "33", "--batch-size", "32", "--epochs", "1", "--warmup-epochs", "0",
              "--method", "u2a", "--workers", "0"], cwd=tmp_path, timeout=180)
    folders = list((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and (folders[0] / "metrics.json").is_file()
    log = [json.loads(line) for line in (folders[0] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1]  # 33 // 32 = one step


# -----------------------------------------------------------------------------
# 2. DDP == one process with missing modalities (eq. 6 over the global count of complete samples)

def test_ddp_equals_one_process_with_missing_modalities(tmp_path):
    run = ["--data", "synthetic", "--limit", "64", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0",
           "--seed", "1", "--train-missing-rate", "0.6", "--train-missing-type", "both", "--lora-dropout", "0",
           "--method", "u2a", "--workers", "0"]
    one_process(run + ["--out", str(tmp_path / "single")])
    torchrun(run + ["--out", str(tmp_path / "ddp")])
    # the setting is the one asked for: some process's half-batch holds no text at all, another's no image
    table = data.load_missing_table(tmp_path / "single" / "missing_train.json")
    order = torch.tensor(data.EpochSampler(64, 4, 1, 0).indices).view(-1, 2, 2)  # (steps, rank, sample)
    halves = table[order]                                                         # (steps, 2, 2, 2)
    assert (~halves[..., 1]).all(-1).any() and (~halves[..., 0]).all(-1).any()
    assert_same_weights(tmp_path / "single" / "last.safetensors", tmp_path / "ddp" / "last.safetensors", atol=1e-5)
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())["scenarios"]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["scenarios"]
    assert single.keys() == ddp.keys()


def test_the_global_alignment_mean_does_not_depend_on_how_a_batch_is_split():
    torch.manual_seed(0)
    B, D, C = 6, 5, 3
    out = u2a.U2AOutput(torch.randn(B, C), {"a": torch.randn(B, D), "b": torch.randn(B, D)},
                        {"a": torch.randn(B, D), "b": torch.randn(B, D)},
                        torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    whole = u2a.u2a_loss(out, labels)[0]
    halves = [u2a.U2AOutput(out.logits[s], {m: t[s] for m, t in out.cls.items()},
                            {m: t[s] for m, t in out.mt.items()}, out.present[s]) for s in (slice(0, 3), slice(3, 6))]
    summed = sum(u2a.u2a_loss(h, labels[s], n_samples=B, n_complete=3)[0]
                 for h, s in zip(halves, (slice(0, 3), slice(3, 6))))
    assert torch.allclose(whole, summed)
    # the first half holds 1 of the 3 complete samples: its own mean would weigh it 3x in the global mean
    assert torch.allclose(u2a.alignment_loss(halves[0], n_complete=3) * 3, u2a.alignment_loss(halves[0]))


# -----------------------------------------------------------------------------
# 3. Independent random streams: the missing table and epoch 0's order are not the same permutation

def test_training_missing_table_and_first_epoch_order_are_uncorrelated():
    args, _ = train.parse_args(["--data", "synthetic", "--limit", "1000", "--train-missing-rate", "0.7",
                                "--train-missing-type", "text"])
    sets = train.build_splits(args, data.dataset_info(args.data, args.data_root), ("train",))
    text_missing = (~sets["train"].present[:, 1]).float()
    order = data.EpochSampler(len(text_missing), args.batch_size, args.seed, 0).indices
    first, last = text_missing[order[:300]].mean().item(), text_missing[order[-300:]].mean().item()
    assert abs(first - 0.7) < 0.1 and abs(last - 0.7) < 0.1, (first, last)
    streams = [data.stream_seed(0, "missing/train"), data.stream_seed(0, "missing/val"),
               data.stream_seed(0, "sampler", 0), data.stream_seed(1, "sampler", 0), data.stream_seed(0, "sampler", 1),
               data.stream_seed(0, "lora_dropout", 0, 0), data.stream_seed(0, "lora_dropout", 1, 0)]
    assert len(set(streams)) == len(streams)


# -----------------------------------------------------------------------------
# 4 and 19. --eval-only: the checkpoint alone rebuilds the model; wrong data is refused

def test_eval_only_reproduces_a_run_from_its_folder_alone(tmp_path, capsys):
    out = tmp_path / "run"
    trained = train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--rank", "2", "--alpha", "8",
                                  "--out", str(out)])["u2a"]
    capsys.readouterr()
    again = train.main(["--eval-only", str(out)])["u2a"]  # no other flag: rank, alpha, data come from the file
    assert again["scenarios"] == trained["scenarios"]
    assert "Offline default" not in capsys.readouterr().out  # no training banner
    with pytest.raises(train.UserError, match="trained with --rank 2"):
        train.main(["--eval-only", str(out), "--rank", "4"])


def test_eval_only_of_the_default_run_folder_evaluates_every_method_in_place(tmp_path):
    out = tmp_path / "run"
    trained = train.main(SMALL + ["--epochs", "1", "--method", "u2a", "naive", "--out", str(out)])
    (out / "u2a" / "metrics.json").unlink()
    again = train.main(["--eval-only", str(out)])
    assert set(again) == {"u2a", "naive"}
    for method in ("u2a", "naive"):
        assert again[method]["scenarios"] == trained[method]["scenarios"]
    assert (out / "u2a" / "metrics.json").is_file()  # written into the run folder it evaluates
    assert set(train.main(["--eval-only", str(out), "--method", "naive"])) == {"naive"}  # --method picks


def test_eval_only_refuses_data_whose_classes_differ(tmp_path, published_weights):
    root = test_data.make_food101(tmp_path / "food")
    out = tmp_path / "run"
    train.main(["--data", "food101", "--data-root", str(root), "--weights", str(published_weights), "--out", str(out),
                "--epochs", "1", "--batch-size", "2", "--workers", "0", "--warmup-epochs", "0"])
    renamed = shutil.copytree(root, tmp_path / "renamed")
    old = test_data.FOOD_CLASSES[0]
    for split in ("train", "test"):
        (renamed / "images" / split / old).rename(renamed / "images" / split / "zzz_renamed")
        csv = renamed / "texts" / f"{split}_titles.csv"
        csv.write_text(csv.read_text().replace(f",{old}\n", ",zzz_renamed\n").replace(f",{old}\r\n", ",zzz_renamed\r\n"))
    with pytest.raises(train.UserError, match=f"trained on 3 classes \\({old}"):
        train.main(["--eval-only", str(out), "--data-root", str(renamed)])
    mm = test_data.make_mmimdb(tmp_path / "mm")
    with pytest.raises(train.UserError, match="trained on 3 classes"):
        train.main(["--eval-only", str(out), "--data", "mmimdb", "--data-root", str(mm)])


# -----------------------------------------------------------------------------
# 7, 10, 11, 13, 14, 18, 20: the command line

def test_gpu_flag_without_cuda_or_under_torchrun_is_refused(monkeypatch, capsys):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train.parse_args(["--gpu", "0"])
        assert "drop --gpu" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        train.parse_args(["--gpu", "0"])
    assert "torchrun" in capsys.readouterr().err


def test_precision_default_and_choice():
    assert train.parse_args([])[0].precision == "fp32"  # the CPU
    assert train.parse_args(["--precision", "bf16"])[0].precision == "bf16"
    cast = train.autocast_for(torch.device("cpu"), "bf16")
    with cast:
        assert torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((7, 5), "fp32")])
def test_the_default_precision_is_bf16_on_every_gpu_that_computes_it_natively(capability, expected, monkeypatch):
    # Seen: under torchrun the default was fp32 on any GPU (only --gpu asked for bf16), and a T4 or V100
    # (compute capability 7, bf16 emulated) got bf16. The GPU asked about is the one the process will use.
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    assert train.parse_args(["--gpu", "2"])[0].precision == expected
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "3")
    assert train.parse_args([])[0].precision == expected
    assert asked == [2, 3]


def test_a_gpu_index_the_machine_lacks_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit):
        train.parse_args(["--gpu", "1"])
    assert "--gpu 1: this machine has 1 CUDA device (index 0)" in capsys.readouterr().err


def test_threads_are_decided_after_parsing_either_form_of_data(monkeypatch):
    assert train.parse_args(["--data=synthetic"])[0].threads == 1
    assert train.parse_args(["--data=food101"])[0].threads is None
    assert train.parse_args(["--data", "food101"])[0].threads is None


@pytest.mark.parametrize("argv, message", [
    (["--limit", "0"], "--limit must be at least 1"), (["--limit", "-3"], "--limit must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"), (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--epochs", "3", "--warmup-epochs", "3"], "--epochs 3 <= --warmup-epochs 3"),
])
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    assert message in capsys.readouterr().err + str(err.value)


def test_help_shows_the_paper_defaults_per_dataset():
    text = train.make_parser().format_help()
    for expected in ("image-text   lr 0.001, epochs 10, batch 8, warm-up epochs 5",
                     "audio-video  lr 5e-05, epochs 100, batch 4", "weight decay 0.02", "LoRA rank 1", "lambda 0.2"):
        assert expected in text


def test_batch_larger_than_the_training_set_is_an_error(tmp_path):
    with pytest.raises(train.UserError, match="larger than the training set"):
        train.main(["--data", "synthetic", "--limit", "8", "--batch-size", "16", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_missing_data_and_weights_are_reported_together_and_leave_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(train.UserError) as err:
        train.main(["--data", "food101", "--data-root", str(tmp_path / "none"), "--weights", str(tmp_path / "nope")])
    assert "no dataset at --data-root" in str(err.value) and "python weights/download.py" in str(err.value)
    assert not (tmp_path / "runs").exists()
    section = re.search(r"README\.md, '([^']+)'", str(err.value)).group(1)  # the section it sends the user to
    assert re.search(rf"^#+ {re.escape(section)}\b", (ROOT / "README.md").read_text(), re.M), section


@pytest.mark.parametrize("fault", ["no test split file", "class folder missing in test", "empty test split"])
def test_a_broken_test_split_is_found_before_training(fault, tmp_path, published_weights, monkeypatch):
    root = test_data.make_food101(tmp_path / "food")
    if fault == "no test split file":
        (root / "texts" / "test_titles.csv").unlink()
    elif fault == "class folder missing in test":
        shutil.rmtree(root / "images" / "test" / test_data.FOOD_CLASSES[1])
    else:
        (root / "texts" / "test_titles.csv").write_text("")
    trained = []
    monkeypatch.setattr(train, "train_step", lambda *a, **k: trained.append(1))
    with pytest.raises(train.UserError):
        train.main(["--data", "food101", "--data-root", str(root), "--weights", str(published_weights),
                    "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "--warmup-epochs", "0"])
    assert not trained and not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# 9. LoRA dropout: each process draws its own masks, the same ones again after a resume

def test_lora_dropout_masks_differ_across_processes_and_repeat_across_resumes():
    def mask(rank, step):
        train.seed_step(0, rank, step)
        return torch.nn.functional.dropout(torch.ones(1000), 0.1)
    assert not torch.equal(mask(0, 5), mask(1, 5))
    assert torch.equal(mask(1, 5), mask(1, 5)) and not torch.equal(mask(1, 5), mask(1, 6))


# -----------------------------------------------------------------------------
# 15. A non-finite loss stops the run before a NaN checkpoint is written

def nan_loss_from_step_2(monkeypatch):
    """train.py's loss becomes NaN from the second training step on."""
    real, calls = train.u2a_loss, []

    def nan_from_step_2(out, *a, **k):
        loss, task, align = real(out, *a, **k)
        calls.append(1)
        return (loss * float("nan"), task, align) if len(calls) >= 2 else (loss, task, align)
    monkeypatch.setattr(train, "u2a_loss", nan_from_step_2)


def test_a_nan_loss_stops_the_run_without_saving_nan_weights(tmp_path, monkeypatch):
    nan_loss_from_step_2(monkeypatch)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--out", str(tmp_path)])
    assert not (tmp_path / "best.safetensors").exists() and not (tmp_path / "last.safetensors").exists()


def test_a_nan_loss_stops_the_run_before_a_save_every_checkpoint_holds_nan_weights(tmp_path, monkeypatch):
    """--save-every writes last.safetensors between the log steps: the loss is checked before each such write
    too (seen: with --save-every 1 the step after a NaN loss saved NaN weights as the "last good one")."""
    nan_loss_from_step_2(monkeypatch)
    with pytest.raises(FloatingPointError, match="NaN or infinite by step 2"):
        train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--save-every", "1", "--out", str(tmp_path)])
    last = tmp_path / "last.safetensors"  # step 1's, the one before the NaN
    assert last.is_file() and all(torch.isfinite(t).all() for t in trained_tensors(last).values())
    assert u2a.open_checkpoint(last)[1]["step"] == 1


# -----------------------------------------------------------------------------
# 16 and 17. A run folder belongs to one run; --resume continues the run as configured

def test_a_folder_held_by_a_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    import socket
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "lock").write_text(f"{socket.gethostname()} {holder.pid}")
        with pytest.raises(train.UserError, match=f"in use by process {holder.pid}"):
            train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--out", str(tmp_path)])
    finally:
        holder.kill()
        holder.wait()
    train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--out", str(tmp_path)])  # its process is gone
    assert not (tmp_path / "lock").exists() and not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "metrics.json").is_file()


def test_resume_refuses_changed_settings_and_an_empty_folder(tmp_path):
    out = tmp_path / "run"
    train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--out", str(out)])
    config = (out / "config.json").read_text()
    for flag, value in (("--batch-size", "8"), ("--seed", "3"), ("--lr", "0.1"), ("--epochs", "2")):
        with pytest.raises(train.UserError, match=f"{flag} {value} \\(run: "):
            train.main(["--resume", "--out", str(out), flag, value])
    assert (out / "config.json").read_text() == config
    with pytest.raises(train.UserError, match="holds no run to resume"):
        train.main(["--resume", "--out", str(tmp_path / "empty")])


# -----------------------------------------------------------------------------
# The paths only a GPU runs, run here as far as a CPU can: bf16 autocast through train.py's own code path,
# torch.compile on the toy model

def autocast_spies(monkeypatch):
    """What a run computes in: the dtype of each training step's logits, whether its grad scaler is on, and the
    autocast dtype each evaluation encodes under (None: no autocast)."""
    seen = {"logits": [], "scaler": [], "eval": []}
    real_loss, real_step, real_encode = train.u2a_loss, train.train_step, u2a.encode_batches

    def loss(out, *a, **k):
        seen["logits"].append(out.logits.dtype)
        return real_loss(out, *a, **k)

    def step(learner, *a, **k):
        seen["scaler"].append(learner.scaler.is_enabled())
        return real_step(learner, *a, **k)

    def encode(model, batches, device, autocast=None, **k):
        seen["eval"].append(getattr(autocast, "fast_dtype", None))
        return real_encode(model, batches, device, *([] if autocast is None else [autocast]), **k)
    monkeypatch.setattr(train, "u2a_loss", loss)
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(u2a, "encode_batches", encode)
    return seen


def test_a_bf16_autocast_run_trains_and_evaluates_on_the_cpu(tmp_path, monkeypatch):
    seen = autocast_spies(monkeypatch)
    metrics = train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--precision", "bf16", "--out", str(tmp_path)])
    accuracy = [r["accuracy"] for r in metrics["u2a"]["scenarios"].values()]
    assert all(0 <= a <= 100 for a in accuracy)
    assert json.loads((tmp_path / "config.json").read_text())["precision"] == "bf16"
    # under autocast indeed: training's logits are bf16, evaluation encodes under bf16 autocast, no grad scaler
    assert seen["logits"] and set(seen["logits"]) == {torch.bfloat16}
    assert seen["eval"] and set(seen["eval"]) == {torch.bfloat16}
    assert seen["scaler"] and not any(seen["scaler"])


@pytest.mark.slow
def test_compile_trains_the_toy_model(tmp_path):
    metrics = train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--compile", "--out", str(tmp_path)])
    assert metrics["u2a"]["scenarios"]


# -----------------------------------------------------------------------------
# 5, 6, 15: unreadable and non-finite inputs, and exact resume with DataLoader workers

def av_run(root, out, published_weights, *extra):
    return ["--data", "cremad", "--data-root", str(root), "--weights", str(published_weights), "--out", str(out),
            "--batch-size", "2", "--warmup-epochs", "0", *extra]


def test_skip_mode_skips_a_sample_whose_only_modality_does_not_decode(tmp_path, published_weights, capsys):
    root = test_data.make_food101(tmp_path / "food")
    for jpeg in (root / "images" / "train").rglob("*.jpg"):
        test_data.truncate(jpeg)  # every training image has a readable header but does not decode
    metrics = train.main(["--data", "food101", "--data-root", str(root), "--weights", str(published_weights),
                          "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2", "--warmup-epochs",
                          "0", "--workers", "0", "--train-missing-rate", "0.7", "--train-missing-type", "text",
                          "--on-error", "skip"])
    assert metrics["u2a"]["scenarios"]
    printed = capsys.readouterr().out
    assert "unreadable files" in printed and "samples with none left" in printed
    with pytest.raises(RuntimeError, match="cannot read image"):  # raise mode names the file instead
        train.main(["--data", "food101", "--data-root", str(root), "--weights", str(published_weights),
                    "--out", str(tmp_path / "raise"), "--epochs", "1", "--batch-size", "2", "--warmup-epochs", "0",
                    "--workers", "0"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_audio_is_refused_by_name_or_skipped(bad, tmp_path, published_weights, capsys):
    import numpy as np
    import soundfile as sf
    root = test_data.make_cremad(tmp_path / "cremad")
    wav = root / "AudioWAV" / f"{test_data.CREMAD['train'][0][0]}.wav"
    samples = np.zeros(16000, dtype=np.float32)
    samples[100] = bad
    sf.write(wav, samples, 16000, subtype="FLOAT")
    with pytest.raises(RuntimeError, match=wav.name):
        train.main(av_run(root, tmp_path / "raise", published_weights, "--epochs", "1", "--workers", "0"))
    train.main(av_run(root, tmp_path / "skip", published_weights, "--epochs", "1", "--workers", "0",
                      "--on-error", "skip"))
    assert "1 unreadable files" in capsys.readouterr().out
    for name, t in trained_tensors(tmp_path / "skip" / "best.safetensors").items():
        assert torch.isfinite(t).all(), name


def test_resume_with_dataloader_workers_is_exact_on_audio_video(tmp_path, published_weights, monkeypatch):
    root = test_data.make_cremad(tmp_path / "cremad")
    run = lambda out: av_run(root, out, published_weights, "--epochs", "2", "--workers", "2", "--save-every", "1")
    train.main(run(tmp_path / "whole"))
    real, calls = train.train_step, {"n": 0}

    def crash_at_step_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-way through epoch 2 (2 steps per epoch): the workers restart on resume
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(run(tmp_path / "crashed"))
    monkeypatch.setattr(train, "train_step", real)
    train.main(["--resume", "--out", str(tmp_path / "crashed")])
    # Equal to float rounding: whole runs repeat bit for bit with 0 or 2 workers, and a resumed run differs by
    # ~1e-11 (seen here), the same with 0 workers, so it comes from the resumed process, not from the data.
    # Frames or crops drawn per worker (the defect) moved the weights by orders of magnitude more.
    assert_same_weights(tmp_path / "whole" / "last.safetensors", tmp_path / "crashed" / "last.safetensors", atol=1e-8)


# -----------------------------------------------------------------------------
# 8 (--eval-only under torchrun), 10 (fp16 with its grad scaler). 6 (the RNG states): none is saved, every draw
# is keyed (tests/test_train.py, test_resume_after_a_crash_matches_an_uninterrupted_run)

def test_eval_only_under_torchrun_splits_the_test_set_and_equals_one_process(tmp_path):
    out = tmp_path / "run"
    trained = train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--out", str(out)])["u2a"]
    torchrun(["--eval-only", str(out), "--out", str(tmp_path / "ddp")])
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["scenarios"] == trained["scenarios"]
    # the processes' shares, gathered, are the test set once: every sample, none twice (a process encoding the
    # whole set scores each sample twice, which leaves every accuracy as it was)
    assert ddp["test_samples"] == trained["test_samples"] and ddp["test_skipped"] == 0
    one, split = load_file(str(out / "test_tokens.safetensors")), load_file(str(tmp_path / "ddp" / "test_tokens.safetensors"))
    assert one.keys() == split.keys() and torch.equal(split["index"], torch.arange(trained["test_samples"]))
    for k in one:
        assert torch.allclose(one[k].float(), split[k].float(), atol=1e-5), k


def test_an_fp16_run_with_its_grad_scaler_trains_on_the_cpu(tmp_path, monkeypatch):
    seen = autocast_spies(monkeypatch)
    metrics = train.main(SMALL + ["--epochs", "1", "--method", "u2a", "--precision", "fp16", "--out", str(tmp_path)])
    assert all(0 <= r["accuracy"] <= 100 for r in metrics["u2a"]["scenarios"].values())
    assert all(torch.isfinite(t).all() for t in trained_tensors(tmp_path / "best.safetensors").values())
    # fp16 indeed, with the grad scaler on at every step
    assert seen["logits"] and set(seen["logits"]) == {torch.float16}
    assert seen["eval"] and set(seen["eval"]) == {torch.float16}
    assert seen["scaler"] and all(seen["scaler"])
