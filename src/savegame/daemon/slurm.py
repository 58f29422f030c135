"""SLURM: a job that asked for a warning signal before its end (`#SBATCH --signal=B:USR1@120`) and may
be requeued (`#SBATCH --requeue`) is requeued once the emergency checkpoint is safe, so it resumes
from it when it runs again. The daemon must be the batch shell (`exec savegame run ...`): `B:`
signals the batch shell alone.
"""
from __future__ import annotations

import logging
import os
import subprocess
from typing import Mapping, Optional

log = logging.getLogger("savegame")
REQUEUE_TIMEOUT_S = 30.0


def requeue(environ: Mapping[str, str] = os.environ) -> Optional[bool]:
    """`scontrol requeue $SLURM_JOB_ID`: True when SLURM took it, False when it failed, None when
    this is not a SLURM job (nothing to requeue)."""
    job = environ.get("SLURM_JOB_ID", "").strip()
    if not job:
        log.info("the preemption signal stopped the run; SLURM_JOB_ID is not set, so there is no job to requeue")
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=REQUEUE_TIMEOUT_S, env=dict(environ))
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("cannot requeue SLURM job %s: %s; resubmit it to resume from its emergency checkpoint", job, exc)
        return False
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip()[-500:] or f"exit code {done.returncode}"
        log.error("`scontrol requeue %s` failed: %s; is the job requeueable (#SBATCH --requeue)? Resubmit it "
                  "to resume from its emergency checkpoint", job, why)
        return False
    log.info("requeued SLURM job %s: it resumes from its emergency checkpoint when it runs again", job)
    return True
