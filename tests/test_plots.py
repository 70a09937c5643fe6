"""plots.py's command line: curves of train.py's logs (log.jsonl), as run by a user.

    python -m pytest tests/test_plots.py -q

The command runs in this process (run_main: misc.run_cli with sys.argv set). The training curve that train.py
redraws is tests/test_train_runs.py's; eval.py's plots are tested with eval.py.
"""
import pytest

from conftest import assert_one_line_error


def test_plots_draw_dollar_signs_as_text_and_skip_values_that_are_not_numbers(tmp_path, run_main):
    pytest.importorskip("matplotlib")
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 1, "loss": null, "lr": "0.1"}\n{"epoch": 2, "loss": 3.0, "lr": 0.001, "mAP": true}\n')
    result = run_main("plots.py", "run $a^$=" + str(log), "--output", tmp_path / "p.png", "--title", "lr $a^$")
    assert result.returncode == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    result = run_main("plots.py", "a=" + str(log), "a=" + str(log), "--output", tmp_path / "q.png")
    assert_one_line_error(result, "plots.py", "the name 'a' is given twice")


def test_an_output_that_is_one_of_its_logs_is_refused(tmp_path, run_main):
    (tmp_path / "log.jsonl").write_text('{"epoch": 1, "loss": 3.0, "lr": 0.001}\n')
    result = run_main("plots.py", "a=" + str(tmp_path / "log.jsonl"), "--output", tmp_path / "log.jsonl")
    assert_one_line_error(result, "plots.py", ["log.jsonl", "which this run reads"])
    assert (tmp_path / "log.jsonl").read_text() == '{"epoch": 1, "loss": 3.0, "lr": 0.001}\n'
