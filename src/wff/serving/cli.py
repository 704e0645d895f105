"""``wff repo build`` and ``wff serve``: thin click commands over repository.py and server.py."""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path

import click

from wff.config import PROFILES, Profile, ServingConfig

SET_HELP = "Change a serving setting of the trained profile (with --artifacts; repeatable), e.g. serving.runtime_precision=bf16."


def serving_overrides(profile: Profile, overrides: tuple[str, ...]) -> ServingConfig | None:
    """``profile``'s serving section with ``serving.KEY=VALUE`` overrides applied (None without any).

    Serving settings are deployment, not training; every other section is fixed by the trained models.
    """
    from wff.training.cli import apply_overrides

    if not overrides:
        return None
    if any(not item.startswith("serving.") for item in overrides):
        raise click.BadParameter("only serving.KEY=VALUE can change here (the rest is fixed by training)", param_hint="--set")
    return apply_overrides(profile, overrides).serving


def trained_serving(artifacts: Path | None, overrides: tuple[str, ...]) -> ServingConfig | None:
    """The serving section of the run in ``artifacts`` with ``--set`` overrides applied (None without any).

    Raises FileNotFoundError or ValueError for a missing or bad profile.json and click errors for bad ``--set`` use.
    """
    from wff.config import load_profile

    if not overrides:
        return None
    if artifacts is None:
        raise click.UsageError("--set needs --artifacts (a built repository keeps the settings it was built with)")
    return serving_overrides(load_profile(artifacts / "profile.json"), overrides)


def trained_serving_for_click(artifacts: Path | None, overrides: tuple[str, ...]) -> ServingConfig | None:
    """:func:`trained_serving` with file and value errors as click errors (wff repo build, wff serve, wff soak)."""
    try:
        return trained_serving(artifacts, overrides)
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e


@click.group()
def repo() -> None:
    """Triton model repositories."""


@repo.command("build")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(["embedded", "tensorrt", "onnxruntime"]), default="embedded", show_default=True,
              help="embedded: Python backend over ONNX Runtime (CPU, this machine); onnxruntime / tensorrt: NGC container.")
@click.option("--artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="wff train output (profile.json, detector.onnx, classifier.onnx, age_prior.json, fusion.json).")
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="small", show_default=True,
              help="Profile for a configs-only repository (without --artifacts).")
@click.option("--instance-kind", type=click.Choice(["KIND_CPU", "KIND_GPU"]), help="Override the detector/classifier instance kind.")
@click.option("--force", is_flag=True, help="Replace OUT if it is not empty.")
@click.option("--set", "overrides", multiple=True, metavar="serving.KEY=VALUE", help=SET_HELP)
def build(out: Path, target: str, artifacts: Path | None, profile_name: str, instance_kind: str | None, force: bool,
          overrides: tuple[str, ...]) -> None:
    """Write a complete Triton model repository for TARGET into OUT."""
    from wff.serving.repository import build_repository

    serving = trained_serving_for_click(artifacts, overrides)
    try:
        build_repository(out, target, artifacts, PROFILES[profile_name], instance_kind, overwrite=force, serving=serving)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{target} repository written to {out}" + ("" if artifacts else " (configs only: no --artifacts)"))


@click.command()
@click.option("--repository", type=click.Path(exists=True, file_okay=False, path_type=Path), help="A model repository (wff repo build).")
@click.option("--artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="wff train output; an embedded repository is built from it into a temporary folder.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address for all endpoints; anything but loopback exposes them to the network (use --tls-cert/--tls-key).")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535))
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(0, 65535))
@click.option("--log-verbose", default=0, show_default=True, type=click.IntRange(0, 3), help="tritonserver --log-verbose.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), help="Write the server log here (default: a temporary file).")
@click.option("--timeout", "startup_timeout", default=120.0, show_default=True, help="Seconds to wait for the server to be ready.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM server certificate: gRPC over TLS (clients: --ssl --root-certificates). Needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="PEM private key of --tls-cert.")
@click.option("--set", "overrides", multiple=True, metavar="serving.KEY=VALUE", help=SET_HELP)
def serve(repository: Path | None, artifacts: Path | None, address: str, grpc_port: int, http_port: int, metrics_port: int,
          log_verbose: int, log_file: Path | None, startup_timeout: float, tls_cert: Path | None, tls_key: Path | None,
          overrides: tuple[str, ...]) -> None:
    """Run tritonserver on a model repository until Ctrl-C or SIGTERM."""
    from wff.serving.repository import build_repository
    from wff.serving.server import ServerError, TritonServer

    if (repository is None) == (artifacts is None):
        raise click.UsageError("give exactly one of --repository DIR or --artifacts DIR")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("give both --tls-cert and --tls-key, or neither")
    serving = trained_serving_for_click(artifacts, overrides)
    with tempfile.TemporaryDirectory(prefix="wff-repo-") as tmp:
        if artifacts is not None:
            try:
                repository = build_repository(Path(tmp) / "repository", "embedded", artifacts, serving=serving)
            except (FileNotFoundError, ValueError) as e:
                raise click.ClickException(str(e)) from e
        try:
            server = TritonServer(repository, address, grpc_port, http_port, metrics_port, log_verbose, log_file, startup_timeout,
                                  tls_cert=tls_cert, tls_key=tls_key)
        except ServerError as e:
            raise click.ClickException(str(e)) from e
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.start()
            click.echo(f"tritonserver ready in {server.startup_s:.1f} s (repository {repository})")
            click.echo(f"  gRPC     {server.grpc_url}" + (" (TLS)" if server.tls else ""))
            click.echo(f"  HTTP     {server.http_url}")
            click.echo(f"  metrics  {server.metrics_url}")
            click.echo(f"  log      {server.log_file}")
            click.echo("Ctrl-C to stop.")
            while not stop.wait(1.0):
                if not server.is_running():
                    raise click.ClickException(f"tritonserver exited; last log lines:\n{server.log_tail()}")
            click.echo("stopping tritonserver", err=True)
        except ServerError as e:
            raise click.ClickException(str(e)) from e
        finally:
            server.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
