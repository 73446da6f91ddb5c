"""train.py end to end on the synthetic data with the shipped toy encoders (CPU, seconds each): the CLI,
the default's summary table, checkpoints, exact resume after a crash, DDP == one process, the schedule."""
import inspect
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import train
import u2a

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--data", "synthetic", "--limit", "64", "--batch-size", "16", "--workers", "0", "--warmup-epochs", "0"]


def model_tensors(path):
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(("model.", "optim."))}


# -----------------------------------------------------------------------------
# The learning-rate schedule (Table 5): 0.1x for the warm-up epochs, then (1 - progress)^0.9

def test_lr_schedule():
    total, warmup = 100, 20
    assert all(train.lr_factor(s, total, warmup) == 0.1 for s in range(warmup))
    assert train.lr_factor(warmup, total, warmup) == 1.0
    assert train.lr_factor(60, total, warmup) == pytest.approx(0.5 ** 0.9)
    assert train.lr_factor(99, total, warmup) == pytest.approx((1 / 80) ** 0.9)
    assert train.lr_factor(total, total, warmup) == 0.0
    decay = [train.lr_factor(s, total, warmup) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_a_step_whose_every_sample_was_skipped_moves_nothing():
    """Skip mode (--on-error skip): a step left with no readable sample is left out, not taken with zero
    gradients (AdamW would still decay the matrices and move every parameter by its momentum)."""
    args, _ = train.parse_args(SMALL)
    info = data.dataset_info(args.data, args.data_root)
    model = u2a.U2A(train.model_config(args, info, "u2a"))
    learner = train.Learner(model, model, model.configure_optimizer(1e-2, 0.5), torch.amp.GradScaler("cpu", enabled=False))
    ctx = train.Context(0, 1, torch.device("cpu"), info)
    loader = data.make_loader(data.make_dataset("synthetic", None, "train", limit=4), 4, False)
    train.train_step(learner, next(iter(loader)), 1e-2, ctx)  # one real step: AdamW now has momentum
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    empty = data.collate([None, None], info)
    losses = train.train_step(learner, empty, 1e-2, ctx, may_be_empty=True)
    assert losses.tolist() == [0.0, 0.0, 0.0]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_run_steps_at_the_scheduled_lr(tmp_path, monkeypatch):
    """train.py's steps use lr_factor's schedule: 4 steps per epoch, 1 warm-up epoch at 0.1x, then the decay."""
    lrs, real_step = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda learner, batch, lr, *a, **k: lrs.append(lr) or
                        real_step(learner, batch, lr, *a, **k))
    args = ["--data", "synthetic", "--limit", "64", "--batch-size", "16", "--workers", "0", "--warmup-epochs", "1"]
    train.main(args + ["--epochs", "2", "--method", "u2a", "--out", str(tmp_path)])
    lr = train.RECIPES["synthetic"]["lr"]
    assert lrs == pytest.approx([0.1 * lr] * 4 + [lr * (1 - k / 4) ** 0.9 for k in range(4)], rel=1e-12)


def test_paper_defaults_per_dataset():
    food, _ = train.parse_args(["--data", "food101"])
    assert (food.lr, food.epochs, food.batch_size, food.warmup_epochs) == (1e-3, 10, 8, 5)
    assert (food.weight_decay, food.rank, food.alpha, food.lora_dropout, food.lam) == (0.02, 1, 1.0, 0.1, 0.2)
    assert (train.ADAMW_EPS, train.WARMUP_FACTOR, train.POWER) == (1e-8, 0.1, 0.9)  # Table 5, no flag
    assert food.data_root == "data/food101"
    assert set(train.RECIPES) == set(data.DATASETS)  # a recipe row for every dataset
    ks, _ = train.parse_args(["--data", "ks", "--lr", "1e-4"])
    assert (ks.lr, ks.epochs, ks.batch_size) == (1e-4, 100, 4)
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "imagenet"])


# -----------------------------------------------------------------------------
# The CLI: a short run writes everything it promises

def test_cli_smoke_run_writes_the_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train.main(SMALL + ["--epochs", "1", "--out", str(out), "--method", "u2a",
                                  "--train-missing-rate", "0.5", "--train-missing-type", "both"])
    for name in ("config.json", "metrics.json", "best.safetensors", "last.safetensors", "missing_train.json",
                 "missing_val.json", "test_tokens.safetensors"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["scenarios"].keys() == metrics["u2a"]["scenarios"].keys()
    groups = {g for r in saved["scenarios"].values() for g in r["groups"]}
    assert groups == {"complete", "table3", "table4", "table6", "figure2"}
    assert len(saved["mt_cls_mse_per_class"]["image->text"]) == len(data.synthetic_class_names("synthetic"))
    table = data.load_missing_table(out / "missing_train.json")
    assert int((~table).sum()) == 32 and table.any(1).all()  # 50% of 64, none loses both
    recorded = json.loads((out / "missing_train.json").read_text())  # the seed it names draws it again
    assert torch.equal(table, data.missing_table(64, 0.5, "both", recorded["seed"], ("image", "text")))
    scenarios, seed = data.test_scenarios(data.dataset_info("synthetic"), json.loads((out / "config.json").read_text()))
    tables = {json.loads(p.read_text())["scenario"]: data.load_missing_table(p)
              for p in (out / "missing_test").glob("*.json")}
    assert len(tables) == len(scenarios) == len(saved["scenarios"])  # one per scenario, each as it was scored
    for sc in scenarios:
        assert torch.equal(tables[sc.name], sc.table(saved["test_samples"], seed)), sc.name
    printed = capsys.readouterr().out
    assert "Table 4" in printed and "Figure 2" in printed and "toy" in printed.lower()
    # the checkpoint holds only what training changed, plus where the frozen encoders came from
    ckpt = load_file(str(out / "best.safetensors"))
    assert all(k.startswith("model.") for k in ckpt)
    assert any("lora_" in k for k in ckpt) and "model.head.weight" in ckpt
    assert not any(".encoder." in k and "lora_" not in k for k in ckpt)
    # --eval-only reproduces the test numbers from the checkpoint
    again = train.main(SMALL + ["--eval-only", str(out / "best.safetensors"), "--out", str(tmp_path / "eval")])
    assert again["u2a"]["scenarios"] == saved["scenarios"]


def test_default_summary_table_prints_the_four_methods_and_the_bayes_ceiling(tmp_path, capsys):
    metrics = train.main(SMALL + ["--epochs", "1", "--out", str(tmp_path)])  # synthetic: all four by default
    assert list(metrics) == list(u2a.METHODS)
    lines = capsys.readouterr().out.split("== Summary")[1].splitlines()
    header = next(line for line in lines if "image only" in line)
    assert header.split() == ["image", "+", "text", "image", "only", "text", "only"]
    rows = {line.split()[0]: [float(x) for x in line.split()[-3:]] for line in lines
            if line.startswith((*u2a.METHODS, "Bayes"))}
    assert list(rows) == [*u2a.METHODS, "Bayes"]  # naive first, u2a last, then the ceiling
    assert rows["Bayes"] == [round(v, 1) for v in data.bayes_ceiling("synthetic").values()]
    for method, row in rows.items():
        if method != "Bayes":
            assert row == [round(metrics[method]["scenarios"][name]["accuracy"], 1)
                           for name in ("image 100% + text 100%", "image 100% + text 0%", "image 0% + text 100%")]
            assert (tmp_path / method / "metrics.json").is_file()
            assert json.loads((tmp_path / method / "metrics.json").read_text())["method"] == method


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(train.UserError, match=r"model\.safetensors.*make_toy"):
        train.main(SMALL + ["--epochs", "1", "--out", str(tmp_path), "--weights", str(tmp_path / "nope")])


# -----------------------------------------------------------------------------
# Checkpoints: round trip and exact resume

def test_checkpoint_round_trip(tmp_path):
    args, _ = train.parse_args(SMALL)
    info = data.dataset_info(args.data, args.data_root)
    model = u2a.U2A(train.model_config(args, info, "u2a"))
    opt = model.configure_optimizer(args.lr, args.weight_decay, args.token_lr_scale)
    batch = next(iter(data.make_loader(data.make_dataset("synthetic", None, "train", limit=8), 8, False)))
    loss, _, _ = train.u2a_loss(model(batch), batch["label"])
    loss.backward()
    opt.step()
    path = tmp_path / "ckpt.safetensors"
    u2a.save_checkpoint(path, model, {"step": 1, "config": train.vars_json(args)}, opt)
    fresh = u2a.U2A(train.model_config(args, info, "u2a"))
    fresh_opt = fresh.configure_optimizer(args.lr, args.weight_decay, args.token_lr_scale)
    meta = u2a.load_trained(fresh, path, fresh_opt)
    assert meta["step"] == 1
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n
    names = {id(p): n for n, p in model.named_parameters()}
    fresh_params = dict(fresh.named_parameters())
    for p, state in opt.state.items():
        for key, value in state.items():
            assert torch.equal(fresh_opt.state[fresh_params[names[id(p)]]][key].reshape(value.shape), value)
    # the file alone rebuilds the trained model
    rebuilt = u2a.from_checkpoint(path)
    for (n, a), b in zip(model.named_parameters(), rebuilt.parameters()):
        assert torch.equal(a, b), n
    assert rebuilt.config.class_names == info.class_names and rebuilt.config.rank == args.rank
    assert rebuilt.config.text_max_len == info.text_max_len == 16  # predict cuts a text where the run did
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a safetensors checkpoint"):
        u2a.load_trained(fresh, tmp_path / "bad.safetensors")
    naive = u2a.U2A(train.model_config(args, info, "naive"))
    naive.head = torch.nn.Linear(naive.head.in_features, 3)  # a model of another shape
    with pytest.raises(ValueError, match="trained with method u2a"):
        u2a.load_trained(naive, path)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    run = SMALL + ["--epochs", "2", "--method", "u2a", "--save-every", "1"]
    train.main(run + ["--out", str(tmp_path / "whole")])

    real_loss, calls, hour = train.u2a_loss, {"n": 0}, {"offset": 0}

    def crash_at_step_6(*a, **k):
        calls["n"] += 1
        hour["offset"] = 3600 if calls["n"] >= 3 else 0  # the crashed run's clock: an hour passes at step 3
        if calls["n"] == 6:  # mid-way through epoch 2 (4 steps per epoch)
            raise KeyboardInterrupt
        return real_loss(*a, **k)
    monkeypatch.setattr(train, "u2a_loss", crash_at_step_6)
    monkeypatch.setattr(train.time, "time", lambda real=time.time: real() + hour["offset"])
    with pytest.raises(KeyboardInterrupt):
        train.main(run + ["--out", str(tmp_path / "crashed")])
    monkeypatch.undo()
    assert json.loads(_meta(tmp_path / "crashed" / "last.safetensors"))["step"] == 5
    # No RNG state is saved: every draw is keyed by (seed, stream, step), so the global RNGs' state at resume
    # does not matter. Set them to something else than the crashed process left to show it.
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    assert all(k.startswith(("model.", "optim.")) for k in load_file(str(tmp_path / "crashed" / "last.safetensors")))
    train.main(["--out", str(tmp_path / "crashed"), "--resume"])  # every setting comes from the run folder

    whole, resumed = model_tensors(tmp_path / "whole" / "last.safetensors"), \
        model_tensors(tmp_path / "crashed" / "last.safetensors")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    # the run's training time counts the crashed part too (seen: metrics.json said the resumed part alone)
    assert json.loads((tmp_path / "crashed" / "metrics.json").read_text())["train_seconds"] >= 3600


def test_the_best_validation_epoch_is_kept_and_tested(tmp_path, monkeypatch):
    """Model selection on validation: best.safetensors is the epoch with the best validation score (not the
    last), and the test scores are that checkpoint's."""
    scores = iter([50.0, 80.0, 60.0])  # epoch 2 is the best
    monkeypatch.setattr(train, "validate", lambda *a, **k: next(scores))
    tested = []
    real_evaluate = train.evaluate_test
    monkeypatch.setattr(train, "evaluate_test", lambda model, *a, **k: tested.append(
        {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}) or real_evaluate(model, *a, **k))
    train.main(SMALL + ["--epochs", "3", "--method", "u2a", "--out", str(tmp_path)])
    best, last = u2a.open_checkpoint(tmp_path / "best.safetensors")[1], u2a.open_checkpoint(tmp_path / "last.safetensors")[1]
    assert (best["step"], best["best"], last["step"]) == (8, 80.0, 12)  # 4 steps per epoch
    saved = {k[len("model."):]: v for k, v in load_file(str(tmp_path / "best.safetensors")).items()}
    assert len(tested) == 1 and tested[0].keys() == saved.keys()
    assert all(torch.equal(tested[0][n], saved[n]) for n in saved)  # the model tested is the best one
    assert not all(torch.equal(saved[k[len("model."):]], v) for k, v in model_tensors(tmp_path / "last.safetensors").items()
                   if k.startswith("model."))  # which differs from the last


def _meta(path):
    from safetensors import safe_open
    return safe_open(str(path), framework="pt").metadata()["u2a"]


# -----------------------------------------------------------------------------
# DDP: two gloo processes with batch 8 each == one process with batch 16

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_cpu_matches_a_single_process(tmp_path):
    # LoRA dropout off: each process has its own RNG stream, so dropout masks could not match.
    run = SMALL + ["--epochs", "1", "--method", "u2a", "--lora-dropout", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", *run, "--out", str(tmp_path / "single")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "train.py", *run,
                          "--out", str(tmp_path / "ddp")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-4000:]
    single = model_tensors(tmp_path / "single" / "last.safetensors")
    double = model_tensors(tmp_path / "ddp" / "last.safetensors")
    assert single.keys() == double.keys()
    moved = 0
    for k in single:
        if k.startswith("model."):
            assert torch.allclose(single[k], double[k], atol=1e-5, rtol=1e-4), k
            moved += 1
    assert moved > 0


# -----------------------------------------------------------------------------
# Every real dataset, end to end: its public layout (tests/test_data.py's fixtures) and encoders in the
# folders and file layouts that weights/download.py fetches (small random ones, written by transformers)

@pytest.mark.parametrize("name", ["food101", "mmimdb", "cremad", "ks", "ave"])
def test_every_dataset_trains_and_reports_the_paper_scenarios(name, published_weights, tmp_path, capsys):
    import test_data
    root = test_data.MAKERS[name](tmp_path / name)
    out = tmp_path / "run"
    metrics = train.main(["--data", name, "--data-root", str(root), "--weights", str(published_weights),
                          "--out", str(out), "--epochs", "1", "--batch-size", "2", "--workers", "0",
                          "--warmup-epochs", "0"])
    info = data.dataset_info(name, root)
    m1, m2 = info.modalities
    saved = json.loads((out / "metrics.json").read_text())
    scenarios = saved["scenarios"]
    assert set(metrics) == {"u2a"} and metrics["u2a"]["scenarios"] == scenarios
    assert {g for r in scenarios.values() for g in r["groups"]} >= {"complete", "table4", "figure2"}
    metric_names = {"f1_macro", "f1_micro"} if name == "mmimdb" else {"accuracy"}
    for result in scenarios.values():
        assert metric_names <= result.keys() and all(0 <= result[k] <= 100 for k in metric_names)
    assert set(saved["mt_cls_mse_per_class"]) == {f"{m1}->{m2}", f"{m2}->{m1}"}
    config = json.loads((out / "config.json").read_text())
    assert train.RECIPES[name]["lr"] == (5e-5 if "audio" in info.modalities else 1e-3)  # Table 5, per group
    assert config["data"] == name and config["lr"] == train.RECIPES[name]["lr"] and config["weight_decay"] == 0.02
    printed = capsys.readouterr().out
    assert "Table 4" in printed and "toy" not in printed.lower()


# -----------------------------------------------------------------------------
# --method: flags that contradict every chosen method are refused by name, before anything is written

@pytest.mark.parametrize("flags, named", [
    (["--method", "naive", "--modality-dropout", "on"], "--modality-dropout on"),
    (["--method", "u2a", "placeholder-dropout", "--modality-dropout", "off"], "--modality-dropout off"),
    (["--method", "naive", "placeholder-dropout", "--lam", "0.5"], "--lam 0.5"),
    (["--method", "u2a-no-align", "--lam", "1"], "--lam 1"),
    (["--method", "u2a", "--lam", "0"], "u2a-no-align"),
    (["--method", "naive", "--mt-init", "random"], "--mt-init"),
    (["--method", "placeholder-dropout", "--align-stop-grad"], "--align-stop-grad"),
    (["--method", "u2a", "u2a"], "named twice"),
])
def test_a_flag_that_contradicts_the_methods_is_refused(flags, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(SMALL + flags + ["--out", str(tmp_path / "run")])
    assert exit.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_each_method_trains_as_its_table_row_says(tmp_path):
    """Dropout on for every method but naive, lambda only for u2a, tokens at their own learning rate; and the
    recipe's token settings (the toy's: MTs from random, eq. 6's stop-gradient) reach the model and the loss."""
    args, _ = train.parse_args(SMALL)
    seen, groups, passed = {}, {}, {}  # groups: each method's optimizer groups, as parameter names
    real_step, real_loss = train.train_step, train.u2a_loss
    def loss_spy(*a, **k):  # lambda and stop_grad as the step gives them to eq. 7, not as the config says
        given = inspect.signature(real_loss).bind(*a, **k)
        given.apply_defaults()
        passed.update(lam=given.arguments["lam"], stop_grad=given.arguments["stop_grad"])
        return real_loss(*a, **k)
    def spy(learner, batch, lr, ctx, may_be_empty=False):
        losses = real_step(learner, batch, lr, ctx, may_be_empty)
        config = learner.model.config
        seen.setdefault(config.method, []).append((batch["present"].all().item(), passed.pop("lam"),
                                                   [g["lr"] / lr for g in learner.optimizer.param_groups]))
        stop_grads.setdefault(config.method, set()).add(passed.pop("stop_grad"))
        mt_inits.setdefault(config.method, set()).add(config.mt_init)
        names = {id(p): n for n, p in learner.model.named_parameters()}
        groups.setdefault(config.method, [sorted(names[id(p)] for p in g["params"])
                                          for g in learner.optimizer.param_groups])
        return losses
    stop_grads, mt_inits = {}, {}
    train.train_step, train.u2a_loss = spy, loss_spy
    try:
        train.main(SMALL + ["--epochs", "2", "--out", str(tmp_path)])
    finally:
        train.train_step, train.u2a_loss = real_step, real_loss
    assert stop_grads["u2a"] == {args.align_stop_grad} == {True}  # the toy recipe's eq. 6 stop-gradient
    assert mt_inits["u2a"] == {args.mt_init} == {"random"}
    assert list(seen) == list(u2a.METHODS)  # the toy default trains all four: none escapes the checks below
    for method, steps in seen.items():
        dropped_some = not all(complete for complete, _, _ in steps)
        assert dropped_some == u2a.METHODS[method].dropout, method
        assert {w for _, w, _ in steps} == {args.lam if u2a.METHODS[method].align else 0.0}
        assert steps[0][2] == [1.0, 1.0, args.token_lr_scale]  # matrices, biases, CLS/MT tokens
        # ... and the group at the tokens' rate holds the four CLS/MT tokens, and only them
        assert groups[method][2] == sorted(f"branches.{m}.{t}" for m in ("image", "text") for t in ("cls", "mt"))


def test_a_dropout_method_on_an_incomplete_training_set_says_it_does_not_drop(tmp_path, capsys, monkeypatch):
    """Section 3: no dropout when the training set already misses modalities. Seen: placeholder-dropout then
    printed naive's numbers to the digit without a word on why."""
    drawn = []  # the steps that drew a modality dropout
    real_dropout = train.modality_dropout
    monkeypatch.setattr(train, "modality_dropout", lambda *a, **k: drawn.append(1) or real_dropout(*a, **k))
    missing = ["--train-missing-rate", "0.5", "--train-missing-type", "both"]
    metrics = train.main(SMALL + missing + ["--method", "placeholder-dropout", "naive", "--out", str(tmp_path / "auto")])
    said = [line for line in capsys.readouterr().out.splitlines() if "no modality dropout" in line]
    assert said == ["placeholder-dropout: no modality dropout: the training set already misses modalities "
                    "(section 3); --modality-dropout on drops anyway"]
    assert not drawn  # and it does not drop: it trains as naive does
    assert metrics["placeholder-dropout"]["scenarios"] == metrics["naive"]["scenarios"]
    train.main(SMALL + missing + ["--method", "placeholder-dropout", "--modality-dropout", "on",
                                  "--out", str(tmp_path / "on")])
    assert "no modality dropout" not in capsys.readouterr().out
    assert len(drawn) == train.RECIPES["synthetic"]["epochs"] * 64 // 16  # --modality-dropout on: one per step
def test_a_few_files_marked_absent_leave_modality_dropout_on(published_weights, tmp_path, capsys, monkeypatch):
    """Section 3: dropout on complete training data, none where the training set misses modalities (its missing
    rate). Seen: --on-error skip with two of Food-101's training images gone marked them absent, and the whole run
    then trained without modality dropout ("the training set already misses modalities"), unlike the paper's
    complete-data runs (Tables 1, 2, 4) whose numbers its summary prints beside it."""
    import test_data
    root = test_data.make_food101(tmp_path / "food101")
    for cls in ("baklava", "ramen"):
        (root / "images" / "train" / cls / f"{cls}_0.jpg").unlink()
    drawn = []  # the steps that drew a modality dropout
    real_dropout = train.modality_dropout
    monkeypatch.setattr(train, "modality_dropout", lambda *a, **k: drawn.append(1) or real_dropout(*a, **k))
    with pytest.warns(UserWarning, match="2 of 11 samples lack their image"):  # skip mode says what it marked
        train.main(["--data", "food101", "--data-root", str(root), "--weights", str(published_weights), "--out",
                    str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--workers", "0",
                    "--warmup-epochs", "0", "--method", "u2a", "--on-error", "skip"])
    assert "no modality dropout" not in capsys.readouterr().out
    assert len(drawn) == (12 - 1) // 4  # one per step: 12 training titles less the 10% val carve, batches of 4


