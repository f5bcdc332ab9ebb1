"""The ServerApp of a fedleak study: the curious server wired to the run directory
(`fedleak.simulations.study.serve`).

`pyproject.toml` names `app` for `flwr run .` (and `fedleak.client.app:app`, the ClientApp,
directly, so that client processes import no server code); `fedleak run` binds a configuration
to a fresh one (`make_server_app`).
"""

from __future__ import annotations

import logging
import threading

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid, ServerApp

from fedleak.config import RunConfig, parse_flat
from fedleak.registry import error_line, is_own_error
from fedleak.simulations.study import serve


class OneLineErrors(logging.Filter):
    """Flower logs whatever a ServerApp raises with its traceback. fedleak's own errors (a bad
    setting, missing data) are for the user, so under `flwr run` they read as one line, as
    `fedleak run` prints them; anything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_own_error(error):
            record.msg = f"{record.getMessage()}: {error_line(error)}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def make_server_app(
    config: RunConfig | None = None,
    clients: int | None = None,
    client_threads: int | None = None,
    serving: list[threading.Thread] | None = None,
) -> ServerApp:
    """A ServerApp bound to `config`, or reading Flower's run config when None (`flwr run`);
    `clients`, when known, is how many supernodes the run waits for before its first round,
    and `client_threads` the torch threads each client computes with (`serve`). The thread
    that runs the study is added to `serving`, for a caller that must wait for it."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if serving is not None:
            serving.append(threading.current_thread())
        if config is None and not any(isinstance(f, OneLineErrors) for f in FLOWER_LOGGER.filters):
            FLOWER_LOGGER.addFilter(OneLineErrors())
        resolved = config or parse_flat(context.run_config)
        serve(grid, resolved, clients=clients, client_threads=client_threads)

    return server


app = make_server_app()
