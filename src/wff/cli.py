"""The ``wff`` command line: a thin click layer; each command lives beside the code it drives.

Commands are imported only when invoked, so ``wff diagnose`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading

import click

# command name -> "module:attribute" of a click command or group
COMMANDS = {
    "data": "wff.training.data_cli:data",
    "train": "wff.training.cli:train",
    "refit-fusion": "wff.training.cli:refit_fusion",
    "export-folds": "wff.training.cli:export_folds",
    "parity": "wff.training.cli:parity",
    "repo": "wff.serving.cli:repo",
    "serve": "wff.serving.cli:serve",
    "trt": "wff.serving.trt_cli:trt",
    "diagnose": "wff.client.cli:diagnose",
    "evaluate": "wff.client.cli:evaluate",
    "metrics": "wff.client.metrics_cli:metrics",
    "soak": "wff.client.soak_cli:soak",
    "bench": "wff.client.bench_cli:bench",
    "demo": "wff.demo:demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """spine-wff: benign/malignant spinal tumour diagnosis from sagittal MRI, served by Triton."""
    # SIGTERM unwinds like Ctrl-C, so a command that started tritonserver (soak, bench, demo, serve
    # --artifacts) stops it on the way out instead of leaving it running in its own session
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.DEBUG if verbose >= 2 else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("wff").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
