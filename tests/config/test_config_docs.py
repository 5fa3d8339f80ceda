"""docs/config.md stays true: its generated key reference matches the code and its TOML example loads."""
import re
from pathlib import Path

from hpctrain.config import FIELD_SECTION, load_config
from hpctrain.config.reference import MARKER, reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_reference_is_current():
    text = DOC.read_text(encoding="utf-8")
    assert MARKER in text
    generated = text.split(MARKER, 1)[1].lstrip("\n")
    assert generated == reference(), "regenerate: see docs/config.md's marker line"
    for name in FIELD_SECTION:
        assert f"| `{name}` |" in generated


def test_doc_toml_example_loads(tmp_path):
    block = re.search(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S).group(1)
    path = tmp_path / "doc.toml"
    path.write_text(block, encoding="utf-8")
    cfg = load_config(path, environ={})
    assert cfg.slurm.env == {"NCCL_DEBUG": "WARN"} and cfg.data.model_author == ["魔搭", "swift"]
