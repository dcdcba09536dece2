"""The ``fedkd`` command line.

Subcommands that read a run config take ``--config FILE.yaml`` and repeatable
``--set key.path=value`` overrides (the value is parsed as YAML). Errors in configs or data
print one clear line (``error: FILE: key: cause``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import re
import os
import sys
from pathlib import Path
from typing import Callable

from common.config import ConfigError, RunConfig, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="run config YAML (default: built-in "
                   "defaults, as in configs/default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable)")


def _config(args: argparse.Namespace, extra: list[str] = ()) -> RunConfig:
    return load_config(args.config, [*args.overrides, *extra])


def cmd_synth(args: argparse.Namespace) -> int:
    from simulations.synthetic import write_dataset

    extra = [f"synth.{k}={v}" for k, v in (("out", args.out), ("sites", args.sites),
                                           ("cases", args.cases), ("seed", args.seed),
                                           ("proxy_cases", args.proxy_cases)) if v is not None]
    cfg = _config(args, extra)
    s = cfg.synth
    if args.if_missing:
        from simulations.synthetic import existing_matches

        if existing_matches(s.out, s.sites, s.cases, s.proxy_cases, s.seed):
            print(f"[synth] {s.out} already holds this dataset (seed {s.seed}); reusing it")
            return 0
    print(f"[synth] writing {s.sites} sites x {s.cases} cases + {s.proxy_cases} proxy cases "
          f"to {s.out} (seed {s.seed})")
    write_dataset(s.out, s.sites, s.cases, s.proxy_cases, s.seed)
    print(f"[synth] done: {s.out}")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from common.config import proxy_set_paths
    from common.data import DataError, discover_sites, load_case, discover_liu_site

    cfg = _config(args)
    problems = 0
    sites = discover_sites(cfg.data)
    groups = dict(sites)
    for folder in proxy_set_paths(cfg.data):
        if folder.is_dir():
            groups[f"(proxy) {folder.name}"] = discover_liu_site(folder, False)
    for name, records in groups.items():
        slices, fg = 0, 0
        for rec in records:
            try:
                vol = load_case(rec, cfg.data, require_label=rec.label is not None)
            except DataError as exc:
                problems += 1
                print(f"  problem: {exc}")
                continue
            slices += vol.num_slices
            if vol.label is not None:
                fg += int(vol.label.reshape(vol.num_slices, -1).any(axis=1).sum())
        masks = sum(r.label is not None for r in records)
        print(f"[check-data] {name}: {len(records)} cases, {slices} slices, {fg} with gland"
              + (f" ({masks} of the cases have masks)" if masks < len(records) else ""))
    print(f"[check-data] {problems} problem(s)")
    return 1 if problems else 0


def cmd_montage(args: argparse.Namespace) -> int:
    from simulations.plots import site_montage, targets_montage

    if args.targets:
        out = targets_montage(args.targets, args.out)
        print(f"[montage] wrote {out}")
        return 0
    cfg = _config(args, [f"data.root={args.data}"] if args.data else [])
    out = site_montage(cfg.data, args.out)
    print(f"[montage] wrote {out}")
    return 0


def cmd_cross_site(args: argparse.Namespace) -> int:
    from simulations.cross_site import run_cross_site

    cfg = _config(args)
    run_cross_site(cfg, train_sites=args.train_sites)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import simulate

    simulate(_config(args))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from simulations.experiment import collect_experiment, report_only, run_experiment

    if args.report_only:
        report_only(_config(args))
    elif args.collect:
        collect_experiment(_config(args), only=args.only, out_dir=args.publish_dir,
                           command="fedkd " + " ".join(
            a if re.fullmatch(r"[\w./=:,-]+", a) else repr(a) for a in args.argv))
    else:
        run_experiment(_config(args), only=args.only)
    return 0


def cmd_mia(args: argparse.Namespace) -> int:
    from simulations.experiment import selected_runs
    from simulations.mia import run_mia, write_mia

    cfg = _config(args)
    rows = run_mia(selected_runs(cfg, args.only), shadows=args.shadows, bootstrap=args.bootstrap,
                   base=cfg)
    if not rows:
        print(f"error: no finished run of {cfg.output.run_dir} to audit (run fedkd experiment "
              f"first)", file=sys.stderr)
        return 1
    path = write_mia(Path(cfg.output.run_dir), rows, args.shadows)
    print(path.read_text())
    print(f"[mia] {path}")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from simulations.results import sync

    stale = sync(args.files, check=args.check)
    if args.check and stale:
        print(f"error: {stale} results block(s) differ from docs/results (run fedkd results "
              f"{' '.join(map(str, args.files))})", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from simulations.bench import run_bench

    run_bench(args.name, _config(args))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from common.modelcard import load_model_dir
    from server.predict import predict_files

    try:
        model, cfg = load_model_dir(args.model)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predict_files(model, cfg, args.input, args.output)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    """``fedkd deploy ACTION`` (see :func:`_deploy_arguments`): the coordinator's actions from
    :mod:`server.deploy`, a hospital's from :mod:`client.deploy`."""
    from client.deploy import make_node_key, supernode_command
    from common.tooling import DeployError, exec_command
    from server.deploy import add_connection, bundle, make_certificates, superlink_command

    if args.action == "certs":
        paths = make_certificates(args.out, args.host, args.days, args.force)
        print(f"[deploy] CA {paths['ca']} (give a copy to every site and every `flwr` user)\n"
              f"[deploy] SuperLink certificate {paths['cert']} + key {paths['key']} for "
              f"{', '.join(args.host)} (stay on the SuperLink host)\n"
              f"[deploy] CA key {paths['ca_key']}: keep it offline; it signs new certificates")
    elif args.action == "node-key":
        paths = make_node_key(args.out, args.site, args.force)
        print(f"[deploy] private key {paths['key']} (stays at {args.site})\n"
              f"[deploy] public key {paths['pub']}: send it to the coordinator, who runs\n"
              f"    flwr supernode register {paths['pub'].name} FEDERATION")
    elif args.action == "connect":
        path = add_connection(args.name, args.address, args.ca)
        print(f"[deploy] {path}: SuperLink connection {args.name!r} -> {args.address} (TLS, CA "
              f"{args.ca})\n[deploy] next: flwr supernode register SITE.pub {args.name}; "
              f"flwr run . {args.name} --stream")
    elif args.action == "superlink":
        return exec_command(superlink_command(args.certs, args.host, args.port, args.database,
                                       args.log_file), args.print)
    elif args.action == "supernode":
        for flag, path in (("--data-path", args.data_path),
                           *(("--proxy-path", p) for p in args.proxy_path)):
            if not Path(path).expanduser().exists():
                raise DeployError(f"{flag} {path}: not found")
        node = {"data-path": str(Path(args.data_path).expanduser().resolve()),
                "data-layout": args.layout, "site": args.site,
                "proxy-path": os.pathsep.join(str(Path(p).expanduser().resolve())
                                              for p in args.proxy_path),
                "state-dir": str(Path(args.state_dir).expanduser().resolve())
                if args.state_dir else None, "threads": args.threads, "policy": args.policy}
        return exec_command(supernode_command(args.superlink, args.ca, args.key, node, args.port,
                                       args.insecure), args.print)
    elif args.action == "bundle":
        out = bundle(args.run_dir, args.out or Path(f"{Path(args.run_dir).name}.tar.gz"))
        print(f"[deploy] {out}: report, figures and exported student of {args.run_dir}")
    return 0


def _deploy_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fedkd deploy`` actions (see the README's hospital guide)."""
    from server.deploy import SUPERLINK_PORT

    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("certs", help="make a CA and the SuperLink's TLS certificate")
    p.add_argument("--out", type=Path, required=True, help="folder for ca.* and server.*")
    p.add_argument("--host", nargs="+", default=["localhost", "127.0.0.1"],
                   help="the SuperLink's DNS names / IPs as sites will dial them")
    p.add_argument("--days", type=int, default=365, help="validity (days)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p = sub.add_parser("node-key", help="make a site's SuperNode key pair")
    p.add_argument("--site", required=True, help="site name (file stem)")
    p.add_argument("--out", type=Path, required=True, help="folder for SITE.key and SITE.pub")
    p.add_argument("--force", action="store_true", help="replace existing files")
    p = sub.add_parser("connect", help="add a SuperLink connection to $FLWR_HOME/config.toml "
                       "(for flwr run / flwr supernode register)")
    p.add_argument("--name", required=True, help="connection name (used as FEDERATION)")
    p.add_argument("--address", required=True, help="SuperLink HOST:PORT")
    p.add_argument("--ca", type=Path, required=True, help="the federation's ca.crt")
    p = sub.add_parser("superlink", help="start flower-superlink with TLS and SuperNode auth")
    p.add_argument("--certs", type=Path, required=True, help="folder made by `deploy certs`")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=SUPERLINK_PORT, help="HTTPS port (default 8000)")
    p.add_argument("--database", type=Path, default=None,
                   help="SQLite file for the SuperLink's state (default: in memory)")
    p.add_argument("--log-file", type=Path, default=None, help="SuperLink log file")
    p.add_argument("--print", action="store_true", help="print the command, do not start it")
    p = sub.add_parser("supernode", help="start a site's flower-supernode")
    p.add_argument("--superlink", required=True, help="SuperLink HOST:PORT")
    p.add_argument("--ca", type=Path, help="the federation's ca.crt (required unless --insecure)")
    p.add_argument("--key", type=Path, required=True, help="this site's SITE.key")
    p.add_argument("--data-path", required=True, help="the site's private cases")
    p.add_argument("--layout", default="liu", choices=["liu", "msd", "manifest"])
    p.add_argument("--proxy-path", required=True, nargs="+",
                   help="the public proxy set's folder(s), named as the run's data.proxy")
    p.add_argument("--state-dir", default=None, help="teacher checkpoint folder "
                   "(default ~/.fedkd/state/SITE)")
    p.add_argument("--site", default=None, help="site name in reports (default: folder name)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--policy", default="kd", choices=["kd", "open"],
                   help="what the node answers (client/policy.py): kd (default) refuses "
                   "weight-sharing training, allows 2 test-split evaluations a run, sends no "
                   "per-case statistics of splits under 5 cases and no local paths; open: "
                   "everything")
    p.add_argument("--port", type=int, default=9094, help="the SuperNode's local port")
    p.add_argument("--insecure", action="store_true", help="no TLS (testing only)")
    p.add_argument("--print", action="store_true", help="print the command, do not start it")
    p = sub.add_parser("bundle", help="pack a finished run's report and student (tar.gz)")
    p.add_argument("run_dir", type=Path, help="the run directory on the coordinator")
    p.add_argument("--out", type=Path, default=None, help="archive (default RUN.tar.gz)")


def cmd_deploy(args: argparse.Namespace) -> int:
    from common.tooling import DeployError

    try:
        return _deploy(args)
    except DeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {
    "synth": ("generate synthetic multi-site prostate data", cmd_synth),
    "check-data": ("validate every case of a dataset and summarise it", cmd_check_data),
    "montage": ("PNG montage: one preprocessed slice per site with the mask outline", cmd_montage),
    "cross-site": ("train local teachers and test each on every site (domain shift matrix)",
                   cmd_cross_site),
    "simulate": ("run a federation of the synthetic sites in Flower's Simulation Engine",
                 cmd_simulate),
    "experiment": ("run experiment.methods x seeds (x folds) and tabulate them", cmd_experiment),
    "mia": ("membership-inference audit of the released models of a finished experiment grid "
            "(loss attack, LiRA with shadow models)", cmd_mia),
    "results": ("copy the published tables (docs/results) into the results blocks of "
                "markdown files; --check: fail if one differs", cmd_results),
    "bench": ("benchmarks: comm (bytes vs Dice), compress (teacher vs student speed), scale "
              "(aggregation and simulation with more sites)", cmd_bench),
    "predict": ("segment NIfTI volumes with an exported or adapted student", cmd_predict),
    "deploy": ("real deployment: certificates, SuperNode keys, start SuperLink / SuperNode, "
               "bundle a finished run", cmd_deploy),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedkd", description="Federated knowledge distillation "
                                     "for prostate MRI segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)
    parsers = {name: sub.add_parser(name, help=help_, description=help_)
               for name, (help_, _) in COMMANDS.items()}
    for name, p in parsers.items():
        if name not in ("predict", "deploy", "results"):  # predict: config from the model card
            _add_config_args(p)
    p = parsers["synth"]
    p.add_argument("--out", help="output directory (synth.out)")
    p.add_argument("--sites", type=int, help="number of sites (synth.sites, default 6)")
    p.add_argument("--cases", type=int, help="cases per site (synth.cases, default 20)")
    p.add_argument("--proxy-cases", type=int, help="proxy cases (synth.proxy_cases, default 20)")
    p.add_argument("--seed", type=int, help="seed (synth.seed, default 0)")
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing if OUT already holds a dataset made with these settings")
    p = parsers["montage"]
    p.add_argument("--data", help="dataset root (data.root)")
    p.add_argument("--out", type=Path, default=Path("montage.png"), help="PNG to write")
    p.add_argument("--targets", type=Path, default=None, help="a KD run directory: show what "
                   "its student was distilled toward (proxy slices of each public set with the "
                   "aggregated targets) instead of the sites")
    parsers["mia"].add_argument("--only", nargs="+", default=None, help="methods to audit")
    parsers["mia"].add_argument("--shadows", type=int, default=4, help="shadow models per fold "
                                "for LiRA (0: the loss attack only)")
    parsers["mia"].add_argument("--bootstrap", type=int, default=1000,
                                help="bootstrap resamples of the intervals")
    parsers["experiment"].add_argument("--only", nargs="+", default=None,
                                       help="run only these methods of the grid")
    parsers["experiment"].add_argument("--report-only", action="store_true",
                                       help="rewrite report.md and the plots from results.json")
    parsers["experiment"].add_argument("--collect", action="store_true",
                                       help="write results.json and report.md from the grid's "
                                       "finished runs (their report.json) without running "
                                       "any, and publish the table (--publish-dir) if every "
                                       "run is of one committed code and data version")
    parsers["experiment"].add_argument("--publish-dir", type=Path, default=Path("docs/results"),
                                       help="--collect: where NAME.md and NAME.json go "
                                       "(default docs/results)")
    parsers["results"].add_argument("files", nargs="+", type=Path,
                                    help="markdown files with <!-- results: NAME --> blocks")
    parsers["results"].add_argument("--check", action="store_true",
                                    help="change nothing; exit 1 if a block differs")
    parsers["bench"].add_argument("name", choices=["comm", "compress", "scale"],
                                  help="which benchmark")
    p = parsers["predict"]
    p.add_argument("--model", type=Path, required=True,
                   help="a model directory (model_card.json): the run's export, or a site's "
                        "adapted student (STATE_DIR/adapted_student)")
    p.add_argument("--input", type=Path, nargs="+", required=True, help="NIfTI volume(s)")
    p.add_argument("--output", type=Path, required=True, help="folder for the masks")
    _deploy_arguments(parsers["deploy"])
    parsers["cross-site"].add_argument("--train-sites", nargs="+", default=None,
                                       help="sites whose teachers are trained (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # the command, as typed
    from common.data import DataError

    try:
        return COMMANDS[args.command][1](args)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
