"""The coordinator's Flower ServerApp (Message API, ``@app.main`` driving the ``Grid``).

Run config keys (``flwr run ... --run-config`` or ``[tool.flwr.app.config]``):
``config`` (path of the run YAML, default ``configs/default.yaml``), ``overrides`` (``;``-separated
``key.path=value`` items), ``run-dir`` (overrides ``output.run_dir``).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError, load_config
from common.data import DataError
from common.logs import get_logger
from server.state import FederationError
from server.workflow import run_federation

LOG = get_logger("fedkd.server")

app = ServerApp()


APP_ROOT = Path(__file__).resolve().parents[1]


def config_path(name: str) -> Path:
    """A relative run YAML path is looked up in the working directory, then in the app (a
    deployed app runs from Flower's copy of the bundle, which carries ``configs/``)."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.is_file() or not (APP_ROOT / path).is_file():
        return path
    return APP_ROOT / path


def config_from_run_config(run_config: dict):
    overrides = [o.strip() for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    if run_config.get("run-dir"):
        overrides.append(f"output.run_dir={run_config['run-dir']}")
    return load_config(config_path(str(run_config.get("config", "configs/default.yaml"))),
                       overrides)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = config_from_run_config(dict(context.run_config))
        LOG.info(f"[server] run directory {Path(cfg.output.run_dir).resolve()}")
        report = run_federation(grid, cfg, LOG.info)
    except (ConfigError, DataError, FederationError) as exc:
        LOG.error(f"[server] run stopped: {exc}")
        raise
    LOG.info(f"[server] finished in {report['wall_seconds']:.0f} s; report and export in "
             f"{Path(cfg.output.run_dir).resolve()}")
