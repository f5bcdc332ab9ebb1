"""A resumed run is the same run: `sim.resume=true` may only ask an existing run directory for
more rounds.

Every other setting shapes what the finished rounds measured (seed, data, model, defense,
attacks, their budgets) or how it was measured (device, workers), so a change would mix two
studies in one directory under one `config.toml`. The check names every key that differs.
"""

from __future__ import annotations

from fedleak.config import ConfigError, RunConfig

# What may differ: the number of rounds (it may grow), the resume flag itself, and the
# directory, which is the one the stored configuration was read from.
_MAY_DIFFER = ("num-server-rounds", "sim.resume", "out-dir")


def check_resume(stored: RunConfig, wanted: RunConfig, where: str) -> None:
    """Raise `ConfigError` (one line) when `wanted` is not `stored` with as many rounds or more."""
    old, new = stored.to_flat(), wanted.to_flat()
    changed = [
        f"{key}={new.get(key)!r} (the run has {old.get(key)!r})"
        for key in dict.fromkeys([*old, *new])
        if key not in _MAY_DIFFER and old.get(key) != new.get(key)
    ]
    if changed:
        raise ConfigError(
            f"sim.resume=true: {where} was run with another configuration; differing: "
            f"{'; '.join(changed)}. A resumed run may only ask for more rounds "
            "(num-server-rounds); use another out-dir for a new study"
        )
    if wanted.num_server_rounds < stored.num_server_rounds:
        raise ConfigError(
            f"sim.resume=true: num-server-rounds={wanted.num_server_rounds} is fewer than the "
            f"{stored.num_server_rounds} of {where}; a resumed run may only add rounds"
        )
