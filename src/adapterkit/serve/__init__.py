"""``adapterkit serve``: an OpenAI-compatible HTTP server over one base model and a folder of adapters.

A request names its adapter in ``model`` (the base's own name for none): a sub-folder of the
adapters folder that is an adapter, or a training run's output folder (``train -o runs/de`` writes
``runs/de/adapter``, served as ``de``), or a composition of them. Every request becomes a row of the
generation engine (``adapterkit.generation``), which batches continuously: a request that arrives
while others decode is prefilled at the next step and decodes with them, each row through its own
adapter, and leaves as soon as it ends.

Prompt templates: /v1/completions passes the prompt to the model exactly as sent, as OpenAI's
completions do (clients that score text with ``echo`` and ``logprobs`` rely on it, and a client that
fills the template itself must not get it twice). /v1/chat/completions is where a server formats the
input: for an adapter that records a text template ("English: {prompt}\\nGerman:") the one user
message fills it, and the answer ends at a newline unless the request sets ``stop``; otherwise the
tokenizer's chat template renders the conversation.

The parts, as a request meets them: ``protocol`` (the OpenAI request and answer shapes), ``app``
(the routes; the one place errors become statuses), ``middleware`` (body limit, unexpected errors),
``server`` (requests into engine rows, the engine's thread), ``pool`` (adapters loaded on demand),
``metrics`` (Prometheus), ``config`` (the limits, one ``serve`` flag each) and ``main`` (``serve()``).
``ray`` (``serve --ray``, with the ``ray`` extra; not imported here) runs replicas of this server
behind Ray Serve.
"""

from .app import create_app
from .config import ServeConfig
from .main import listen, serve
from .protocol import ApiError
from .server import Server

__all__ = ["ApiError", "ServeConfig", "Server", "create_app", "listen", "serve"]
