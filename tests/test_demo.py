"""scripts/demo.sh, shortened (a few pages and steps): every step of the README's workflow runs end to end through
the same commands, every file the README's demo table names is written, and the printed table is the eval JSONs."""

import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_demo_files() -> list:
    """The paths (relative to OUT) listed in the README's demo output table, between its two marker comments."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- demo-files -->(.*?)<!-- /demo-files -->", text, re.S)
    assert block, "README.md lost its <!-- demo-files --> table"
    paths = re.findall(r"^\| `OUT/([^`]+)` \|", block.group(1), re.M)
    assert len(paths) >= 10, paths
    return paths


@pytest.mark.slow
def test_shortened_demo_runs_end_to_end_and_writes_every_file_the_readme_names(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PY=sys.executable, OUT=str(out), TOPICS="4", PAGES="16", EVAL_PAGES="4", OMP_NUM_THREADS="1")
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "demo.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    missing = [p for p in readme_demo_files() if not (out / p).exists()]
    assert not missing, f"README names these demo outputs but the demo did not write them: {missing}"

    # both plots are real PNGs
    for name in ("training_loss.png", "local_ndcg_at_5.png"):
        with Image.open(out / "plots" / name) as image:
            assert image.format == "PNG" and image.size[0] > 200
    # epoch 2 ran PAGES/8 = 2 steps on the mined JSONL and went on from epoch 1's counters
    loss = [line.split() for line in open(out / "epoch2" / "training_loss.txt") if not line.startswith("#")]
    assert len(loss) == 2 and all(int(row[1]) == 2 for row in loss)
    mined = [json.loads(line) for line in open(out / "hardnegs_epoch1.jsonl")]
    assert len(mined) == 16 and all(row["pos"] not in row["negs"] for row in mined)
    stats = json.load(open(out / "hardnegs_epoch1.stats.json"))
    assert stats["queries"] == 16

    # the printed table is the eval JSONs' numbers
    for name in ("untrained", "epoch1", "epoch2"):
        bench = json.load(open(out / f"eval_{name}.json"))["benchmarks"]
        avg = next(iter(bench.values()))["average"]
        row = re.search(rf"^{name}\s+(\S+)\s+(\S+)\s+(\S+)$", result.stdout, re.M)
        assert row, result.stdout[-2000:]
        assert [float(x) for x in row.groups()] == [round(avg[k], 3) for k in ("ndcg_at_5", "recall_at_1", "mrr_at_10")]
