"""The ``wff`` command line as a whole: every command's --help against README.md's table of commands,
one meaning per option, exit codes 0 / 1 / 2 and the one error format, and the demo's closing message."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from wff.cli import COMMANDS, DEV_COMMANDS, WffError, main, write_json
from wff.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
# a command or subcommand name in a table row, alternatives joined by | (escaped in markdown tables as \|)
COMMAND_WORD = re.compile(r"^[a-z][a-z0-9-]*(?:\\?\|[a-z][a-z0-9-]*)*$")


def parse_command_table(markdown: str) -> set[tuple[str, ...]]:
    """The command paths named by the rows of the "## Commands" section's table: each row starts with
    "| `wff COMMAND [SUBCOMMAND] ...", its leading lower-case words are the path (``a\\|b`` names both)."""
    section = re.search(r"^## Commands[ \t]*\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    if section is None:
        raise ValueError('no "## Commands" section')
    found: set[tuple[str, ...]] = set()
    for line in section.group(1).splitlines():
        if not line.startswith("| `wff "):
            continue
        words = line[len("| `"):].split("`", 1)[0].split()[1:]
        paths = {()}
        for word in words:
            if not COMMAND_WORD.match(word):
                break
            paths = {p + (alt,) for p in paths for alt in re.split(r"\\?\|", word)}
        found |= paths - {()}
    return found


def cli_commands(group: click.Group = main, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], click.Command]:
    """Every command and subcommand of ``group`` by path, groups included."""
    ctx = click.Context(group, info_name="wff")
    found = {}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        found[prefix + (name,)] = command
        if isinstance(command, click.Group):
            found |= cli_commands(command, prefix + (name,))
    return found


COMMAND_PATHS = cli_commands()
LEAVES = {path for path, command in COMMAND_PATHS.items() if not isinstance(command, click.Group)}


def options(command: click.Command) -> dict[str, click.Option]:
    return {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts}


class TestCommandTable:
    FIXTURE = """# spine-wff

## Commands

| command | what it does |
| --- | --- |
| `wff data synth OUT [--size demo\\|paper]` | synthetic data |
| `wff serve [--artifacts DIR]` | serve |
| `wff trt build\\|check REPOSITORY` | plans |
| `wff dev parity DATASET ARTIFACTS [--json FILE\\|-]` | parity |
| `wff demo` | everything |

Text mentioning `wff evaluate` outside the table.

## Next section

| `wff metrics` | a table in another section does not count |
"""

    def test_parser_reads_paths_and_alternatives(self):
        """Leading lower-case words are the path; a\\|b names both; placeholders, options and other sections are not read."""
        assert parse_command_table(self.FIXTURE) == {
            ("data", "synth"), ("serve",), ("trt", "build"), ("trt", "check"), ("dev", "parity"), ("demo",)}

    def test_parser_needs_the_section(self):
        """A README without "## Commands" is an error, not an empty table."""
        with pytest.raises(ValueError, match="Commands"):
            parse_command_table("# spine-wff\n\n| `wff demo` | x |\n")

    def test_every_command_is_in_the_readme(self):
        """Each command and subcommand of the CLI has a row in README.md's table of commands."""
        table = parse_command_table((ROOT / "README.md").read_text())
        missing = sorted(" ".join(p) for p in LEAVES if p not in table)
        assert not missing, f"commands without a row in README.md's ## Commands table: {missing}"

    def test_every_readme_row_is_a_command(self):
        """Each row of README.md's table names a command that exists."""
        table = parse_command_table((ROOT / "README.md").read_text())
        unknown = sorted(" ".join(p) for p in table if p not in COMMAND_PATHS)
        assert not unknown, f"README.md's ## Commands table names commands that do not exist: {unknown}"


class TestHelp:
    @pytest.mark.parametrize("path", sorted(COMMAND_PATHS), ids=" ".join)
    def test_help(self, path):
        """Every command and subcommand answers --help with its usage line."""
        result = CliRunner().invoke(main, [*path, "--help"], prog_name="wff")
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"Usage: wff {' '.join(path)} ")

    def test_top_level_and_dev(self):
        """The user's commands at the top level; the model-development tools only under wff dev."""
        assert set(COMMANDS) == {"data", "train", "repo", "serve", "diagnose", "evaluate", "metrics", "bench", "soak", "trt", "demo", "dev", "pacs"}
        assert set(DEV_COMMANDS) == {"parity", "refit-fusion"}
        for old in [*DEV_COMMANDS, "export-folds"]:
            result = CliRunner().invoke(main, [old, "--help"])
            assert result.exit_code == 2 and "No such command" in result.output
        removed = CliRunner().invoke(main, ["dev", "export-folds", "--help"])  # fold models are no longer served
        assert removed.exit_code == 2 and "No such command" in removed.output

    @pytest.mark.parametrize("args, banned", [
        ("diagnose evaluate metrics", ("torch", "torchvision", "openvino", "onnxruntime", "onnx", "pytriton", "wff.training", "wff.serving.server")),
        ("--help dev", ("torch", "torchvision", "openvino", "onnxruntime", "onnx", "pytriton")),
    ])
    def test_help_imports_no_model_code(self, args, banned):
        """The thin client's commands load neither the model libraries nor the training or server modules;
        wff --help and wff dev --help (every command's summary) load no model library."""
        code = ("import sys\nfrom click.testing import CliRunner\nfrom wff.cli import main\n"
                f"for name in {args.split()!r}:\n"
                "    args = [name] if name == '--help' else [name, '--help']\n"
                "    assert CliRunner().invoke(main, args).exit_code == 0, args\n"
                f"print(sorted(m for m in sys.modules if m.startswith({tuple(banned)!r})))\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]"

    def test_missing_extra_named(self, monkeypatch):
        """A command whose libraries are not installed (the thin client) says which extra to install."""
        monkeypatch.setitem(sys.modules, "torch", None)
        result = CliRunner().invoke(main, ["train", str(ROOT), "--device", "cuda"])
        assert result.exit_code == 1
        assert result.stderr.startswith("wff: error: wff train needs torch, which is not installed") and "spine-wff[train]" in result.stderr


class TestOptions:
    def test_json_is_file_or_stdout_everywhere(self):
        """--json takes FILE|- in every command that has it (no flag), and every command that writes JSON has it."""
        with_json = {p for p, c in COMMAND_PATHS.items() if "--json" in options(c)}
        for path in with_json:
            opt = options(COMMAND_PATHS[path])["--json"]
            assert not opt.is_flag and opt.metavar == "FILE|-" and opt.name == "json_out", path
        assert {("metrics",), ("diagnose",), ("evaluate",), ("bench",), ("soak",), ("train",), ("data", "synth"), ("trt", "build"),
                ("dev", "parity"), ("dev", "refit-fusion")} <= with_json

    def test_one_meaning_per_option(self):
        """--profile is a profile name, --profile-file a file, --timeout seconds per request, --max-patients a count."""
        from wff.config import PROFILES

        seen = {}
        for path, command in COMMAND_PATHS.items():
            for opt, param in options(command).items():
                seen.setdefault(opt, []).append((path, param))
        for path, param in seen["--profile"]:
            assert isinstance(param.type, click.Choice) and set(param.type.choices) == set(PROFILES), path
        for path, param in seen["--profile-file"]:
            assert isinstance(param.type, click.Path) and param.type.dir_okay is False, path
        for path, param in seen["--timeout"]:
            assert param.name == "timeout_s" and "each answer" in param.help, path
        assert {p for p, _ in seen["--timeout"]} >= {("diagnose",), ("evaluate",), ("bench",), ("soak",), ("metrics",)}
        for path, param in seen["--max-patients"]:
            assert isinstance(param.type, click.IntRange), path
        assert "--patients" not in seen and "--data" not in seen and "--fresh" not in seen


class TestExitCodes:
    def test_usage_error_exits_2(self):
        """A usage error is click's: exit 2 and its own message."""
        result = CliRunner().invoke(main, ["evaluate", ".", "--concurrency", "0"])
        assert result.exit_code == 2 and "--concurrency" in result.output and "wff: error" not in result.output

    def test_folder_without_files_exits_1(self, tmp_path):
        """diagnose of a folder with nothing to send: exit 1, 'wff: error:' naming the folder, on stderr."""
        (tmp_path / "labels.json").write_text("{}")
        result = CliRunner().invoke(main, ["diagnose", str(tmp_path), "--url", f"127.0.0.1:{free_port()}", "--timeout", "2"])
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.startswith(f"wff: error: {tmp_path}: no files to send")

    def test_unreachable_server_exits_1(self, tmp_path):
        """No server at --url: exit 1 with the one error format."""
        (tmp_path / "IM1.dcm").write_bytes(b"x")
        result = CliRunner().invoke(main, ["diagnose", str(tmp_path), "--url", f"127.0.0.1:{free_port()}", "--timeout", "2", "--retries", "0"])
        assert result.exit_code == 1 and result.stderr.startswith("wff: error: ") and "no server answered" in result.stderr

    def test_metrics_unreachable_exits_1(self):
        """wff metrics with no endpoint: exit 1, the error names the URL and what to check."""
        url = f"127.0.0.1:{free_port()}"
        result = CliRunner().invoke(main, ["metrics", "--url", url, "--timeout", "2"])
        assert result.exit_code == 1 and result.stderr.startswith(f"wff: error: cannot read metrics from {url}")
        assert "wff serve" in result.stderr

    def test_click_errors_take_the_one_format(self):
        """A plain click.ClickException raised under wff is printed as 'wff: error:' with exit 1."""
        from wff.cli import LazyGroup

        @click.command()
        def broken():
            raise click.ClickException("broken on purpose")

        group = LazyGroup(lazy_commands={})
        group.add_command(broken)
        group.get_command = lambda ctx, name: broken if name == "broken" else None
        result = CliRunner().invoke(group, ["broken"])
        assert result.exit_code == 1 and result.stderr == "wff: error: broken on purpose\n"

    def test_unwritable_json_target(self, tmp_path):
        """--json into a missing folder: a WffError naming the path and what to give."""
        with pytest.raises(WffError, match="missing/x.json.*writable file path"):
            write_json({}, str(tmp_path / "missing" / "x.json"))


@pytest.mark.server
class TestMetricsJson:
    def test_json_to_stdout(self, limited_server):
        """wff metrics --json - prints the summary as JSON only, with the served models in it."""
        result = CliRunner().invoke(main, ["metrics", "--url", limited_server.metrics_url, "--json", "-"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert set(data) == {"models", "process", "custom"}
        assert {"preprocess", "detector", "classifier", "fusion"} <= set(data["models"])

    def test_json_to_file_and_table(self, limited_server, tmp_path):
        """--json FILE writes the same JSON and still prints the readable table."""
        out = tmp_path / "m.json"
        result = CliRunner().invoke(main, ["metrics", "--url", limited_server.metrics_url, "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert "detector" in json.loads(out.read_text())["models"] and "detector" in result.stdout and not result.stdout.startswith("{")


class TestDemo:
    def test_default_size_is_the_demo_set(self):
        """wff demo runs the 120 / 60 set unless --size paper is given."""
        from wff.demo import demo
        from wff.training.synth import SIZES

        size = next(p for p in demo.params if p.name == "size")
        assert size.default == "demo" and SIZES["demo"] == (120, 60) and SIZES["paper"] == (445, 140)
        assert "paper" in size.type.choices

    @pytest.mark.parametrize("overrides, folds", [((), 2), (("--set", "train.cv_folds=3"), 3)])
    def test_demo_set_trains_with_two_folds_unless_set(self, tmp_path, monkeypatch, overrides, folds):
        """--size demo trains with 2-fold cross-validation of the fusion weights (the first command's time);
        the user's --set comes after it and wins."""
        import wff.training.train as train_mod

        dataset = tmp_path / "data"
        dataset.mkdir()
        (dataset / "labels.csv").write_text("patient_id,label,age,location,split\n")
        seen = {}

        def fake_run_training(data_dir, artifacts, profile, **kwargs):
            seen["profile"] = profile
            raise ValueError("stop after the profile is made")

        monkeypatch.setattr(train_mod, "run_training", fake_run_training)
        result = CliRunner().invoke(main, ["demo", "--dataset", str(dataset), "--out", str(tmp_path / "run"), *overrides])
        assert result.exit_code == 1 and "stop after the profile is made" in result.output
        assert seen["profile"].train.cv_folds == folds

    def test_next_steps_name_this_run(self, tmp_path):
        """The closing message names the report, figures and overlays of this run, and three commands
        that wff accepts as they are printed (options and paths parse)."""
        from wff.demo import format_next_steps

        out, dataset = tmp_path / "runs" / "demo", tmp_path / "data" / "demo"
        patient = dataset / "P0001"
        for folder in (out / "artifacts", patient):
            folder.mkdir(parents=True)
        report = {name: out / "report" / name for name in ("table3.json", "table3.csv", "roc.png", "per_location.png", "sequences.png")}
        text = format_next_steps(out, dataset, report, out / "overlays", 7, 3, patient, wff=".venv/bin/wff")
        assert f"{out / 'report'}/ (5 files" in text
        assert f"{out / 'report' / 'per_location.png'}, {out / 'report' / 'roc.png'}, {out / 'report' / 'sequences.png'}" in text
        assert f"{out / 'overlays'}/ (7 PNGs of the 3 misclassified patients" in text
        commands = [line.strip() for line in text.splitlines() if line.strip().startswith(".venv/bin/wff ")]
        assert [shlex.split(c)[1] for c in commands] == ["serve", "diagnose", "evaluate"]
        assert f"serve --artifacts {out / 'artifacts'}" in commands[0] and str(patient) in commands[1] and str(dataset) in commands[2]
        for line in commands:
            name, *args = shlex.split(line)[1:]
            command = main.get_command(click.Context(main), name)
            command.make_context(name, args)  # raises a click.UsageError if an option or path does not parse

    @pytest.mark.server
    def test_demo_on_a_trained_run(self, tmp_path):
        """wff demo on a run whose models exist (stand-in ONNX models, tiny synthetic set): no training;
        it serves, evaluates the test split, writes the report and the misclassified patients' overlays,
        and its closing message names them and commands that parse."""
        from conftest import TINY, write_artifacts
        from wff.training.synth import SIZES, synthesize_dataset

        dataset, out = tmp_path / "data", tmp_path / "run"
        synthesize_dataset(dataset, *SIZES["tiny"], seed=0)
        write_artifacts(TINY, out / "artifacts")
        ports = [str(free_port()) for _ in range(3)]
        result = CliRunner().invoke(main, ["demo", "--size", "tiny", "--dataset", str(dataset), "--out", str(out), "--concurrency", "2",
                                           "--grpc-port", ports[0], "--http-port", ports[1], "--metrics-port", ports[2]], prog_name="wff")
        assert result.exit_code == 0, result.output
        evaluation = json.loads((out / "evaluation.json").read_text())
        assert evaluation["patients"] == SIZES["tiny"][1] and evaluation["errors"] == 0
        assert {"table3.json", "table3.csv", "roc.png", "per_location.png", "sequences.png"} <= {p.name for p in (out / "report").iterdir()}
        with (out / "evaluation.csv").open() as f:
            wrong = {r["patient_id"] for r in csv.DictReader(f) if r["predicted_label"] != r["label"]}
        overlays = list((out / "overlays").glob("*.png")) if wrong else []
        assert {p.name.split("_s")[0] for p in overlays} == wrong
        assert f"{out / 'report'}/" in result.stdout and f"serve --artifacts {out / 'artifacts'}" in result.stdout
        assert f"evaluate {dataset} --report" in result.stdout
        assert (f"{len(overlays)} PNGs of the {len(wrong)} misclassified" if wrong else "no test patient was misclassified") in result.stdout

    def test_next_steps_without_misclassified_patients(self, tmp_path):
        """No misclassified patient: the message says there are no overlays instead of naming an empty folder."""
        from wff.demo import format_next_steps

        text = format_next_steps(tmp_path, tmp_path / "data", {}, tmp_path / "overlays", 0, 0, tmp_path / "data" / "P1")
        assert "overlays  none: no test patient was misclassified" in text and "figures   none" in text


class TestBenchFlopsText:
    def test_profiles_table_as_text(self):
        """wff bench --flops without --json prints one line per profile from profile_flops_table's fields, then the peak."""
        from conftest import TINY
        from wff.loadtest.bench_baselines import TYPICAL_PATIENT, profile_flops_table
        from wff.loadtest.bench_cli import format_profiles_flops

        table = {"typical_patient": TYPICAL_PATIENT, "profiles": profile_flops_table({"tiny": TINY}), "gemm_peak": {"gflops": 123.4, "threads": 2}}
        lines = format_profiles_flops(table).splitlines()
        p = table["profiles"]["tiny"]
        assert lines[0] == "GFLOP per typical patient (3 series, 45 slices):"
        assert lines[1].split()[:2] == ["tiny", str(TINY.image.size)] and f"{p['gflop_per_patient']:.1f}/patient" in lines[1]
        assert lines[2] == "fp32 GEMM peak of this machine: 123.4 GFLOP/s (2 threads)"
