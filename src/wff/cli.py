"""The ``wff`` command line: a thin click layer; each command lives beside the code it drives.

Commands are imported only when invoked, so ``wff diagnose`` does not pay for importing torch.
Conventions every command follows:

* exit status 0 on success, 1 on a failure (:class:`WffError`, printed as ``wff: error: ...``),
  2 on a usage error (click's own message);
* ``--json FILE|-`` writes the command's result as JSON to FILE, or to standard output with ``-``
  (:func:`json_option`, :func:`write_json`);
* ``--set SECTION.KEY=VALUE`` overrides a profile value (:func:`apply_overrides`);
* ``--url HOST:PORT`` is the gRPC endpoint (``wff metrics``: the metrics endpoint), ``--timeout
  SECONDS`` the limit per request, ``--profile NAME`` a named training profile and
  ``--profile-file PATH`` a profile.json.
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from wff.config import Profile

# command name -> "module:attribute" of a click command or group
COMMANDS = {
    "data": "wff.training.data_cli:data",
    "train": "wff.training.cli:train",
    "repo": "wff.serving.cli:repo",
    "serve": "wff.serving.cli:serve",
    "diagnose": "wff.client.cli:diagnose",
    "evaluate": "wff.client.cli:evaluate",
    "metrics": "wff.client.metrics_cli:metrics",
    "bench": "wff.loadtest.bench_cli:bench",
    "soak": "wff.loadtest.soak_cli:soak",
    "trt": "wff.serving.trt_cli:trt",
    "demo": "wff.demo:demo",
    "dev": "wff.cli:dev",
    "pacs": "wff.pacs.cli:pacs",
}

# libraries beyond the thin client -> the extra that installs them
EXTRAS = {"torch": "train", "torchvision": "train", "onnxscript": "train", "pytriton": "serve", "openvino": "serve",
          "onnxruntime": "serve", "onnx": "serve", "tritonclient.http": "serve",
          "pynetdicom": "pacs", "highdicom": "pacs", "dicomweb_client": "pacs", "requests": "pacs"}

# the model-development tools, under ``wff dev``
DEV_COMMANDS = {
    "parity": "wff.training.cli:parity",
    "refit-fusion": "wff.training.cli:refit_fusion",
}


class WffError(click.ClickException):
    """A failure the user can act on: ``wff: error: MESSAGE`` on stderr, exit status 1.

    The message says what is wrong, with which file, field or limit, and what to do about it.
    """

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"wff: error: {self.format_message()}", file=file, err=True)


def json_option(what: str):
    """``--json FILE|-``: the command receives ``json_out`` (None when not given)."""
    return click.option("--json", "json_out", metavar="FILE|-", help=f"Write {what} as JSON to FILE, or to standard output with -.")


def write_json(data, target: str) -> None:
    """``data`` as indented JSON to the file ``target``, or to standard output for ``-``."""
    text = json.dumps(data, indent=2) + "\n"
    if target == "-":
        click.echo(text, nl=False)
        return
    try:
        Path(target).write_text(text)
    except OSError as e:
        raise WffError(f"cannot write the JSON to {target}: {e.strerror or e}; give a writable file path, or - for standard output") from e


def apply_overrides(profile: Profile, overrides: tuple[str, ...]) -> Profile:
    """``--set SECTION.KEY=VALUE`` overrides of ``profile`` (value parsed as JSON, else kept as text);
    a bad one is a click.BadParameter of ``--set``. The one place every command's ``--set`` goes through."""
    from wff.config import profile_from_dict, removed_key_note

    data = profile.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, field = key.partition(".")
        removed = removed_key_note(section, field)
        if removed:
            raise click.BadParameter(f"{item!r}: {removed}", param_hint="--set")
        if not sep or not dot or section not in data or field not in data[section]:
            raise click.BadParameter(f"{item!r}: expected SECTION.KEY=VALUE with a key of the profile, e.g. detector.epochs=2", param_hint="--set")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        data[section][field] = value
    try:
        return profile_from_dict(data, where="--set")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--set") from e


def progress_printer(message: str) -> None:
    """Progress of a long command, on stderr (stdout keeps the result)."""
    click.echo(message, err=True)


class LazyGroup(click.Group):
    """A group whose commands are imported when they are invoked (or asked for their help)."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.lazy_commands)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = self.lazy_commands.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        # one error format: a click error that is not about usage becomes a WffError
        try:
            return super().invoke(ctx)
        except (click.UsageError, WffError):
            raise
        except click.ClickException as e:
            raise WffError(e.format_message()) from e
        except ModuleNotFoundError as e:
            extra = EXTRAS.get(e.name or "") or EXTRAS.get((e.name or "").split(".")[0])
            if extra is None:
                raise
            raise WffError(f"{_command_path(ctx)} needs {e.name}, which is not installed; install it with "
                           f"pip install 'spine-wff[{extra}]' (the base install is the thin client: diagnose, evaluate, metrics)") from e


def _command_path(ctx: click.Context) -> str:
    """``wff`` and the names of the (sub)commands invoked below the root, e.g. ``wff dev parity``."""
    names = [ctx.invoked_subcommand]
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return " ".join(["wff", *reversed([n for n in names if n])])


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """spine-wff: benign/malignant spinal tumour diagnosis from sagittal MRI, served by Triton.

    Exit status: 0 success, 1 failure (wff: error: ...), 2 usage error.
    """
    # SIGTERM unwinds like Ctrl-C, so a command that started tritonserver (soak, bench, demo, serve
    # --artifacts) stops it on the way out instead of leaving it running in its own session
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("wff").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)


@click.group(cls=LazyGroup, lazy_commands=DEV_COMMANDS)
def dev() -> None:
    """Model-development tools: ONNX-vs-PyTorch parity, refitting the fusion."""


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
