"""A real local Slurm cluster (tools/slurm/start_cluster.sh) for the tests that ask for it.

Started once per session on first use (4 fake nodes n1..n4 x 8 CPUs x 2 fake GPUs), stopped at the
end by PID. State lives in $HPCTRAIN_SLURM_DIR or a fresh temporary directory.
"""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools" / "slurm"


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b) is None]
    if missing:
        pytest.fail(f"Slurm binaries missing ({', '.join(missing)}): run tools/slurm/install_slurm.sh as root")
    own_dir = not os.environ.get("HPCTRAIN_SLURM_DIR")
    state = os.environ.get("HPCTRAIN_SLURM_DIR") or tempfile.mkdtemp(prefix="hpctrain-slurm-")
    start = subprocess.run(["bash", str(TOOLS / "start_cluster.sh"), state, "4", "8", "2"],
                           capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        subprocess.run(["bash", str(TOOLS / "stop_cluster.sh"), state], capture_output=True, timeout=60)
        pytest.fail(f"local Slurm did not start:\n{start.stdout}\n{start.stderr}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(Path(state) / "etc" / "slurm.conf")
    try:
        yield Path(state)
    finally:
        subprocess.run(["bash", str(TOOLS / "stop_cluster.sh"), state], capture_output=True, timeout=60)
        if own_dir:
            shutil.rmtree(state, ignore_errors=True)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
