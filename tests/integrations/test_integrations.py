"""Body in other people's loops: HF ``Trainer`` and Lightning ``Trainer`` through ``BodyCallback``.

For each framework, on a tiny float64 model (a 1-layer HF GPT-2 from a config; a Linear chain in a
LightningModule), a few steps with a deterministic data order (sequential sampler / shuffle off):

1. every relocation keeps the function (1e-12);
2. training equals the never-relocated control seen through the cumulative permutation (1e-8), as in
   tests/test_body.py (b): the control's coordinates are reordered by σ after every step, so both
   penalties see the same geometry, and the control's parameters moved by σ are the relocated run's.
   Equality holds only if the callback permuted the framework's optimizer state (Adam's moments);
3. resuming from a mid-run checkpoint (the framework's own, with the body state in it) equals the
   uninterrupted run (1e-12).

The relocated run is recorded first (permutations and coordinates after each relocating step), then
the control replays the record: the frameworks own their loops, so the two runs cannot go in lockstep.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from topotorch import Body, SpatialGraph
from topotorch.objectives.wiring import WiringConfig
from topotorch.relocation import apply_permutation

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(wiring=WiringConfig(wf=1.0, l0=0.1), lam="0:1e-3,3:3e-2", bias_penalty_from=2, group_lam=1e-3, top_k=4)


@pytest.fixture(autouse=True)
def _float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


class Record:
    """Wraps ``body.after_step``: checks each relocation keeps ``fn()`` (1e-12) and records what it applied."""

    def __init__(self, body: Body, fn):
        self.steps: dict[int, tuple[list, dict]] = {}  # step -> (applied, coordinates after)
        self.moved = 0
        inner = body.after_step

        def after_step(step, optimizers=(), **kw):
            with torch.no_grad():
                before = fn()
            applied = inner(step, optimizers, **kw)
            if applied:
                with torch.no_grad():
                    assert (fn() - before).abs().max() <= 1e-12, f"relocation after step {step} changed the function"
                positions = {s.name: s.positions.clone() for s in body.graph.spaces if s.positions is not None}
                self.steps[step] = (applied, positions)
                self.moved += sum(int((p != torch.arange(len(p))).sum()) for _, p in applied)
            return applied

        body.after_step = after_step


class Follow:
    """Replays a :class:`Record` on the control: σ composed with each permutation, coordinates set so that
    the control's neuron σ[q] sits where the relocated run's slot q sits."""

    def __init__(self, record: Record, body: Body):
        self.record, self.body = record, body
        self.sigma = {s.name: torch.arange(s.size) for s in body.graph.spaces}

    def __call__(self, step: int) -> None:
        if step not in self.record.steps:
            return
        applied, positions = self.record.steps[step]
        for name, perm in applied:
            if self.body.graph.space(name).relocate == "weights":
                self.sigma[name] = self.sigma[name][perm]
        for s in self.body.graph.spaces:
            if s.positions is None:
                continue
            pos = torch.empty_like(positions[s.name])
            pos[self.sigma[s.name]] = positions[s.name]
            if not torch.equal(pos, s.positions):
                self.body.graph.set_positions(s.name, pos)

    def moved(self, model: nn.Module, graph_of) -> nn.Module:
        """A copy of the control ``model`` with every weight space permuted by σ."""
        seen = copy.deepcopy(model)
        g = graph_of(seen)
        for s in g.spaces:
            if s.relocate == "weights":
                apply_permutation(g, s.name, self.sigma[s.name])
        return seen


def assert_close(a: nn.Module, b: nn.Module, tol: float) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert (p.detach() - q.detach()).abs().max() <= tol, n


# -- Hugging Face Trainer --------------------------------------------------------------------------

VOCAB, BLOCK = 11, 8


def hf_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (8, BLOCK), generator=torch.Generator().manual_seed(0))


def hf_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=BLOCK,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).double()


def hf_graph(model):
    from topotorch.graph.flow import flow_graph

    return flow_graph(model, {"input_ids": hf_ids()[:2]})


def hf_train(model, body, out, steps=6, extra=(), resume=None, **args):
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging

    from topotorch.integrations.hf import BodyCallback

    logging.set_verbosity_error()
    ids = hf_ids()
    data = [{"input_ids": r, "labels": r} for r in ids]
    targs = TrainingArguments(
        str(out),
        max_steps=steps,
        learning_rate=1e-2,
        weight_decay=1e-3,
        use_cpu=True,
        report_to=[],
        train_sampling_strategy="sequential",
        logging_strategy="no",
        disable_tqdm=True,
        optim="adamw_torch",
        seed=0,
        **{"save_strategy": "no", "per_device_train_batch_size": 4, **args},
    )
    trainer = Trainer(model, targs, train_dataset=data, callbacks=[BodyCallback(body), *extra])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def hf_body(model, relocation="swap", **over):
    return Body(model, hf_graph(model), relocation=relocation, **{**SETTINGS, "relocate_every": 2, **over})


def test_hf_trainer_relocation_keeps_the_function_and_equals_the_control(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    model = hf_model()
    body = hf_body(model)
    record = Record(body, lambda: model(input_ids=hf_ids()).logits)
    hf_train(model, body, tmp_path / "a", max_grad_norm=1.0)  # clipping: the task gradient only, both runs alike
    assert body.relocations == 3 and record.moved > 0 and body.step == 6

    control = hf_model()
    cbody = hf_body(control, relocation=None)
    follow = Follow(record, cbody)

    class Replay(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            follow(state.global_step - 1)

    hf_train(control, cbody, tmp_path / "b", extra=[Replay()], max_grad_norm=1.0)
    assert_close(model, follow.moved(control, hf_graph), 1e-8)


def test_hf_trainer_resume_equals_an_uninterrupted_run(tmp_path):
    pytest.importorskip("transformers")
    model = hf_model()
    body = hf_body(model, relocate_every=2)
    hf_train(model, body, tmp_path, steps=6, save_strategy="steps", save_steps=3)
    ckpt = tmp_path / "checkpoint-3"  # mid-epoch (2 batches per epoch), after the relocation of step index 1
    assert (ckpt / "topotorch_body.safetensors").is_file() and (ckpt / "topotorch_body.json").is_file()

    model2 = hf_model(seed=1)
    body2 = hf_body(model2, relocate_every=2)
    hf_train(model2, body2, tmp_path, steps=6, save_strategy="no", resume=str(ckpt))
    assert body2.step == 6 and body2.relocations == body.relocations == 3
    assert_close(model, model2, 1e-12)
    for s, s2 in zip(body.graph.spaces, body2.graph.spaces, strict=True):
        assert (s.positions is None and s2.positions is None) or torch.equal(s.positions, s2.positions), s.name

    (ckpt / "topotorch_body.json").unlink()  # resuming without the body state is refused, naming the fix
    with pytest.raises(ValueError, match="resume_from"):
        hf_train(hf_model(), hf_body(hf_model()), tmp_path, steps=6, resume=str(ckpt))


HF_DDP_WORKER = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    sys.path.insert(0, sys.argv[2])
    from tests.integrations.test_integrations import hf_body, hf_model, hf_train
    out, rank = sys.argv[1], sys.argv[3]
    model = hf_model()
    body = hf_body(model)
    hf_train(model, body, out, per_device_train_batch_size=2)
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "relocations": body.relocations,
                "positions": {s.name: s.positions for s in body.graph.spaces if s.positions is not None}},
               f"{out}/rank{rank}.pt")
""")


def hf_launch(out: Path, world: int = 2) -> list[dict]:
    """``world`` HF Trainer workers under torchrun's environment (gloo, CPU); each rank's parameters and coordinates."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
        args = [sys.executable, "-c", HF_DDP_WORKER, str(out), str(ROOT), str(rank)]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        log = p.communicate(timeout=240)[0].decode()
        assert p.returncode == 0, log[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.slow  # two processes each importing transformers: ~20 s on 2 idle cores
def test_hf_trainer_two_processes_equal_one_process_accumulating_the_same_micro_batches(tmp_path):
    """2 gloo ranks x 2 samples equal 1 process accumulating the same two 2-sample micro-batches (1e-12; bitwise
    here): wiring cost, group lasso and swaps every 2 steps on rank 0, broadcast. The all-reduce sums the ranks'
    gradients in the order accumulation does; one 4-sample batch sums in another, and that is all it changes:
    GPT-2's key bias has an analytically zero task gradient (softmax ignores a shift shared by all keys), so it
    sits at rounding noise (~1e-15), and the closed-form gradient λ·(wf·d + l0)·sign(θ) follows the noise's sign.
    Against one 4-sample batch, every other parameter, the function and the coordinates agree to 1e-12 and the
    key bias in magnitude (a dead parameter: its sign flips where its noise does)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    rank0, rank1 = hf_launch(tmp_path / "ddp")
    assert rank0["relocations"] == rank1["relocations"] == 3
    for k in ("params", "positions"):  # replicas identical
        assert all(torch.equal(rank0[k][n], rank1[k][n]) for n in rank0[k]), k

    def one_process(**args):
        model = hf_model()
        body = hf_body(model)
        hf_train(model, body, tmp_path / "one", **args)
        assert body.relocations == 3
        return model, body

    model, body = one_process(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for n, p in model.named_parameters():
        assert (p.detach() - rank0["params"][n]).abs().max() <= 1e-12, n
    for s in body.graph.spaces:
        assert s.positions is None or torch.equal(s.positions, rank0["positions"][s.name]), s.name

    model, body = one_process(per_device_train_batch_size=4)
    d = model.config.n_embd
    for n, p in model.named_parameters():
        diff = (p.detach() - rank0["params"][n]).abs()
        if n.endswith("attn.c_attn.bias"):  # [query | key | value] biases
            assert (p.detach()[d : 2 * d].abs() - rank0["params"][n][d : 2 * d].abs()).abs().max() <= 1e-12
            diff = torch.cat([diff[:d], diff[2 * d :]])
        assert diff.max() <= 1e-12, n
    for s in body.graph.spaces:
        assert s.positions is None or torch.equal(s.positions, rank0["positions"][s.name]), s.name
    ddp = hf_model()
    ddp.load_state_dict(rank0["params"], strict=False)  # lm_head.weight is tied to wte.weight
    with torch.no_grad():
        assert (model(input_ids=hf_ids()).logits - ddp(input_ids=hf_ids()).logits).abs().max() <= 1e-12


# -- Lightning --------------------------------------------------------------------------------------


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 12), nn.SiLU(), nn.Linear(12, 12), nn.SiLU(), nn.Linear(12, 2)).double()


def xy(n: int = 32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 4, generator=g, dtype=torch.float64) * 2 - 1
    return x, torch.stack([(x[:, 0] + x[:, 2]) ** 3, x[:, 1] ** 2 + torch.sin(torch.pi * x[:, 3])], 1)


def pl_train(net, body, out, steps=9, extra=(), ckpt_path=None, every=None):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from topotorch.integrations.lightning import BodyCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-3)

    callbacks = [BodyCallback(body), *extra]
    if every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=every, save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(every),
        precision="64-true",
        callbacks=callbacks,
        default_root_dir=out,
    )
    loader = DataLoader(TensorDataset(*xy()), batch_size=16, shuffle=False)  # 2 batches per epoch, fixed order
    trainer.fit(Module(), loader, ckpt_path=ckpt_path)
    return trainer


def pl_body(net, relocation="swap", **over):
    return Body(net, SpatialGraph.from_chain(net), relocation=relocation, **{**SETTINGS, "relocate_every": 3, **over})


def test_lightning_relocation_keeps_the_function_and_equals_the_control(tmp_path):
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    net = mlp()
    body = pl_body(net)
    x, _ = xy()
    record = Record(body, lambda: net(x))
    pl_train(net, body, tmp_path / "a")
    assert body.relocations == 3 and record.moved > 0 and body.step == 9

    control = mlp()
    cbody = pl_body(control, relocation=None)
    follow = Follow(record, cbody)

    class Replay(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            follow(trainer.global_step - 1)

    pl_train(control, cbody, tmp_path / "b", extra=[Replay()])
    assert_close(net, follow.moved(control, SpatialGraph.from_chain), 1e-8)


def test_lightning_resume_equals_an_uninterrupted_run(tmp_path):
    pytest.importorskip("lightning")
    net = mlp()
    body = pl_body(net, relocate_every=2)
    pl_train(net, body, tmp_path, every=4)
    # step 4 ends epoch 2 (2 batches per epoch) right after a relocation. Not mid-epoch: Lightning restarts a
    # plain DataLoader's epoch from its first batch ("your dataloader is not resumable"), so a mid-epoch resume
    # sees other batches whatever the body does (0.018 apart after 9 steps here)
    ckpt = next(tmp_path.glob("*step=4.ckpt"))
    saved = torch.load(ckpt, weights_only=True)  # the body state is plain tensors and JSON values
    assert saved["topotorch_body"]["step"] == 4 and saved["topotorch_body"]["relocations"] == 2

    net2 = mlp(seed=1)
    body2 = pl_body(net2, relocate_every=2)
    pl_train(net2, body2, tmp_path / "resumed", ckpt_path=str(ckpt))
    assert body2.step == 9 and body2.relocations == body.relocations == 4
    assert_close(net, net2, 1e-12)
    for s, s2 in zip(body.graph.spaces, body2.graph.spaces, strict=True):
        assert (s.positions is None and s2.positions is None) or torch.equal(s.positions, s2.positions), s.name


# -- the package, the README ------------------------------------------------------------------------


def test_importing_topotorch_imports_no_framework():
    code = (
        "import sys, topotorch, topotorch.integrations; "
        "print(sorted(m for m in ('transformers', 'lightning', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_readme_hf_trainer_snippet_is_the_benchmarks_code():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Your own training loop: HF Trainer and Lightning", 1)[1].split("\n## ", 1)[0]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    bench = (ROOT / "benchmarks" / "hf_trainer_shakespeare.py").read_text()
    code = re.search(r"# --- README snippet ---\n(.*?)# --- end of README snippet ---\n", bench, flags=re.S).group(1)
    assert snippet == code
