import subprocess
import sys
from pathlib import Path

from plasticity.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_validate_accepts_the_smoke_config(capsys):
    assert main(["validate", "--config", str(ROOT / "configs/smoke.yaml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_unknown_key_exits_2_names_it_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"storage:\n  uri: file://{tmp_path}/store\ntrain:\n  learning_rate: 0.1\n")
    assert main(["validate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate: unknown key" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_run_with_a_bad_config_exits_2_before_any_work(tmp_path, capsys):
    cfg = ROOT / "configs/smoke.yaml"
    code = main(["run", "--config", str(cfg), "--storage", f"file://{tmp_path}/s", "--set", "train.lr=-1"])
    assert code == 2
    assert "train.lr: expected a positive number, got -1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_run_id_with_path_characters_exits_2(tmp_path, capsys):
    code = main(["run", "--config", str(ROOT / "configs/smoke.yaml"), "--storage", f"file://{tmp_path}/s",
                 "--run-id", "../escape"])
    assert code == 2
    assert "run_id" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_help_of_each_command():
    for args in (["--help"], ["run", "--help"], ["validate", "--help"]):
        out = subprocess.run([sys.executable, "-m", "plasticity.cli", *args], capture_output=True, text=True)
        assert out.returncode == 0 and "--config" in out.stdout or args == ["--help"]
    out = subprocess.run([sys.executable, "-m", "plasticity.cli"], capture_output=True, text=True)
    assert out.returncode == 2
