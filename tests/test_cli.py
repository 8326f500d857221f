"""Issue 20's command-line leftovers: `--help` of every command answers without TensorFlow;
progress is a bar on a terminal, plain lines in a log and nothing under --quiet or --json;
LiteRT's "Created TensorFlow Lite XNNPACK delegate" line obeys TF_CPP_MIN_LOG_LEVEL."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_models import model_file, write_images
from edge_runtime import console
from edge_runtime.cli import main as edge_main

REPO_ROOT = Path(__file__).resolve().parent.parent
# A user who has not set TF_CPP_MIN_LOG_LEVEL (conftest sets it for the tests).
USER_ENV = {**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
            "PYTHONPATH": str(REPO_ROOT), "CUDA_VISIBLE_DEVICES": ""}


# --------------------------------------------------------------------- --help without TensorFlow

def test_every_commands_help_imports_no_tensorflow(tmp_path):
    """Each command's --help in turn, in one fresh interpreter, from a folder outside the
    repository: the first command whose parser pulls TensorFlow in is named."""
    probe = ("import contextlib, io, sys\n"
             "from oncolite.cli import COMMANDS, main\n"
             "for name in COMMANDS:\n"
             "    out = io.StringIO()\n"
             "    with contextlib.redirect_stdout(out):\n"
             "        try:\n"
             "            main([name, '--help'])\n"
             "        except SystemExit:\n"
             "            pass\n"
             "    heavy = sorted(m for m in ('tensorflow', 'tf_keras', 'tensorflow_model_optimization') if m in sys.modules)\n"
             "    print(name, 'usage:' in out.getvalue(), ','.join(heavy) or '-')\n")
    result = subprocess.run([sys.executable, "-c", probe], env=USER_ENV, cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    from oncolite.cli import COMMANDS

    assert [row[0] for row in rows] == list(COMMANDS)
    assert [row for row in rows if row[1:] != ["True", "-"]] == []
    assert result.stderr == ""


# --------------------------------------------------------------------- progress

@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return model_file(tmp_path_factory.mktemp("model"), "int8")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, n=3, size=16)
    return folder


def test_a_log_gets_plain_progress_lines_not_a_bar(model, images, monkeypatch, capsys):
    """stderr captured (not a terminal), a line due at every step: one plain line per image,
    then one saying it is done; no carriage return anywhere."""
    monkeypatch.setattr(console, "LINE_EVERY", 0.0)
    assert edge_main(["predict", str(model), str(images), "--csv"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("predict: ")]
    assert "\r" not in err
    assert [line.split(",")[0] for line in lines] == ["predict: 1/3 img (33 %)", "predict: 2/3 img (67 %)",
                                                      "predict: 3/3 img (100 %)", "predict: 3/3 img (100 %)"]
    assert "done in" in lines[-1] and "done in" not in lines[-2]


def test_short_work_prints_no_progress_line_in_a_log(model, images, capsys):
    assert edge_main(["predict", str(model), str(images), "--csv"]) == 0
    assert "predict:" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_quiet_and_json_print_no_progress_and_json_is_all_stdout_holds(flag, model, images, monkeypatch, capsys):
    monkeypatch.setattr(console, "LINE_EVERY", 0.0)
    assert edge_main(["predict", str(model), str(images), flag]) == 0
    out, err = capsys.readouterr()
    assert "predict:" not in err
    if flag == "--json":
        assert [json.loads(line)["type"] for line in out.splitlines()] == ["model", "result", "result", "result", "summary"]


def test_a_terminal_gets_a_bar(monkeypatch):
    assert isinstance(console.progress(range(3), desc="x"), console.ProgressLines)  # pytest's stderr: not a terminal
    monkeypatch.setattr(console, "_is_terminal", lambda stream: True)
    bar = console.progress(range(3), desc="x")
    assert not isinstance(bar, console.ProgressLines) and type(bar).__name__ == "tqdm"
    bar.close()


# --------------------------------------------------------------------- LiteRT's log line

def _predict_stderr(model, image, env) -> str:
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "predict", os.fspath(model), os.fspath(image), "--quiet"],
                            env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_a_reader_that_goes_away_ends_the_output_without_a_traceback(model, tmp_path):
    write_images(tmp_path / "many", n=40, size=16)
    command = (f"{sys.executable} -m edge_runtime predict {os.fspath(model)} {tmp_path / 'many'} --csv | head -2; "
               "echo status=${PIPESTATUS[0]}")
    result = subprocess.run(["bash", "-c", command], env=USER_ENV, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert len(result.stdout.splitlines()) == 3 and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.stdout.splitlines()[-1] in ("status=0", "status=141")  # 0 only if it all fit the pipe's buffer first


def test_litert_delegate_line_is_silent_by_default_and_shown_at_log_level_0(model, images):
    image = next(images.glob("*.png"))
    assert _predict_stderr(model, image, USER_ENV) == ""
    assert "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." in \
        _predict_stderr(model, image, {**USER_ENV, "TF_CPP_MIN_LOG_LEVEL": "0"})


def test_the_filter_keeps_litert_warnings_and_errors(capfd):
    lines = (b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
             b"VERBOSE: Replacing 66 out of 66 node(s) with delegate\n"
             b"WARNING: op version too new\n"
             b"ERROR: Didn't find op for builtin opcode\n")
    with console.native_stderr_filtered(1):
        os.write(2, lines)
    assert capfd.readouterr().err == "WARNING: op version too new\nERROR: Didn't find op for builtin opcode\n"


# --------------------------------------------------------------------- one grammar (issue 16)

def parser_of(name: str):
    import argparse
    import importlib

    from oncolite.cli import COMMANDS

    parser = argparse.ArgumentParser(prog=f"oncolite {name}")
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    return parser


def positionals(parser) -> list[str]:
    return [a.metavar or a.dest for a in parser._actions if not a.option_strings]


def options(parser) -> set[str]:
    return {o for a in parser._actions if a.help != "==SUPPRESS==" for o in a.option_strings}


RUN_COMMANDS = ("run", "train", "explain", "quantize", "export", "benchmark")
CONFIG_COMMANDS = {"run": None, "train": None, "quantize": "qat", "export": "export", "benchmark": "benchmark"}


def test_oncolite_help_lists_every_command_once_by_stage(capsys):
    from oncolite.cli import COMMANDS, GROUPS, main

    listed = [name for names in GROUPS.values() for name in names]
    assert sorted(listed) == sorted(COMMANDS) and len(listed) == len(set(listed))
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for heading in GROUPS:
        assert f"\n{heading}:\n" in out
    benchmark, bench = (next(line for line in out.splitlines() if line.split()[:1] == [name]) for name in ("benchmark", "bench"))
    assert "full report" in benchmark and "`bench`" in benchmark and "`oncolite benchmark`" in bench


@pytest.mark.parametrize("argv, expected", [
    (["predict", "x.png", "--jsn"], "unrecognized arguments: --jsn (did you mean '--json'"),
    (["config", "--profile", "quik"], "invalid choice: 'quik'"),
    (["--json", "predict", "x.png"], "options go after the command: oncolite predict ... --json"),
])
def test_a_usage_mistake_is_one_line_with_the_fix(capsys, argv, expected):
    from oncolite.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exit, through CommandParser.error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_help_before_a_command_shows_its_help(capsys):
    from oncolite.cli import main

    with pytest.raises(SystemExit) as done:
        main(["help", "info"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: oncolite info")


def test_the_run_directory_is_the_first_argument():
    for name in RUN_COMMANDS:
        assert positionals(parser_of(name))[0].startswith("RUN_DIR"), name


def test_a_word_means_one_thing():
    """--threshold is evaluate's decision threshold only (audit's Hamming distance is --hash-distance);
    --threads is interpreter threads: one count where one interpreter runs, a list where timing runs."""
    from oncolite.cli import COMMANDS

    parsers = {name: parser_of(name) for name in COMMANDS}
    assert [n for n, p in parsers.items() if "--threshold" in options(p)] == ["evaluate"]
    assert {n for n, p in parsers.items() if "--hash-distance" in options(p)} == {"audit", "split"}
    for name, parser in parsers.items():
        threads = next((a for a in parser._actions if "--threads" in a.option_strings), None)
        if threads is not None:
            assert (threads.type is int) == (name in ("predict", "serve", "slidemap")), name
            assert "interpreter thread" in threads.help, name


def test_every_command_that_reads_config_takes_set_and_names_only_config_keys():
    from oncolite.train.config import DEFAULTS_PATH, read_config_file

    defaults = read_config_file(DEFAULTS_PATH)
    for name, section in CONFIG_COMMANDS.items():
        parser = parser_of(name)
        assert "--set" in options(parser), name
        text = parser.format_help()
        if section:
            named = re.findall(rf"\b{section}\.(\w+)", " ".join(text.split()))
            assert named and set(named) <= set(defaults[section]), (name, named)
        # "(default: config x.y)" in any help names a real key
        for key in re.findall(r"default: config ([\w.]+)\)", " ".join(text.split())):
            node = defaults
            for part in key.split("."):
                node = node[part]


def test_stage_set_reads_its_own_section_with_the_configs_rules():
    from oncolite.train.config import ConfigError, load_config, with_overrides

    config = load_config()
    assert with_overrides(config, ["qat.epochs=2"], "qat")["qat"]["epochs"] == 2
    with pytest.raises(ConfigError, match="--set input_size: `oncolite quantize` reads only the qat.* settings"):
        with_overrides(config, ["input_size=128"], "qat")
    with pytest.raises(ConfigError, match=r"--set: qat.epochs=-1 must be"):
        with_overrides(config, ["qat.epochs=-1"], "qat")
    with pytest.raises(ConfigError, match="unknown config key 'export.nope'"):
        with_overrides(config, ["export.nope=1"], "export")


def test_variants_table_config_and_export_flag_agree():
    from edge_runtime.variants import SELECTABLE, VARIANTS
    from oncolite.quantize.export import parse_variants
    from oncolite.train.config import ConfigError, load_config, with_overrides

    config = load_config()
    assert set(config["export"]["variants"]) <= set(SELECTABLE) <= set(VARIANTS)
    for name in SELECTABLE:  # every name --variants takes is a row of the table and a valid config value
        assert parse_variants(name, []) == [name]
        assert with_overrides(config, [f'export.variants=["{name}"]'], "export")["export"]["variants"] == [name]
    for name in (*[n for n in VARIANTS if n not in SELECTABLE], "int4"):
        with pytest.raises(Exception):
            parse_variants(name, [])
        with pytest.raises(ConfigError):
            with_overrides(config, [f'export.variants=["{name}"]'], "export")
    assert ", ".join(SELECTABLE) in parser_of("export")._option_string_actions["--variants"].help


# --------------------------------------------------------------------- old spellings keep working

def test_old_spellings_map_onto_the_grammar_with_a_note(tmp_path, capsys):
    from oncolite.pipeline import given_run_and_data
    from oncolite.train.train import given_run_dir

    args = parser_of("train").parse_args(["--run", "runs/r1", "--manifest", "m.json"])
    args.command = "oncolite train"
    assert given_run_dir(args) == "runs/r1"
    assert "oncolite train: note: --run runs/r1 is the old spelling; write oncolite train runs/r1" in capsys.readouterr().err
    assert given_run_dir(parser_of("train").parse_args(["--resume", "runs/r1"])) == "runs/r1"  # same words, new grammar

    data = tmp_path / "data"
    (data / "benign").mkdir(parents=True)
    (data / "benign" / "a.png").write_bytes(b"")
    for argv, expected in ((["runs/x"], ("runs/x", None)),                      # a new run directory
                           ([str(data)], (None, data)),                         # old: run DATA
                           ([str(data), "--run", "r"], ("r", data)),            # old: run DATA --run R
                           (["r", "--data", str(data)], ("r", data))):          # new
        run_dir, got = given_run_and_data(parser_of("run").parse_args([*argv, "--quiet"]))
        assert (run_dir, None if expected[1] is None else got) == expected, argv

    assert parser_of("audit").parse_args(["d", "--threshold", "4"]).old_hash_distance == 4
    assert parser_of("audit").parse_args(["d", "--hash-distance", "4"]).hash_distance == 4
