"""Smoke test of tests/bench.py (the speed benchmark is not part of the test run): at the small checkpoint
sizes, both builds agree on the logits, one training step and one eval of each run, and so does the command."""
import pytest
import torch

import bench


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a name transformers 5 deprecates
def test_bench_builds_agree_and_step():
    ours, ref = bench.build(full=False)
    L = 16  # the small BERT has 32 positions
    batches = [bench.make_batch(ours, 4, L, seed=0),
               bench.missing_batch(ours, 4, L, "text", 0.5),
               bench.missing_batch(ours, 4, L, "image", 0.5)]
    assert bench.check_same_logits(ours, ref, batches) < bench.LOGIT_TOL["cpu"]
    for model in (ours, ref):
        loss = bench.train_step(model, bench.make_optimizer(model), batches[0])
        assert torch.isfinite(loss)
        assert bench.eval_forward(model, batches[1]).shape == (4, bench.NUM_CLASSES)
    assert bench.step_flops(ours, 4, L, 4, 4, True) > bench.step_flops(ours, 4, L, 4, 2, False) > 0


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bench_command_line_runs(capsys):
    bench.main(["--small", "--batch", "2", "--text-len", "16", "--warmup", "0", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "train step ours/reference" in out and "texts missing" in out
