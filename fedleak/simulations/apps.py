"""The ServerApp of a fedleak study: the curious server wired to the run directory
(`fedleak.simulations.study.serve`).

`pyproject.toml` names `app` for `flwr run .` (and `fedleak.client.app:app`, the ClientApp,
directly, so that client processes import no server code); `fedleak run` binds a configuration
to a fresh one (`make_server_app`).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedleak.config import RunConfig, parse_flat
from fedleak.simulations.study import serve


def make_server_app(config: RunConfig | None = None, clients: int | None = None) -> ServerApp:
    """A ServerApp bound to `config`, or reading Flower's run config when None (`flwr run`);
    `clients`, when known, is how many supernodes the run waits for before its first round."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, config or parse_flat(context.run_config), clients=clients)

    return server


app = make_server_app()
