"""Write two contrasting text sets from the held-out 10% of tiny-shakespeare for `topotorch localize`:
speaker tags (lines like ``GREMIO:``) and dialogue lines, 400 lines each.

    .venv/bin/python benchmarks/topo_localize_texts.py --out results/localize
    topotorch localize RUN --target results/localize/speaker_tags.txt --other results/localize/dialogue.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from topotorch.tasks.sequence import SHAKESPEARE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/localize"))
    ap.add_argument("--lines", type=int, default=400)
    a = ap.parse_args()
    text = SHAKESPEARE.read_text()
    lines = [ln.strip() for ln in text[int(len(text) * 0.9) :].splitlines() if ln.strip()]
    tags = [ln for ln in lines if ln.endswith(":") and ln[:-1].replace(" ", "").isupper()]
    speech = [ln for ln in lines if not ln.endswith(":")]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "speaker_tags.txt").write_text("\n".join(tags[: a.lines]))
    (a.out / "dialogue.txt").write_text("\n".join(speech[: a.lines]))
    print(f"wrote {a.out / 'speaker_tags.txt'} ({min(len(tags), a.lines)} lines) and {a.out / 'dialogue.txt'}")


if __name__ == "__main__":
    main()
