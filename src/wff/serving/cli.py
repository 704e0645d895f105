"""``wff repo build`` and ``wff serve``: thin click commands over repository.py and server.py."""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path

import click

from wff.cli import WffError, apply_overrides
from wff.config import PROFILES, Profile, ServingConfig
from wff.serving.server import EXIT_TIMEOUT_S, SHM_GROWTH_BYTES, STARTUP_TIMEOUT_S

SET_HELP = "Change a serving setting of the trained profile (with --artifacts; repeatable), e.g. serving.runtime_precision=bf16."


def serving_overrides(profile: Profile, overrides: tuple[str, ...]) -> ServingConfig | None:
    """``profile``'s serving section with ``serving.KEY=VALUE`` overrides applied (None without any).

    Serving settings are deployment, not training; every other section is fixed by the trained models.
    """
    if not overrides:
        return None
    if any(not item.startswith("serving.") for item in overrides):
        raise click.BadParameter("only serving.KEY=VALUE can change here (the rest is fixed by training)", param_hint="--set")
    return apply_overrides(profile, overrides).serving


def trained_serving(artifacts: Path | None, overrides: tuple[str, ...]) -> ServingConfig | None:
    """The serving section of the run in ``artifacts`` with ``--set`` overrides applied (None without any).

    A missing or bad profile.json is a WffError, a bad ``--set`` a click usage error
    (wff repo build, wff serve, wff soak, wff bench).
    """
    from wff.config import load_profile

    if not overrides:
        return None
    if artifacts is None:
        raise click.UsageError("--set needs --artifacts (a built repository keeps the settings it was built with)")
    try:
        profile = load_profile(artifacts / "profile.json")
    except (FileNotFoundError, ValueError) as e:
        raise WffError(str(e)) from e
    return serving_overrides(profile, overrides)


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
              help="Training profile whose settings a configs-only repository (without --artifacts) gets.")
@click.option("--instance-kind", type=click.Choice(["KIND_CPU", "KIND_GPU"]), help="Override the detector/classifier instance kind.")
@click.option("--force", is_flag=True, help="Replace OUT if it is not empty.")
@click.option("--set", "overrides", multiple=True, metavar="serving.KEY=VALUE", help=SET_HELP)
def build(out: Path, target: str, artifacts: Path | None, profile_name: str, instance_kind: str | None, force: bool,
          overrides: tuple[str, ...]) -> None:
    """Write a complete Triton model repository for TARGET into OUT."""
    from wff.serving.repository import build_repository

    serving = trained_serving(artifacts, overrides)
    try:
        build_repository(out, target, artifacts, PROFILES[profile_name], instance_kind, overwrite=force, serving=serving)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        raise WffError(str(e)) from e
    click.echo(f"{target} repository written to {out}" + ("" if artifacts else " (configs only: no --artifacts)"))


@click.command()
@click.option("--repository", type=click.Path(exists=True, file_okay=False, path_type=Path), help="A model repository (wff repo build).")
@click.option("--artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="wff train output; an embedded repository is built from it into a temporary folder.")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Default address of every endpoint; anything but loopback exposes it to the network.")
@click.option("--grpc-address", help="gRPC address [default: --address]; off loopback, use --tls-cert/--tls-key.")
@click.option("--http-address", help="HTTP address [default: --address]; plain text, keep it on loopback.")
@click.option("--metrics-address", help="Prometheus metrics address [default: --address]; plain text.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535))
@click.option("--http-port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(0, 65535))
@click.option("--log-verbose", default=0, show_default=True, type=click.IntRange(0, 3), help="tritonserver --log-verbose.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the server log here (default: a temporary file; - for standard output).")
@click.option("--startup-timeout", "startup_timeout", default=STARTUP_TIMEOUT_S, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for the models to load and the server to be ready.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM server certificate: gRPC over TLS (clients: --tls-ca). Needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM CA certificate: mutual TLS, only clients with a certificate it signed are served (clients: "
                   "--tls-ca/--tls-cert/--tls-key). Needs --tls-cert/--tls-key.")
@click.option("--exit-timeout", "exit_timeout_s", default=EXIT_TIMEOUT_S, show_default=True, type=click.IntRange(0),
              help="Seconds tritonserver waits for requests in flight when stopping.")
@click.option("--shm-default-bytes", type=click.IntRange(1), help="Python-backend shared memory per instance [default: sized from the repository's profile].")
@click.option("--shm-growth-bytes", default=SHM_GROWTH_BYTES, show_default=True, type=click.IntRange(1), help="Growth step of that region.")
@click.option("--server-malloc", help="tritonserver's allocator: auto, jemalloc, glibc or a library path [default: the repository's serving.server_malloc].")
@click.option("--tritonserver", "tritonserver_bin", help="tritonserver executable (path or name on PATH) [default: the nvidia-pytriton wheel's].")
@click.option("--backend-directory", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="tritonserver's backend directory, with python/ [default: made from the nvidia-pytriton wheel].")
@click.option("--set", "overrides", multiple=True, metavar="serving.KEY=VALUE", help=SET_HELP)
@click.argument("triton_args", nargs=-1, type=click.UNPROCESSED)
def serve(repository: Path | None, artifacts: Path | None, address: str, grpc_address: str | None, http_address: str | None,
          metrics_address: str | None, grpc_port: int, http_port: int, metrics_port: int, log_verbose: int, log_file: Path | None,
          startup_timeout: float, tls_cert: Path | None, tls_key: Path | None, tls_client_ca: Path | None, exit_timeout_s: int,
          shm_default_bytes: int | None, shm_growth_bytes: int, server_malloc: str | None, tritonserver_bin: str | None,
          backend_directory: Path | None, overrides: tuple[str, ...], triton_args: tuple[str, ...]) -> None:
    """Run tritonserver on a model repository until Ctrl-C or SIGTERM.

    A watchdog reloads a model whose Python-backend stub died, and stops the server when it cannot.
    TRITON_ARGS (after --, e.g. -- --allow-gpu-metrics=true) go to tritonserver unchanged.
    """
    from wff.serving.repository import build_repository
    from wff.serving.server import ServerError, StartCancelled, TritonServer

    if (repository is None) == (artifacts is None):
        raise click.UsageError("give exactly one of --repository DIR or --artifacts DIR")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("give both --tls-cert and --tls-key, or neither")
    if tls_client_ca is not None and tls_cert is None:
        raise click.UsageError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    serving = trained_serving(artifacts, overrides)
    with tempfile.TemporaryDirectory(prefix="wff-repo-") as tmp:
        if artifacts is not None:
            try:
                repository = build_repository(Path(tmp) / "repository", "embedded", artifacts, serving=serving)
            except (FileNotFoundError, ValueError) as e:
                raise WffError(str(e)) from e
        try:
            server = TritonServer(repository, address, grpc_port, http_port, metrics_port, log_verbose, log_file, startup_timeout,
                                  shm_default_bytes=shm_default_bytes, shm_growth_bytes=shm_growth_bytes,
                                  exit_timeout_s=exit_timeout_s, tls_cert=tls_cert, tls_key=tls_key, server_malloc=server_malloc,
                                  grpc_address=grpc_address, http_address=http_address, metrics_address=metrics_address,
                                  tls_client_ca=tls_client_ca, tritonserver=tritonserver_bin, backends=backend_directory,
                                  extra_args=triton_args)
        except ServerError as e:
            raise WffError(str(e)) from e
        stop, received = threading.Event(), []

        def on_signal(signum, _frame) -> None:
            received.append(signal.Signals(signum).name)
            stop.set()
            server.cancel_start.set()  # while starting: start() stops tritonserver and raises StartCancelled

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.start()
            tls = " (mutual TLS)" if server.tls_client_ca else " (TLS)" if server.tls else ""
            click.echo(f"tritonserver ready in {server.startup_s:.1f} s (repository {repository})")
            click.echo(f"  gRPC     {server.grpc_address}:{server.grpc_port}{tls}")
            click.echo(f"  HTTP     {server.http_address}:{server.http_port}")
            click.echo(f"  metrics  {server.metrics_address}:{server.metrics_port}")
            click.echo(f"  log      {'standard output' if server.log_to_stdout else server.log_file}")
            click.echo("Ctrl-C to stop.")
            while not stop.wait(1.0):
                if not server.is_running():
                    raise WffError(server.failure or f"tritonserver exited; last log lines:\n{server.log_tail()}")
            click.echo("stopping tritonserver", err=True)
        except StartCancelled:
            click.echo(f"{received[0]} while tritonserver was starting: stopped it", err=True)
        except ServerError as e:
            raise WffError(str(e)) from e
        finally:
            server.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
