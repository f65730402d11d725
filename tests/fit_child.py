"""A real stage fit in its own process, for tests/test_kill_resume.py (which SIGKILLs it).

    python tests/fit_child.py {stage1,stage3} RUN_DIR

Makes (or reuses) a tiny phantom run in RUN_DIR from the tests' ``params/test.yaml`` with
:data:`OVERRIDES`, prepares it and runs the stage's own fit: ``stage1.fit_class`` for Cor, or
``stage3.fit_unified`` with hard-example mining and distillation. Stage 3 needs stage-2 labels and
stage-1 teachers; the setup stands in for those stages cheaply — the prepared noisy whole-heart
ROI labels as L^ref (``stage3.supervision: roi``, test.yaml's small ROI grid: validation stays
cheap), the prepared LV occupancy as the LV teacher — since what is tested is the fit, not what
it learns.

Every step sleeps :data:`SLEEP_S` before drawing its batch so the parent can kill the process
between checkpoints; sleeping changes no number. One thread, so that two processes compute
bit-identical results whatever the machine. Running the same command again resumes the fit.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from params_for_tests import load_test_params  # noqa: E402  (tests/, this script's folder)

from nearfix_lib.core.io import write_npy, write_npz  # noqa: E402
from nearfix_lib.core.workspace import case_dir, stage1_probabilities, stage2_dir  # noqa: E402
from nearfix_lib.field.store import quantise_probability  # noqa: E402
from nearfix_lib.field.unified import UnifiedTask  # noqa: E402
from nearfix_lib.stages import stage1, stage3  # noqa: E402
from nearfix_lib.stages.prepare import load_crops_index, prepare_run  # noqa: E402
from nearfix_lib.stages.runs import start_run  # noqa: E402
from nearfix_lib.stages.stage1 import Stage1Task  # noqa: E402

EPOCHS = 6
SLEEP_S = 0.1
# The same loop for both stages, with every part of a fit's state in play across the kill
TRAIN = {"epochs": EPOCHS,  # the test checks the rerun ends here (test.yaml's stage-3 fit is shorter)
         "checkpoint_interval": 2,  # the kill follows the first last.pt (epoch 2), well before EPOCHS
         "cases_per_batch": 1,  # a step per case, two per epoch: the kill lands part-way through one
         "eval_interval": 1,  # a score and a best.pt decision every epoch, on both sides of the kill
         "lr_step_epochs": 3,  # the scheduler steps after the kill: its state must be restored
         "grad_clip": 1.0}  # the optional clipping step runs too (off in test.yaml)
OVERRIDES = {"stage1.train": TRAIN,
             "stage3.train": TRAIN,
             "stage3.supervision": "roi",  # L^ref stands in as the prepared ROI labels (see above)
             # hard-example mining from the first epoch on: the mined voxels are task state to restore
             "stage3.sampling": {"mined": 16, "mine_from_epoch": 1, "mine_interval": 1}}
STAGE1_CLASS = "Cor"
TEACHER_CLASS = "LV"


def checkpoint_dir(stage: str, run_dir: Path) -> Path:
    """Where the child's fit writes last.pt (the stages' own folders)."""
    run_dir = Path(run_dir)
    return run_dir / "stage1" / STAGE1_CLASS / "ckpt" if stage == "stage1" else run_dir / "stage3" / "ckpt"


def _slow(cls) -> None:
    original = cls.batch

    def batch(self, case_idx, epoch):
        time.sleep(SLEEP_S)
        return original(self, case_idx, epoch)

    cls.batch = batch


def _stand_in_for_stages_1_and_2(run) -> None:
    """The prepared noisy ROI labels as stage 2's L^ref and the prepared LV occupancy as the LV teacher."""
    for cid in load_crops_index(run.path("prepared")):
        lref = stage2_dir(run) / "roi" / f"{cid}.npz"
        if not lref.is_file():
            with np.load(case_dir(run.path("prepared"), cid) / "heart.npz") as z:
                write_npz(lref, labels=z["labels"], to_original=z["to_original"])
        teacher = stage1_probabilities(run, TEACHER_CLASS, cid)
        if not teacher.is_file():
            with np.load(case_dir(run.path("prepared"), cid) / f"class_{TEACHER_CLASS}.npz") as z:
                write_npy(teacher, quantise_probability(z["mask"]))


def main(stage: str, run_dir: str) -> int:
    torch.set_num_threads(1)
    os.environ.pop("WORLD_SIZE", None)  # one process, never DDP
    run = start_run(load_test_params(OVERRIDES, run_dir=run_dir), progress=False)
    prepare_run(run)
    if stage == "stage1":
        _slow(Stage1Task)
        _, _, result = stage1.fit_class(run, STAGE1_CLASS, run.params.stage1, progress=False)
    elif stage == "stage3":
        _stand_in_for_stages_1_and_2(run)
        _slow(UnifiedTask)
        data = stage3.load_stage3_data(run)
        _, task, result = stage3.fit_unified(run, data, progress=False)
        assert task.distill and task.sampler.params.mined > 0
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    print(f"done: epochs {result.resumed_from} to {result.last_epoch}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
