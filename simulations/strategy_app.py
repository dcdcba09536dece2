"""A Flower ServerApp built on the FedKD strategy alone (the README's example).

    FEDKD_CONFIG=configs/demo.yaml python -m simulations.strategy_app   # 6 synthetic sites
"""

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import load_config
from server.strategy import FedKD

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(os.environ.get("FEDKD_CONFIG", "configs/demo.yaml"))
    strategy = FedKD(cfg)
    result = strategy.start(grid, strategy.initial_arrays(), num_rounds=cfg.federation.rounds)
    test = strategy.evaluate_test(grid, result.arrays)   # the test splits, read once
    print({site: round(m["dice_mean"], 4) for site, m in sorted(test.items())})
    strategy.save(result, os.environ.get("FEDKD_STUDENT", "student.pt"))


if __name__ == "__main__":
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from common.data import discover_sites

    sites = len(discover_sites(load_config(os.environ.get("FEDKD_CONFIG", "configs/demo.yaml")).data))
    run_simulation(app, client_app, num_supernodes=sites)
