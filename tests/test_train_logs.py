"""Training log lines: a metric that is off is not printed (no ``lm nan``); a NaN loss is."""
import csv
import math

from nemo_minitron.train.logs import MetricsLogger


def test_off_metrics_are_left_out_but_a_nan_loss_is_shown(tmp_path, capsys):
    log = MetricsLogger(str(tmp_path), enabled=True, total_steps=2, progress_bar=False,
                        extra_columns=("kl", "lm"))
    log.log(1, "train", loss=1.5, lr=1e-3, grad_norm=math.nan, kl=0.25, lm=math.nan)
    log.log(2, "train", loss=math.nan, lr=1e-3, grad_norm=None, kl=0.5, lm=2.0)
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step 1 train: loss 1.5 lr 0.001 kl 0.25"
    assert lines[1] == "step 2 train: loss nan lr 0.001 kl 0.5 lm 2"
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows[0]["lm"] == "" and rows[0]["grad_norm"] == "" and rows[0]["kl"] == "0.25"
    assert rows[1]["loss"] == "nan" and rows[1]["lm"] == "2"
