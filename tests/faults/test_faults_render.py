"""Control characters in Slurm values. Quoting keeps `$()`, backticks and `;` inert, but a newline
ends the `#SBATCH` comment line: `--slurm.partition $'gpu\\ntouch /tmp/x #'` rendered a shell line
of its own that the batch script ran. Values that land on an #SBATCH line now refuse newline, CR,
NUL, the other C0 controls and DEL, naming the key; setup lines (shell code by design) and env
values (quoted) refuse NUL only."""
import pytest

from faultkit import error_line, hpctrain
from hpctrain.config.sections import SlurmConfig
from hpctrain.errors import UserError
from hpctrain.launch.render import LINE_KEYS, executor_params, render_script


@pytest.mark.parametrize("char", ["\n", "\r", "\0", "\x1b", "\x7f"])
@pytest.mark.parametrize("key", LINE_KEYS)
def test_line_values_refuse_control_characters(key, char):
    with pytest.raises(UserError, match=rf"^\[slurm\] {key} = .* contains "):
        executor_params(SlurmConfig(**{key: f"gpu{char}touch /tmp/x #"}), 1, 1)


def test_extra_sbatch_setup_and_env():
    with pytest.raises(UserError, match=r"extra_sbatch entry = '--reservation=x\\ntouch"):
        executor_params(SlurmConfig(extra_sbatch=["--reservation=x\ntouch /tmp/x"]), 1, 1)
    with pytest.raises(UserError, match="setup entry .* NUL"):
        executor_params(SlurmConfig(setup=["module load x\0"]), 1, 1)
    with pytest.raises(UserError, match=r"env\.A .* NUL"):
        executor_params(SlurmConfig(env={"A": "x\0y"}), 1, 1)
    # raw by design: a multi-line setup command and a quoted multi-line env value still render
    params = executor_params(SlurmConfig(setup=["if true; then\n  module load cuda\nfi"], env={"A": "x\ny"}), 1, 1)
    script = render_script(params, "/jobs/x", "python")
    assert "if true; then\n  module load cuda\nfi" in script and "export A='x\ny'" in script


def test_submit_dry_run_refuses_a_newline_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    model = ["--num_layers", "2", "--hidden_size", "64", "--num_attention_heads", "4", "--padded_vocab_size", "128"]
    p = hpctrain("submit", "--nodes", "1", "--gpus-per-node", "1", "--dry-run", *model, "--slurm.folder",
                 tmp_path / "jobs", "--slurm.partition", f"gpu\ntouch {marker} #")
    assert p.returncode == 2
    line = error_line(p, "submit")
    assert "[slurm] partition = 'gpu\\ntouch" in line and "contains a newline" in line
    assert not marker.exists() and not (tmp_path / "jobs").exists()
    p = hpctrain("submit", "--nodes", "1", "--gpus-per-node", "1", "--dry-run", *model, "--slurm.folder",
                 tmp_path / "jobs", "--slurm.partition", "gpu")  # the same without the newline renders
    assert p.returncode == 0 and "#SBATCH --partition=gpu" in p.stdout, p.stderr[-2000:]
