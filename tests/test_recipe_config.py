"""The one config precedence rule: defaults < YAML < values < key=value overrides."""
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from nemo_minitron.config.recipe import load_config, to_dict
from nemo_minitron.errors import ConfigError


@dataclass
class Inner:
    steps: int = 10
    lr: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])


@dataclass
class Job:
    model: str
    prompt: str = ""
    out: Optional[str] = None
    greedy: bool = False
    inner: Inner = field(default_factory=Inner)


def test_precedence(tmp_path):
    y = tmp_path / "job.yaml"
    y.write_text("model: from_yaml\ninner:\n  steps: 20\n  lr: 1\n")
    cfg = load_config(Job, str(y), ["inner.steps=30", "prompt=42", "greedy=true", "out=null",
                                    "inner.lr=3e-3"],
                      values={"model": "from_flag", "inner": {"steps": 25}})
    assert cfg.model == "from_flag" and cfg.inner.steps == 30
    assert cfg.inner.lr == 3e-3  # YAML 1.1 would leave "3e-3" a string
    assert cfg.prompt == "42" and cfg.greedy is True and cfg.out is None
    assert cfg.inner.betas == [0.9, 0.98]
    assert to_dict(cfg)["inner"] == {"steps": 30, "lr": 3e-3, "betas": [0.9, 0.98]}
    assert load_config(Job, str(y)).inner.lr == 1.0  # an int in YAML is promoted


@pytest.mark.parametrize("overrides, message", [
    (["inner.stepz=3"], "unknown config key 'inner.stepz' for Inner"),
    (["modle=x"], "unknown config key 'modle' for Job"),
    (["inner.steps=many"], "inner.steps='many' must be of type int"),
    (["inner.betas=0.9"], "inner.betas=0.9 must be a list"),
    (["greedy"], "not of the form key=value"),
    (["model=x", "inner=3"], "inner must be a mapping"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(Job, None, ["model=m"] + overrides)


def test_required_key():
    with pytest.raises(ConfigError, match="required key.*model"):
        load_config(Job)


def test_a_shipped_name_is_found_next_to_a_directory_of_that_name(tmp_path, monkeypatch):
    """`--config tiny` in a directory holding a `tiny/` output (the documented pipeline) names the
    shipped config; a file of that name would win."""
    from nemo_minitron.config.recipe import CONF_DIR, find_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert find_config("tiny", "prune") == f"{CONF_DIR}/prune/tiny.yaml"
    (tmp_path / "mine.yaml").write_text("tp: 1\n")
    assert find_config("mine.yaml", "prune") == "mine.yaml"
    with pytest.raises(ConfigError, match="no shipped config of that name"):
        find_config("nonesuch", "prune")
