"""Distillation under torch.distributed: projector gradients averaged over ranks, one teacher cache for all.

Two gloo processes on the CPU, launched with ``torchrun --standalone`` (a TCP
rendezvous on the loopback), with a timeout so that a rendezvous that never
completes fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

WORKER = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from mkd.data.teacher_cache import TeacherCache
from mkd.handlers import DistillationHandler, build_projector, distillation_terms
from mkd.networks import build

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
teacher, student = build("t1", preset="tiny").eval(), build("s1")
projector = build_projector(student, teacher, ["bn"])
handler = DistillationHandler(teacher, student, projector, distillation_terms({"seg": 0.4, "bn": 0.2}), seg_weight=0.4)

# rank r puts r + 1 in every projector gradient: the average over 2 ranks is (1 + 2) / 2
for p in projector.parameters():
    p.grad = torch.full_like(p, rank + 1.0)
handler._sync_projector_grads(None)
grads = sorted({float(v) for p in projector.parameters() for v in p.grad.flatten().tolist()})

teacher_calls = []
teacher.register_forward_hook(lambda *args: teacher_calls.append(1))
g = torch.Generator().manual_seed(1)
items = [{"patient": "p0", "slice": i, "image": torch.rand(3, 32, 32, generator=g)} for i in range(6)]
cache = TeacherCache.build(teacher, student, items, lambda d: d, ["bn"], Path(sys.argv[1]), (32, 32), batch_size=4)
row = cache.lookup(items[5])["teacher_bn"]
# one file per rank: two processes printing to one pipe can interleave their lines
Path(sys.argv[2], f"rank{rank}.json").write_text(json.dumps({"rank": rank, "grads": grads,
    "teacher_calls": len(teacher_calls), "rows": len(cache), "row5": row.flatten()[:4].tolist()}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_average_projector_grads_and_share_one_cache(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache_dir = tmp_path / "cache"
    results = tmp_path / "results"
    results.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(cache_dir), str(results)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    by_rank = {r["rank"]: r for r in (json.loads(f.read_text()) for f in sorted(results.glob("rank*.json")))}
    assert sorted(by_rank) == [0, 1]
    for r in by_rank.values():
        assert r["grads"] == [1.5]  # every gradient is the mean of 1 and 2
        assert r["rows"] == 6
    # rank 0 ran the teacher over 6 slices in batches of 4; rank 1 only read the files
    assert by_rank[0]["teacher_calls"] == 2 and by_rank[1]["teacher_calls"] == 0
    assert by_rank[0]["row5"] == by_rank[1]["row5"]
    assert sorted(p.name for p in cache_dir.iterdir()) == ["bn.npy", "index.json", "logits.npy"]
