"""``fedkd simulate``: a whole federation on one machine with Flower's Simulation Engine.

The ServerApp workflow (:mod:`server.workflow`) and the sites' ClientApp (:mod:`client.app`)
run unchanged; the engine runs one ClientApp per simulated site in Ray actors. Partition *i* is
the *i*-th site folder of ``data.root`` (or of ``data.sites``). Synthetic data is generated into
``data.root`` from the ``synth`` section on first use. Teacher checkpoints of the simulated sites
live in ``output.state_root``, so runs that share teacher settings train them once.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

from common.config import SIMULATION_ONLY, RunConfig
from common.data import discover_sites
from common.logs import get_logger
from simulations.synthetic import existing_matches, write_dataset
from server.workflow import final_round

LOG = get_logger("fedkd.server")


def ensure_data(cfg: RunConfig) -> None:
    """Generate the synthetic sites into ``data.root`` if it does not exist yet."""
    root = Path(cfg.data.root)
    s = cfg.synth
    if root.is_dir():
        if (root / "synth.json").is_file() and not existing_matches(root, s.sites, s.cases,
                                                                    s.proxy_cases, s.seed):
            print(f"[simulate] note: {root} was generated with other synth settings; using it as is")
        return
    print(f"[simulate] {root} not found: generating {s.sites} synthetic sites x {s.cases} cases "
          f"+ {s.proxy_cases} proxy cases (seed {s.seed})")
    write_dataset(root, s.sites, s.cases, s.proxy_cases, s.seed)


def parallel_clients(cores: int, sites: int) -> int:
    return max(1, min(cores, sites))


def simulate(cfg: RunConfig) -> dict:
    """Run the federation described by ``cfg`` in the Simulation Engine; return the report.
    ``cfg`` is not changed: the run uses a copy with ``federation.min_sites`` capped at the
    number of sites and ``runtime.client_threads`` resolved."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.workflow import run_federation

    ensure_data(cfg)
    if cfg.federation.strategy in SIMULATION_ONLY:
        from simulations.baselines import run_baseline

        print(f"[simulate] baseline {cfg.federation.strategy!r} on pooled data (one process, "
              f"simulation only); run directory {cfg.output.run_dir}")
        result = run_baseline(cfg, LOG.info)
        _print_summary(result, cfg)
        return result
    sites = list(discover_sites(cfg.data))
    cfg = copy.deepcopy(cfg)
    cores = os.cpu_count() or 1
    parallel = parallel_clients(cores, len(sites))
    if cfg.runtime.client_threads == 0:  # share the cores among the parallel site actors
        cfg.runtime.client_threads = max(1, cores // parallel)
    cfg.federation.min_sites = min(cfg.federation.min_sites, len(sites))
    print(f"[simulate] {len(sites)} sites ({', '.join(sites)}), {parallel} in parallel with "
          f"{cfg.runtime.client_threads} thread(s) each; run directory {cfg.output.run_dir}")
    result: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        result.update(run_federation(grid, cfg, LOG.info))

    t0 = time.perf_counter()
    # Flower 1.42 marks run_simulation deprecated in favour of `flwr run` against a local
    # SuperLink. It stays here on purpose: it runs the ServerApp in this process, so the caller
    # (fedkd experiment runs dozens of federations) gets the report object back and keeps its
    # data caches, with no SuperLink process, app bundle or per-run dependency step per run. The
    # same apps run unchanged under `flwr run` and in a real deployment (tests/test_deploy.py).
    run_simulation(server_app, client_app, num_supernodes=len(sites),
                   backend_config={"client_resources": {"num_cpus": cores / parallel,
                                                        "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cores, "log_to_driver": True}})
    if not result:
        raise RuntimeError("the simulation ended without a report (see the log above)")
    print(f"[simulate] done in {time.perf_counter() - t0:.0f} s")
    if cfg.experiment.unseen_sites:
        add_unseen(cfg, result)
    _print_summary(result, cfg)
    return result


def add_unseen(cfg: RunConfig, report: dict) -> None:
    """Test the run's final student on the sites outside the federation (in this process: a
    simulation-only figure) and add it to the report."""
    from server.report import write_report
    from simulations.baselines import evaluate_unseen, final_model

    unseen = evaluate_unseen(cfg, final_model(cfg))
    report["state"]["rounds"][str(final_round(cfg))]["unseen"] = unseen
    write_report(report, Path(cfg.output.run_dir), LOG.info)
    for site, m in unseen.items():
        print(f"[simulate] unseen site {site}: Dice {m['dice_mean']:.4f} on {int(m['n_cases'])} cases")


def _print_summary(report: dict, cfg: RunConfig) -> None:
    from server.report import report_markdown

    print("## Round" + report_markdown(report).split("## Round")[-1])
    print(f"[simulate] report: {Path(cfg.output.run_dir) / 'report.md'}")
