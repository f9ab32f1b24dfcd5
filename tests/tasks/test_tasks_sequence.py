"""Transformer tasks: data as the paper defines it, the residual probe, text files as tasks, short runs."""

import json
import math
import subprocess
import sys

import pytest
import torch

from topotorch.tasks import get_task
from topotorch.tasks.sequence import bits_per_char, char_windows, in_context_data, probe_residual
from topotorch.training import TrainConfig, build, train


def test_in_context_sequences_follow_the_paper():
    x, y, w = in_context_data(500, torch.Generator().manual_seed(0), torch.float64)
    assert x.shape == (500, 3, 2) and y.shape == (500,)
    assert torch.equal(x[:, 0, 0], torch.zeros(500)) and torch.equal(x[:, 1, 1], torch.zeros(500))
    assert torch.equal(x[:, 2, 0], torch.zeros(500))
    torch.testing.assert_close(x[:, 1, 0], w * x[:, 0, 1])  # y1 = w x1
    torch.testing.assert_close(y, w * x[:, 2, 1])  # y2 = w x2
    assert w.min() >= -1 and w.max() <= 1 and x[:, ::2, 1].min() >= 1 and x[:, ::2, 1].max() <= 3


def test_probe_is_pearson_correlation_per_residual_neuron():
    cfg = TrainConfig.for_task("in-context-regression", dtype="float64", progress=False)
    _task, model, _graph = build(cfg)
    x, _, w = in_context_data(300, torch.Generator().manual_seed(1), torch.float64)
    r = probe_residual(model, x, w, min_activity=0.0)
    assert set(r) == {"embed", "blocks.0", "blocks.1"}
    states = {}
    h = model.gpt.blocks[0].register_forward_hook(lambda m, i, o: states.setdefault("b0", o))
    with torch.no_grad():
        model(x)
    h.remove()
    a = states["b0"][:, -1]
    expected = torch.stack([torch.corrcoef(torch.stack([a[:, j], w]))[0, 1] for j in range(a.shape[1])])
    torch.testing.assert_close(r["blocks.0"], expected, rtol=0, atol=1e-10)


def test_text_file_task(tmp_path):
    text = "to be or not to be, that is the question. " * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    task = get_task(f"text:{path}")
    assert task.metric == "bpc"
    data = task.make_data(0, torch.float32)
    vocab, xtr, ytr, xte, _yte = char_windows(text, 64)
    assert torch.equal(ytr[:, :-1], xtr[:, 1:])  # targets are the next characters
    assert data.x_train.shape[1] == 64 and len(vocab) == len(set(text))
    assert xtr.numel() + xte.numel() <= len(text)
    model = task.make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # uniform predictions: exactly log2(vocab) bits per character
    assert bits_per_char(model, data.x_test, data.y_test) == pytest.approx(math.log2(len(vocab)), rel=1e-6)
    with pytest.raises(ValueError, match="not found"):
        get_task(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="too short"):
        char_windows("abc", 64)


@pytest.mark.parametrize(
    "task, overrides",
    [
        ("in-context-regression", {}),
        ("modular-addition-transformer", {}),
        ("text", {"batch_size": 4}),
    ],
)
def test_short_transformer_runs_write_a_full_run_folder(tmp_path, task, overrides):
    if task == "text":  # a tiny char-level GPT on a file the test writes, registered like a user would
        from topotorch.tasks import TASKS
        from topotorch.tasks.sequence import text_task

        path = tmp_path / "c.txt"
        path.write_text("hello world, the quick brown fox jumps over the lazy dog. " * 30)
        task = "tiny-text-test"
        TASKS[task] = lambda: text_task(path, name=task, block=16, d_model=16, n_layers=1, n_heads=2)
    cfg = TrainConfig.for_task(
        task,
        steps=40,
        swap_every=20,
        log_every=20,
        progress=False,
        animation=False,
        out=str(tmp_path / "run"),
        **overrides,
    )
    r = train(cfg)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert math.isfinite(summary[f"test_{r.task.metric}"])
    assert (tmp_path / "run" / "connectivity.png").read_bytes()[:4] == b"\x89PNG"
    assert r.graph.space("resid").stream


def test_cli_rejects_missing_text_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "topotorch", "train", f"text:{tmp_path}/nope.txt"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().startswith("error:")
        and "not found" in proc.stderr
        and len(proc.stderr.strip().splitlines()) == 1
    )


def test_probe_ignores_neurons_without_signal():
    cfg = TrainConfig.for_task("in-context-regression", dtype="float64", progress=False)
    _, model, _ = build(cfg)
    x, _, _w = in_context_data(200, torch.Generator().manual_seed(2), torch.float64)
    with torch.no_grad():  # silence residual neuron 5 everywhere except a 1e-6 trace of the signal
        gpt = model.gpt
        for lin in [gpt.embed] + [b.attn.proj for b in gpt.blocks] + [b.mlp[2] for b in gpt.blocks]:
            lin.weight[5] = 0
            lin.bias[5] = 0
        gpt.pos[:, 5] = 0
        gpt.embed.weight[5, 1] = 1e-6  # neuron 5 = 1e-6 * x at the first position
    r_all = probe_residual(model, x, x[:, 0, 1], position=0, min_activity=0.0)["embed"]
    r = probe_residual(model, x, x[:, 0, 1], position=0)["embed"]
    assert r_all[5] == pytest.approx(1.0)  # perfectly correlated, but carries nothing
    assert r[5] == 0.0
