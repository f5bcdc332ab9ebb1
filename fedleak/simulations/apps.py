"""The ServerApp of a fedleak study: the curious server wired to the run directory
(`fedleak.simulations.study.serve`).

`pyproject.toml` names `app` for `flwr run .` (and `fedleak.client.app:app`, the ClientApp,
directly, so that client processes import no server code); `fedleak run` binds a configuration
to a fresh one (`make_server_app`).
"""

from __future__ import annotations

import threading

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedleak.config import RunConfig, parse_flat
from fedleak.server.validate import check_absolute_paths
from fedleak.simulations.study import log_own_errors_in_one_line, serve


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
        if config is None:  # `flwr run`: `fedleak run` prints its errors itself
            log_own_errors_in_one_line()
        resolved = config or parse_flat(context.run_config)
        if config is None:
            check_absolute_paths(resolved)
        serve(grid, resolved, clients=clients, client_threads=client_threads)

    return server


app = make_server_app()
