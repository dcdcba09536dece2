"""The coordinator's Flower ServerApp (Message API, ``@app.main`` driving the ``Grid``).

Run config keys (``flwr run ... --run-config`` or ``[tool.flwr.app.config]``):
``config`` (path of the run YAML, default ``configs/default.yaml``), ``overrides`` (``;``-separated
``key.path=value`` items), ``run-dir`` (overrides ``output.run_dir``).
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import load_config
from common.logs import get_logger
from server.workflow import run_federation

LOG = get_logger("fedkd.server")

app = ServerApp()


def config_from_run_config(run_config: dict):
    overrides = [o.strip() for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    if run_config.get("run-dir"):
        overrides.append(f"output.run_dir={run_config['run-dir']}")
    return load_config(run_config.get("config", "configs/default.yaml"), overrides)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(dict(context.run_config))
    report = run_federation(grid, cfg, LOG.info)
    LOG.info(f"[server] finished in {report['wall_seconds']:.0f} s; report and export in "
             f"{cfg.output.run_dir}")
