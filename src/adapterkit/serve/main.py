"""``adapterkit serve`` as a function: take the port, load the base, run the app under uvicorn."""

from __future__ import annotations

import errno
import logging
import socket
from pathlib import Path

from ..bases import load_base, pretrained_path
from ..compose import Composition
from ..errors import AdapterkitError
from ..io import CONFIG_FILE
from ..model import AdapterModel
from .app import create_app
from .config import ServeConfig
from .pool import RUN_ADAPTER, find_adapters
from .server import Server

log = logging.getLogger(__name__)


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

    folder = Path(adapters_dir)
    if not folder.is_dir():
        raise AdapterkitError(f"no adapters folder at {folder}")
    if not find_adapters(folder):
        log.warning("%s holds no adapter yet (neither <name>/%s nor a training run's <name>/%s/%s): only the base is "
                    "served until one is added", folder, CONFIG_FILE, RUN_ADAPTER, CONFIG_FILE)
    listener = listen(host, port)
    try:
        base_model, tokenizer = load_base(base, dtype, device, quantize)
        base_name = base if not Path(base).expanduser().is_dir() else Path(base).expanduser().resolve().name
        server = Server(AdapterModel(base_model), tokenizer, folder, base_name, api_key, config, compositions)
        log.info(startup_line(base, base_name, folder, listener))
        uvicorn.Server(uvicorn.Config(create_app(server), log_level="info")).run(sockets=[listener])
    finally:
        listener.close()


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
