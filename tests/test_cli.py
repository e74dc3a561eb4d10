from typer.testing import CliRunner

from leukodiff.cli import app

runner = CliRunner()


def test_data_summary_prints_every_source_and_the_skipped_boxes(shared_data):
    result = runner.invoke(app, ["data", "summary", "--data-root", str(shared_data)])
    assert result.exit_code == 0, result.output
    out = result.output
    for line in ("bccd", "kbc", "pbc", "bcd", "TEST_SIMPLE", "9957", "7144"):
        assert line in out
    assert "BloodImage_00338.xml" in out and "degenerate" in out
    assert "pbc: 10 sets of exact-duplicate images" in out


def test_missing_data_root_is_one_clear_message(tmp_path):
    result = runner.invoke(app, ["data", "summary", "--data-root", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert "data root not found" in result.output
    assert "Traceback" not in result.output


def test_partial_data_root_reports_the_missing_sets(tmp_path, shared_data):
    (tmp_path / "bcd").symlink_to(shared_data / "bcd")
    result = runner.invoke(app, ["data", "summary", "--data-root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "data set 'pbc' not found" in result.output
    assert "103" in result.output


def test_module_entry_point_knows_the_station_commands():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "leukodiff.cli", "serve", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "No such command" not in done.stdout + done.stderr and "--data-dir" in done.stdout


def test_analyzer_is_importable_from_the_package():
    import leukodiff
    from leukodiff import Analyzer
    from leukodiff.pipeline.analyzer import Analyzer as Direct

    assert Analyzer is Direct and "Analyzer" in leukodiff.__all__


def test_train_score_refuses_what_it_cannot_rescore(tmp_path):
    """`train score` never overwrites a detector, and names a missing one."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "detector.pt").write_bytes(b"someone's detector")
    result = runner.invoke(app, ["train", "score", "--out", str(tmp_path / "taken")])
    assert result.exit_code == 1 and "already holds a detector" in result.output
    assert (tmp_path / "taken" / "detector.pt").read_bytes() == b"someone's detector"
    result = runner.invoke(app, ["train", "score", "--detector", str(tmp_path / "none.pt"),
                                 "--out", str(tmp_path / "new")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "none.pt" in result.output and not (tmp_path / "new").exists()
