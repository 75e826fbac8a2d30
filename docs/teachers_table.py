"""The measured table of docs/teachers.md: test (or another evaluation) Dice of each arm over seeds.

Run from the folder holding ``runs_kd/`` (grids/kd_labels_dice_cpu.yaml) and ``runs_teachers/`` (the
commands in docs/teachers.md): ``python docs/teachers_table.py 30,31,32 [test|phantom40]``. Pooled and
per-volume Dice, mean ± std over seeds; Δ and paired t-test over seeds against S1; Wilcoxon signed-rank
over the test volumes (each averaged over seeds).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

seeds = [int(s) for s in sys.argv[1].split(",")]
evaluation = sys.argv[2] if len(sys.argv) > 2 else "test"
arms = {
    "S1 (baseline)": "runs_kd/student-s1-f0.5-seed{}",
    "KD(T1,S1) pseudo: B+PMD+Dice": "runs_kd/distill-s1-t1-bn+pmd-contrastive-f0.5-pseudo-transfer-seed{}",
    "KD(T1,S1) pseudo, logits only: PMD+Dice": "runs_teachers/distill-s1-t1-logits-seed{}",
    "KD(3D bundle,S1) pseudo, logits only: PMD+Dice": "runs_teachers/distill-s1-bundle3d-seed{}",
    "S1 (100%)": "runs_kd/student-s1-f1.0-seed{}",
}


def summary(run):
    return json.loads((Path(run) / f"eval/{evaluation}/summary.json").read_text())


def volumes(run):
    return pd.read_csv(Path(run) / f"eval/{evaluation}/per_volume.csv").set_index("patient")["dice"]


def read(run):
    d = summary(run)
    return d["pooled"]["dice"], d["per_volume"]["dice"]["mean"]


base = np.array([read(arms["S1 (baseline)"].format(s)) for s in seeds])
base_vol = pd.concat([volumes(arms["S1 (baseline)"].format(s)) for s in seeds], axis=1).mean(axis=1)
for name, pattern in arms.items():
    v = np.array([read(pattern.format(s)) for s in seeds])
    cells = [f"{v[:, i].mean():.3f} ± {v[:, i].std(ddof=1):.3f}" for i in range(2)]
    if name != "S1 (baseline)":
        for i in range(2):
            d = v[:, i] - base[:, i]
            cells[i] += f" (Δ {d.mean():+.3f}, p {stats.ttest_rel(v[:, i], base[:, i]).pvalue:.2g} seeds"
        vol = pd.concat([volumes(pattern.format(s)) for s in seeds], axis=1).mean(axis=1)
        dv = vol - base_vol.loc[vol.index]
        cells[1] += f"; Wilcoxon {len(dv)} volumes p {stats.wilcoxon(dv).pvalue:.2g})"
        cells[0] += ")"
    print(f"| {name} | {len(seeds)} | {cells[0]} | {cells[1]} |")
for t in ("runs_kd/teacher-t1-seed0", "runs_teachers/teacher-bundle3d"):
    if (Path(t) / f"eval/{evaluation}/summary.json").is_file():
        print(f"| {t} | 1 | {read(t)[0]:.3f} | {read(t)[1]:.3f} |")
