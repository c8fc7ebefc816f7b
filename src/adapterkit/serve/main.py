"""``adapterkit serve`` as a function: take the port, load the base, run the app under uvicorn; and the
steps ``serve --ray`` (``ray``) shares with it."""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

from ..bases import load_base, pretrained_path
from ..compose import Composition
from ..errors import AdapterkitError, ConfigError
from ..io import CONFIG_FILE
from ..model import AdapterModel
from .app import create_app
from .config import ServeConfig
from .pool import RUN_ADAPTER, find_adapters
from .server import Server

log = logging.getLogger(__name__)

RAY_MISSING = "--ray needs Ray Serve: pip install 'adapterkit[ray]'"


def serve(
    base: str,
    adapters_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    config: ServeConfig | None = None,
    compositions: dict[str, Composition] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> None:
    """Load ``base`` (on ``device``, in ``dtype``, ``quantize``d or not) and serve the adapters in
    ``adapters_dir`` (and ``compositions`` of them) until interrupted. The port is taken before the
    base loads, so a busy one fails at once with our error."""
    import uvicorn

    folder = adapters_folder(adapters_dir)
    listener = listen(host, port)
    try:
        server = load_server(base, folder, api_key, config, compositions, device, dtype, quantize)
        log.info(startup_line(base, server.base_name, folder, listener))
        if not api_key:
            log.info("adapter management (POST and DELETE /v1/adapters) is off: "
                     "start with --api-key (or ADAPTERKIT_API_KEY) to load and unload adapters while serving")
        uvicorn.Server(uvicorn.Config(create_app(server), log_level="info")).run(sockets=[listener])
    finally:
        listener.close()


def require_ray() -> None:
    """Raise ConfigError with the pip command when Ray Serve is not installed, before anything loads."""
    try:
        from ray import serve  # noqa: F401
    except ImportError:
        raise ConfigError(RAY_MISSING) from None


def adapters_folder(adapters_dir: str | Path) -> Path:
    """The adapters folder, refused at once when it is missing (a warning when it holds no adapter)."""
    folder = Path(adapters_dir)
    if not folder.is_dir():
        raise AdapterkitError(f"no adapters folder at {folder}")
    if not find_adapters(folder):
        log.warning("%s holds no adapter yet (neither <name>/%s nor a training run's <name>/%s/%s): only the base is "
                    "served until one is added", folder, CONFIG_FILE, RUN_ADAPTER, CONFIG_FILE)
    return folder


def load_server(
    base: str,
    folder: Path,
    api_key: str | None,
    config: ServeConfig | None,
    compositions: dict[str, Composition] | None,
    device: str | None,
    dtype: str | None,
    quantize: str | None,
) -> Server:
    """A Server over ``base`` (loaded now) and the adapters in ``folder``, named as requests name the
    base: its embedded name, or its folder's name."""
    base_model, tokenizer = load_base(base, dtype, device, quantize)
    return Server(AdapterModel(base_model), tokenizer, folder, base_name_of(base), api_key, config, compositions)


def base_name_of(base: str) -> str:
    """The ``model`` that names the bare base in requests: an embedded name as given, a folder's name."""
    path = Path(base).expanduser()
    return path.resolve().name if path.is_dir() else base


def startup_line(base: str, base_name: str, adapters_dir: Path, listener: socket.socket) -> str:
    """What is served where, with the base's folder: the path to give transformers, peft or
    lm-eval (as ``pretrained``) for the same base."""
    host, port = listener.getsockname()[:2]
    host = f"[{host}]" if ":" in host else host
    return (f"serving {base_name} (base folder {pretrained_path(base)}) and the adapters in {adapters_dir} "
            f"at http://{host}:{port}/v1")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (as uvicorn binds one), or an error saying why not."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, protocol)
    except (OSError, UnicodeError) as error:
        raise AdapterkitError(f"cannot listen on {host}:{port}: {getattr(error, 'strerror', None) or error}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as error:
        listener.close()
        hint = ""
        if error.errno == errno.EADDRINUSE:
            hint = "; another program (another adapterkit serve?) uses it: stop it or pick another --port"
        raise AdapterkitError(f"cannot listen on {host}:{port}: {error.strerror}{hint}") from None
    return listener
