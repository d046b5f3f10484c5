from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from unclip.config import ConfigError, config_to_dict, load_config, replace_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class Outer:
    name: str
    steps: int = 10
    clip: float | None = None
    inner: Inner = field(default_factory=Inner)


def test_nested_load_and_round_trip():
    cfg = load_config(Outer, {"name": "x", "inner": {"lr": 3, "betas": [0.5, 0.6]}})
    assert cfg.inner.lr == 3.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.betas == (0.5, 0.6)
    assert load_config(Outer, config_to_dict(cfg)) == cfg


def test_unknown_key_names_key_suggestion_and_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(Outer, {"name": "x", "inner": {"lrr": 1.0}})
    msg = str(e.value)
    assert "inner.lrr" in msg and "Did you mean 'lr'" in msg and "schedule" in msg


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"name": "x", "steps": "ten"}, "steps: expected an integer"),
        ({"name": "x", "steps": True}, "steps: expected an integer"),
        ({"name": "x", "inner": {"schedule": "linear"}}, "'linear' is not one of 'cosine', 'constant'"),
        ({"name": "x", "inner": {"betas": [0.9]}}, "expected 2 items"),
        ({"steps": 3}, "missing required config key 'name'"),
        ({"name": "x", "clip": "big"}, "clip"),
    ],
)
def test_bad_values_are_named(data, fragment):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(Outer, data)
    assert fragment in str(e.value)


def test_yaml_file_scientific_notation_and_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: y\ninner:\n  lr: 1e-3\n")  # YAML 1.1 reads 1e-3 as a string
    assert load_config(Outer, path).inner.lr == pytest.approx(1e-3)
    path.write_text("name: y\nbogus: 1\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_dotted_overrides_are_validated():
    cfg = load_config(Outer, {"name": "x"})
    assert replace_config(cfg, {"inner.lr": 0.5}).inner.lr == 0.5
    with pytest.raises(ConfigError, match="inner.nope"):
        replace_config(cfg, {"inner.nope": 1})


def test_every_shipped_clip_config_loads():
    from unclip.clip.training import TrainClipConfig

    paths = sorted((CONFIGS / "clip").glob("*.yaml"))
    assert paths, "no CLIP configs shipped"
    for path in paths:
        load_config(TrainClipConfig, path)


def test_overrides_of_a_misspelt_section_suggest_the_section_and_optional_fields_say_why():
    cfg = load_config(Outer, {"name": "x"})
    with pytest.raises(ConfigError, match=r"'innr.lr': 'innr' is not a section. Did you mean 'inner'\?"):
        replace_config(cfg, {"innr.lr": 0.5})
    with pytest.raises(ConfigError, match="clip: expected a number, got 'big'"):  # was "fits none of Optional"
        load_config(Outer, {"name": "x", "clip": "big"})


def test_annotated_fields_are_checked_with_their_key_path():
    from typing import Annotated

    def no_bad_keys(value, where):
        if "bad" in value:
            raise ConfigError(f"{where}.bad is bad")

    @dataclass(frozen=True)
    class Holder:
        extra: Annotated[dict, no_bad_keys] | None = None

    @dataclass(frozen=True)
    class Top:
        holder: Holder = field(default_factory=Holder)

    assert load_config(Top, {"holder": {"extra": {"good": 1}}}).holder.extra == {"good": 1}
    with pytest.raises(ConfigError, match=r"^holder.extra.bad is bad$"):
        load_config(Top, {"holder": {"extra": {"bad": 1}}})
