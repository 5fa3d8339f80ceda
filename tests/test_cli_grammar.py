"""One command-line grammar for every command (hpctrain/cli_args.py): --help lists the flags,
--key value = --key=value = --key-with-dashes, config.toml is optional everywhere and gives the
defaults of flags that are config keys, ms-swift / Megatron-SWIFT spellings are accepted, and bad
flags are one-line errors. End to end: `hpctrain prep --model M --dataset D` works, and
`plan --gpus-per-node` and `--gpus_per_node` print the same plan."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpctrain import cli
from hpctrain.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QWEN = str(ROOT / "hpctrain" / "assets" / "configs" / "qwen2.5-0.5b-instruct.config.json")
TOKENIZER = ROOT / "tests" / "fixtures" / "qwen2.5-tokenizer"
SC = str(ROOT / "hpctrain" / "assets" / "data" / "self_cognition.jsonl")


def command_line(name: str):
    """The CommandLine behind `hpctrain NAME` (every command module has command_line())."""
    module = importlib.import_module(cli.COMMANDS[name][0].partition(":")[0])
    return module.command_line(name) if name in ("sft", "pt") else module.command_line()


# A flag of each command (canonical spelling, other spellings it accepts).
FLAGS = {
    "sft": [], "pt": [],
    "export": [("--output_dir", []), ("--overwrite", ["--exist_ok"]), ("--test_convert_precision", [])],
    "reshard": [("--tp", ["--tensor_model_parallel_size"]), ("--out", ["--output_dir"]),
                ("--format", ["--ckpt_format"])],
    "plan": [("--gpus_per_node", []), ("--gpu_memory_gib", []), ("--auto", [])],
    "submit": [("--dry_run", []), ("--profile", []), ("--gpus_per_node", [])],
    "infer": [("--top_k", []), ("--repetition_penalty", []), ("--val_dataset", []), ("--result_path", []),
              ("--max_new_tokens", [])],
    "prep": [("--mode", [])],
    "doctor": [], "plot": [("--output", [])], "templates": [("--overwrite", ["--exist_ok"])],
}


def test_every_command_has_the_grammar_and_is_tested():
    assert set(FLAGS) == set(cli.COMMANDS)


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_help_lists_every_flag_and_config_toml(name, capsys):
    with pytest.raises(SystemExit) as e:
        command_line(name).parse(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: hpctrain {name}" in out and "config.toml" in out and "dashes or underscores" in out
    for f in command_line(name).flags:
        for spelling in f.names:
            assert f"--{spelling.lstrip('-')}" in out, (name, spelling)
    for canonical, others in FLAGS[name]:
        for spelling in (canonical, *others):
            assert spelling in out, (name, spelling)
    if command_line(name).all_keys:  # training-side commands list every config key too
        assert "[train] " in out and "global_batch_size" in out


def test_value_forms_dashes_and_aliases_parse_alike():
    reshard = command_line("reshard")
    forms = [["ck", "--tp", "2", "--pp", "1", "--out", "o"],
             ["ck", "--tp=2", "--pp=1", "--out=o"],
             ["ck", "--tensor_model_parallel_size", "2", "--pipeline-model-parallel-size", "1", "--output_dir", "o"],
             ["ck", "--tensor-model-parallel-size=2", "--pp", "1", "--output-dir", "o"]]
    for argv in forms:
        a = reshard.parse(argv)
        assert (a.ckpt, a.tp, a.pp, a.out, a.format) == ("ck", 2, 1, "o", "torch_dist"), argv
    a = reshard.parse(["--overwrite", "ck", "--tp", "1", "--pp", "1", "--out", "o", "--no_optim", "false"])
    assert (a.overwrite, a.ckpt, a.no_optim) == (True, "ck", False)  # a bool flag takes only a bool word here
    export = command_line("export")
    for argv in (["--to-hf", "--mcore-model", "m", "--output-dir", "h", "--exist-ok", "true"],
                 ["--to_hf=true", "--mcore_model=m", "--output_dir=h", "--overwrite"]):
        a = export.parse(argv)
        assert (a.to_hf, a.to_mcore, a.mcore_model, a.output_dir, a.overwrite) == (True, False, "m", "h", True)


def test_config_toml_gives_the_defaults_of_config_key_flags(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[model]\nmodel = "hf-dir"\nload = "ckpt-root"\n[data]\nsystem = "Be brief."\n'
                   '[parallel]\ntensor_model_parallel_size = 2\n')
    a = command_line("infer").parse([str(job), "--temperature", "0.5"])
    assert (a.model, a.system, a.temperature) == ("hf-dir", "Be brief.", 0.5)
    assert command_line("infer").parse([str(job), "--system", "other"]).system == "other"  # flags win
    a = command_line("reshard").parse([str(job), "--out", "o"])  # CKPT = model.load, TP/PP = the job's
    assert (a.ckpt, a.tp, a.pp) == ("ckpt-root", 2, 1)
    conversion = tmp_path / "export.toml"  # [export] keys belong to export's own config (sft refuses them)
    conversion.write_text('[model]\nmodel = "hf-dir"\n[export]\noutput_dir = "out"\n')
    a = command_line("export").parse([str(conversion), "--to_mcore"])
    assert (a.model, a.output_dir, a.to_mcore, a.overwrite) == ("hf-dir", "out", True, False)
    job.write_text(job.read_text() + '[checkpoint]\nsave = "runs/qwen"\n')
    assert command_line("plot").parse([str(job)]).run == "runs/qwen"  # RUN = the job's save root
    a = command_line("plan").parse([str(job), "--lr", "1e-4"])  # all-keys commands: any key
    assert a.cfg.train.lr == 1e-4 and a.cfg.parallel.tensor_model_parallel_size == 2


def test_errors_are_one_line_config_errors_naming_the_flag():
    with pytest.raises(ConfigError, match=r"unknown flag --tempreature\. Did you mean --temperature\?"):
        command_line("infer").parse(["--model", "m", "--tempreature", "1"])
    with pytest.raises(ConfigError, match="--tp is required"):
        command_line("reshard").parse(["ck", "--pp", "1", "--out", "o"])
    with pytest.raises(ConfigError, match=r"--tp: 'two' is not a valid value"):
        command_line("reshard").parse(["ck", "--tp", "two", "--pp", "1", "--out", "o"])
    with pytest.raises(ConfigError, match="expected true or false"):
        command_line("export").parse(["--to_hf", "maybe", "--output_dir", "o"])
    with pytest.raises(ConfigError, match=r"--format: 'zarr' is not one of torch_dist, torch"):
        command_line("reshard").parse(["ck", "--tp", "1", "--pp", "1", "--out", "o", "--format", "zarr"])
    with pytest.raises(ConfigError, match="unexpected argument 'extra'"):
        command_line("templates").parse(["dir", "extra"])
    with pytest.raises(ConfigError, match="Did you mean 'lr_warmup_iters'"):  # all-keys: the config's message
        command_line("plan").parse(["--lr_warmup_iter", "3"])


def test_list_flags_take_values_and_repeat():
    a = command_line("infer").parse(["--model", "m", "--query", "a", "b", "--query", "c", "--val_dataset", "x#2"])
    assert a.query == ["a", "b", "c"] and a.val_dataset == ["x#2"]


def test_submit_one_node_passes_the_other_flags_through_in_order(capsys):
    from hpctrain.launch.submit import one_node_command_line, run

    argv = ["job.toml", "--model", "M", "--dry-run", "--to_mcore", "true", "--gpus=0", "--output_dir", "D"]
    a = one_node_command_line("export").parse(argv)
    assert (a.dry_run, a.gpus) == (True, 0)
    assert a.rest == ["job.toml", "--model", "M", "--to_mcore", "true", "--output_dir", "D"]
    assert run(["export", "--model", "M", "--dry_run", "--gpus", "0"]) == 0  # dry run: no job folder made
    out = capsys.readouterr().out
    assert "#SBATCH" in out and "--gres" not in out and "gpus" not in out


def _cli(args, cwd=ROOT, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "hpctrain", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def test_prep_with_model_and_dataset_flags_only(tmp_path):
    """The issue's case: the first value after --model used to be taken for the config file."""
    r = _cli(["prep", "--model", str(TOKENIZER), "--dataset", f"{SC}#20", "--prep-dir", str(tmp_path / "shards"),
              "--max_length=256", "--model_name", "小黄", "Bot", "--model-author", "魔搭", "Acme"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train: 20 samples" in r.stdout and (tmp_path / "shards" / "manifest.json").is_file()


def test_plan_dashes_and_underscores_print_the_same_plan():
    a = _cli(["plan", "--nodes", "2", "--gpus-per-node", "4", "--model", QWEN, "--global_batch_size", "16"])
    b = _cli(["plan", "--nodes=2", "--gpus_per_node=4", "--model", QWEN, "--global-batch-size", "16"])
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and "(2 nodes x 4)" in a.stdout


def test_doctor_with_a_job_config_checks_its_files(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'[model]\nmodel = "{TOKENIZER}"\n[data]\ndataset = ["{SC}#5", "{tmp_path}/missing.jsonl", '
                   f'"{tmp_path}/shards-*.parquet", "AI-ModelScope/alpaca-gpt4-data-en"]\n'
                   'model_name = ["小黄", "Bot"]\nmodel_author = ["魔搭", "Acme"]\n')
    r = _cli(["doctor", str(job)])
    assert r.returncode == 1, r.stdout
    assert "[ok  ] model.model" in r.stdout and f"[ok  ] dataset {SC}#5" in r.stdout
    assert f"[FAIL] dataset {tmp_path}/missing.jsonl" in r.stdout and "no such file" in r.stdout
    assert "no file matches" in r.stdout and "[ok  ] dataset AI-ModelScope/alpaca-gpt4-data-en" in r.stdout
    (tmp_path / "shards-0.parquet").write_bytes(b"x")
    (tmp_path / "missing.jsonl").write_text("{}\n")
    assert _cli(["doctor", str(job)]).returncode == 0


def test_unknown_flag_of_a_non_training_command_exits_2_in_one_line():
    r = _cli(["templates", "somewhere", "--overwirte"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Did you mean --overwrite?" in r.stderr
