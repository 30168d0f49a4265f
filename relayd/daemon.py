"""The composition root: arguments, logging, sockets, wiring; ``main()`` returns the exit code."""

from __future__ import annotations

# First, before anything imports pydantic or uvicorn: what relayd never uses waits
# (relayd.lean), and so does uvicorn's package __init__ (uvicorn.main, click).
from relayd import lazy_uvicorn, lean  # noqa: F401

# isort: split

import argparse
import asyncio
import logging
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import uvicorn.config

from relayd import __version__, logsink, mqttsetup, server
from relayd.app import create_app
from relayd.config import DEFAULT_CONFIG, Settings
from relayd.errors import ConfigError
from relayd.runtime import Runtime
from relayd.server import ShutdownTrigger
from relayd.state import PortState
from relayd.systemd import Notifier
from relayd.ws import WsEndpoint
from relayd.wsconn import protocol_factory

logger = logging.getLogger("relayd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG
DEFAULT_STATE_DIR = Path("/var/lib/relayd")


def configure_logging(level: str) -> None:
    logsink.configure(level, journal=bool(os.environ.get("JOURNAL_STREAM")))
    # uvicorn's own startup chatter repeats what relayd logs; keep its warnings and errors.
    root = logging.getLogger()
    logging.getLogger("uvicorn.error").setLevel(max(root.level, logging.WARNING))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="Relay device TCP streams to WebSocket clients.",
    )
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    parser.add_argument(
        "--config", type=Path, default=None, help=f"config file (default {DEFAULT_CONFIG})"
    )
    parser.add_argument("--http", metavar="HOST:PORT", help="override [http] host and port")
    parser.add_argument("--admin-socket", metavar="PATH", help="override admin.socket")
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where ports.json lives (default $STATE_DIRECTORY, else /var/lib/relayd)",
    )
    parser.add_argument(
        "--port",
        type=int,
        action="append",
        default=[],
        metavar="PORT",
        help="add a listener port (repeatable)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return parser


def state_directory(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    env = os.environ.get("STATE_DIRECTORY", "")
    return Path(env.split(":")[0]) if env else DEFAULT_STATE_DIR


def read_token(settings: Settings) -> str | None:
    path = settings.admin.token_file
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError([f"admin.token_file: cannot read {path}: {exc.strerror}"]) from None
    if not token:
        raise ConfigError([f"admin.token_file: {path} is empty"])
    return token


async def serve(
    settings: Settings,
    *,
    load_settings: Callable[[], Settings],
    state_dir: Path,
    admin_token: str | None,
    shutdown_trigger: ShutdownTrigger | None = None,
    on_runtime: Callable[[Runtime], None] | None = None,
) -> int:
    """Wire relayd's objects and run it until it stops; returns the exit code.

    ``shutdown_trigger``: stop when this returns, as on SIGTERM (tests use it);
    ``on_runtime`` sees the runtime before anything is bound.
    """
    state = PortState(state_dir)
    try:
        state.load()
    except ConfigError as exc:
        for problem in exc.problems:
            logger.error("%s", problem)
        return EXIT_CONFIG
    notifier = Notifier()
    runtime = Runtime(settings, load_settings=load_settings, state=state, notifier=notifier)
    try:
        runtime.load_tls()
        runtime.load_auth()
        runtime.load_mqtt()
    except ConfigError as exc:
        notifier.close()
        for problem in exc.problems:
            logger.error("%s", problem)
        return EXIT_CONFIG
    runtime.access.admin_token = admin_token.encode() if admin_token else None
    if on_runtime is not None:
        on_runtime(runtime)

    def make_config() -> uvicorn.config.Config:
        return uvicorn.config.Config(
            create_app(runtime, admin_token=admin_token),
            ws=protocol_factory(WsEndpoint(runtime)),  # type: ignore[arg-type]
            lifespan="on",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            http="h11",  # relayd.http11 builds on it, whether httptools is installed or not
        )

    try:
        started = await server.serve(runtime, make_config, shutdown_trigger=shutdown_trigger)
    finally:
        notifier.close()
    return EXIT_OK if started else EXIT_FAILURE


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, after).

    Every device and WebSocket client holds a descriptor, and systemd's default
    soft limit (1024) is far below what relayd is meant to hold (see relayd(8),
    SYSTEMD). The hard limit (LimitNOFILE= of the unit) stays as it is.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # e.g. a sandbox refusing it: keep what we have
        return soft, soft
    return soft, hard


def check_mqtt(settings: Settings) -> None:
    """What a start checks of [mqtt] beyond the file (ConfigError, exit 78): the library,
    the password file and the TLS files. The spool and the broker are left to the start."""
    if not settings.mqtt.enabled:
        return
    mqttsetup.import_paho()
    mqttsetup.read_password(settings.mqtt)
    if settings.mqtt.address[2]:
        mqttsetup.tls_context(settings.mqtt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    config_path: Path = args.config or DEFAULT_CONFIG

    def load_settings() -> Settings:
        return Settings.load(
            config_path,
            http=args.http,
            admin_socket=args.admin_socket,
            extra_ports=tuple(args.port),
        )

    try:
        settings = load_settings()
        token = read_token(settings)
        if args.check_config:
            check_mqtt(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"relayd: {problem}\n")
        return EXIT_CONFIG
    if args.check_config:
        sys.stdout.write(f"relayd: {config_path}: configuration is valid\n")
        return EXIT_OK
    logger.info("relayd %s starting (config %s)", __version__, config_path)
    before, after = raise_fd_limit()
    if after != before:
        logger.info("file descriptor limit raised from %d to %d", before, after)
    else:
        logger.info("file descriptor limit: %d", after)
    try:
        return asyncio.run(
            serve(
                settings,
                load_settings=load_settings,
                state_dir=state_directory(args.state_dir),
                admin_token=token,
            )
        )
    except KeyboardInterrupt:  # SIGINT re-raised by uvicorn after a clean drain
        return EXIT_OK
