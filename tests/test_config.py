"""--set parsing, the tune folder, and progress output that stays readable off a terminal."""
from __future__ import annotations

import io

import pytest

from shared import config as config_mod
from shared import progress
from shared.paths import tune_dir


def test_parse_overrides_reads_toml_values_and_refuses_a_bare_key():
    assert config_mod.parse_overrides(["lr=3e-4", " epochs = 2", "representation=rows", "amp_cuda=false",
                                       "teacher=a,b", "lr=1e-3"]) == \
        {"lr": 1e-3, "epochs": 2, "representation": "rows", "amp_cuda": False, "teacher": "a,b"}
    assert config_mod.parse_overrides([]) == {}
    with pytest.raises(ValueError, match=r"--set 'epochs': expected KEY=VALUE"):
        config_mod.parse_overrides(["epochs"])


def test_tuned_config_lives_in_the_tune_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ARTIFACTS", str(tmp_path))
    assert tune_dir("vit") == tmp_path.resolve() / "tune" / "vit"
    assert config_mod.tuned_path("vit") == tune_dir("vit") / "best_config.toml"


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_bar_only_on_a_terminal(monkeypatch):
    items = [1, 2, 3]
    monkeypatch.setattr("sys.stderr", _Stream(tty=False))
    assert progress.bar(items, "x") is items  # a log file gets no carriage-return frames
    progress.postfix(items, loss="0.1")  # no bar: nothing to do
    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    assert progress.bar(items, "x", enabled=False) is items  # --no-progress
    drawn = progress.bar(items, "x")
    assert drawn is not items and list(drawn) == items


def test_epoch_line_has_what_a_log_reader_needs():
    from models.train import epoch_line

    record = {"epoch": 3, "train_loss": 0.41234, "val_macro_auc": 0.8012, "seconds": 12.345}
    state = {"best_auc": 0.8123, "best_epoch": 1}
    assert epoch_line("run", record, state, improved=False) == \
        "run epoch 3: loss 0.4123 val macro AUC 0.8012, 12.3 s, best 0.8123 (epoch 2)"
