"""Property test: any well-typed config (hostile strings, unicode, big/small floats, dicts) survives
dump_toml / dump_json and reads back equal."""
import dataclasses
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpctrain.config import SECTIONS, JobConfig, dump_json, dump_toml, read_config
from hpctrain.config.coerce import field_type, split_optional
from hpctrain.config.fields import field_choices, field_unsupported

# "none"/"null" in an optional field means None (documented), so those exact strings are left out.
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12).filter(
    lambda s: s.strip().lower() not in ("none", "null"))
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)


def strategy_for(section: str, f: dataclasses.Field):
    inner, optional = split_optional(field_type(section, f.name))
    choices = field_choices(f)
    if typing.get_origin(inner) is list:
        item = typing.get_args(inner)[0]
        base = st.lists(st.sampled_from(choices) if choices else {str: text, float: floats}[item], max_size=3)
    elif inner is dict or typing.get_origin(inner) is dict:
        base = st.dictionaries(text, text, max_size=3)
    elif choices:
        base = st.sampled_from([c for c in choices if not (optional and c == "none")])
    else:
        base = {bool: st.booleans(), int: st.integers(-2**62, 2**62), float: floats, str: text}[inner]
    return st.one_of(st.none(), base) if optional else base


@st.composite
def configs(draw):
    cfg = JobConfig()
    for sec in SECTIONS:
        obj = getattr(cfg, sec)
        for f in dataclasses.fields(obj):
            # leave about half the keys at their defaults, and the keys of features that are not built
            # (refused, left out of dumps) always
            if not field_unsupported(f) and draw(st.booleans()):
                setattr(obj, f.name, draw(strategy_for(sec, f)))
    return cfg


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs())
def test_any_config_round_trips(tmp_path, cfg):
    dump_toml(cfg, tmp_path / "c.toml")
    dump_json(cfg, tmp_path / "c.json")
    assert read_config(tmp_path / "c.toml") == cfg
    assert read_config(tmp_path / "c.json") == cfg
