"""Bring your own model to the trainer: `--model hf:NAME` and `--model package.module:function`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from topotorch.cli import app
from topotorch.user_models import build_user_model, parse_model_config


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 120)
    return path


def test_model_config_parsing():
    assert parse_model_config("n_layer=4, n_embd=128,act=gelu,tie=false,p=0.1,x=none") == {
        "n_layer": 4,
        "n_embd": 128,
        "act": "gelu",
        "tie": False,
        "p": 0.1,
        "x": None,
    }
    assert parse_model_config("") == {}
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_model_config("n_layer4")


def test_hugging_face_gpt2_trains_through_the_cli_with_every_output(corpus, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "run"
    r = invoke(
        "train",
        f"text:{corpus}",
        "--model",
        "hf:gpt2",
        "--model-config",
        "n_layer=1,n_embd=16,n_head=2",
        "--steps",
        6,
        "--no-animation",
        "--no-progress",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and (out / "connectivity.png").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "hf:gpt2" and config["model_config"] == "n_layer=1,n_embd=16,n_head=2"
    from topotorch.training import load_run

    run = load_run(out)
    heads = run.graph.space("hf.transformer.h.0.attn.c_attn")
    assert heads.groups is not None and len(heads.groups.unique()) == 2
    assert invoke("report", out).exit_code == 0 and (out / "report.html").is_file()
    r = invoke("train", "--resume", out, "--no-animation", "--no-progress")
    assert r.exit_code == 0, r.output


def build_tiny(width: int = 8):
    """A user's builder function (imported by --model tests.test_user_models:build_tiny)."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(30, width)
            self.mix = nn.Linear(width, width)
            self.out = nn.Linear(width, 30)

        def forward(self, ids):
            return self.out(torch.relu(self.mix(self.emb(ids))))

    return Net()


def test_a_users_builder_function_trains(corpus, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "run"
    r = invoke(
        "train",
        f"text:{corpus}",
        "--model",
        "test_user_models:build_tiny",
        "--model-config",
        "width=6",
        "--steps",
        4,
        "--no-animation",
        "--no-progress",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["model"] == "test_user_models:build_tiny"


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("nope", "give hf:NAME or package.module:function"),
        ("hf:not_a_model_type", "unknown Hugging Face model type"),
        ("os:getcwd", "returned str, not an nn.Module"),
        ("no_such_module_xyz:f", "cannot import it"),
    ],
)
def test_bad_model_specs_are_one_line_errors(corpus, tmp_path, spec, needle):
    if spec.startswith("hf:"):
        pytest.importorskip("transformers")
    r = invoke("train", f"text:{corpus}", "--model", spec, "--steps", 2, "--no-animation", "--out", tmp_path / "r")
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output, r.output


def test_hf_models_need_a_token_task():
    with pytest.raises(ValueError, match="token task"):
        build_user_model("hf:gpt2")
