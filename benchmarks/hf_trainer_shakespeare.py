"""A user's Hugging Face GPT-2 trained by ``transformers.Trainer`` on tinyshakespeare, with and without a Body.

The user's side is the README snippet below (kept identical to the README by tests/integrations/test_integrations.py):
their own GPT-2 (4 layers, d = 128, 4 heads, random init) and their own ``Trainer``; topotorch adds one
``Body`` (BIMT: wiring cost with the text task's λ, neuron swaps every 200 steps) and one ``BodyCallback``.
Both runs see the same data, order and seed; reported: held-out bits/char (the text task's split and its
first 256 test windows), the wiring cost of each trained network under the same cost, and train seconds.

    python benchmarks/hf_trainer_shakespeare.py --steps 300 --json results/hf_trainer_shakespeare.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch

# the README shows this block as written (tests/integrations/test_integrations.py keeps the two identical)
# fmt: off
# --- README snippet ---
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

from topotorch import Body
from topotorch.integrations.hf import BodyCallback


def train_gpt2(windows, vocab, steps, out, structure=True):
    """A user's GPT-2 trained by transformers.Trainer on token windows; with topotorch's body when `structure`."""
    set_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=windows.shape[1], n_layer=4, n_embd=128, n_head=4)
    model = GPT2LMHeadModel(config)
    callbacks = []
    if structure:  # BIMT: λ·wiring cost (closed-form gradient) + neuron swaps every 200 steps, Adam's moments along
        body = Body(model, example_inputs={"input_ids": windows[:2]}, wiring={"wf": 2.0, "l0": 0.5},
                    lam="0:5e-6", relocation="swap", relocate_every=200, top_k=30)
        callbacks.append(BodyCallback(body))
    args = TrainingArguments(out, max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-3,
                             use_cpu=True, report_to=[], save_strategy="no", seed=0)
    data = [{"input_ids": w, "labels": w} for w in windows]
    Trainer(model, args, train_dataset=data, callbacks=callbacks).train()
    return model
# --- end of README snippet ---
# fmt: on


ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def windows_of(text_path: Path, block: int = 64) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The text task's split (topotorch.tasks.sequence.char_windows) as (block + 1)-token windows: HF shifts labels."""
    from topotorch.tasks.sequence import char_windows

    vocab, xtr, ytr, xte, yte = char_windows(text_path.read_text(encoding="utf-8", errors="replace"), block)
    return len(vocab), torch.cat([xtr, ytr[:, -1:]], 1), torch.cat([xte, yte[:, -1:]], 1)[:256]


def bits_per_char(model, windows: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=windows, labels=windows).loss) / math.log(2)


def wiring(model, windows: torch.Tensor) -> float:
    """The wiring cost (wf = 2, l0 = 0.5) of ``model`` on a fresh flow graph: the same coordinates for both runs
    (the body's relocation permuted the weights onto them; output coordinates it moved are not credited)."""
    from topotorch.graph.flow import flow_graph
    from topotorch.objectives.wiring import WiringConfig, wiring_cost

    with torch.no_grad():
        return float(wiring_cost(flow_graph(model, {"input_ids": windows[:2]}), WiringConfig(wf=2.0, l0=0.5)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    vocab, train, test = windows_of(Path(args.text))
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for name, structure in (("plain", False), ("body", True)):
            t0 = time.perf_counter()
            model = train_gpt2(train, vocab, args.steps, out, structure=structure)
            seconds = time.perf_counter() - t0
            rows[name] = {
                "test_bpc": bits_per_char(model, test),
                "wiring_cost": wiring(model, test),
                "train_seconds": seconds,
            }
            print(name, rows[name], flush=True)
    result = {
        "model": "HF GPT2LMHeadModel 4x128, 4 heads, random init",
        "text": args.text,
        "steps": args.steps,
        "threads": args.threads,
        "load_avg": os.getloadavg(),
        **rows,
        "bpc_change": rows["body"]["test_bpc"] - rows["plain"]["test_bpc"],
        "wiring_cost_ratio": rows["body"]["wiring_cost"] / rows["plain"]["wiring_cost"],
    }
    print(
        f"HF Trainer, GPT-2 4x128, {args.steps} steps: bits/char plain {rows['plain']['test_bpc']:.3f}, "
        f"with BodyCallback {rows['body']['test_bpc']:.3f}; wiring cost {rows['plain']['wiring_cost']:.4g} -> "
        f"{rows['body']['wiring_cost']:.4g} (x{result['wiring_cost_ratio']:.3f})"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
