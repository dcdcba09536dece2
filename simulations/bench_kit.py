"""What the benchmarks (``fedkd bench``, :mod:`simulations.bench`) share: the reply encodings
they compare, their table and their output files (``RUN_DIR/bench_NAME.json`` and ``.png``)."""


from __future__ import annotations

import json
from pathlib import Path


from common.config import RunConfig, to_plain
from common.plotting import save

# reply encodings: today's logits + full feature maps, and the compact streams (common.codec)
FULL = [("reply.output", "logits"), ("reply.features", "full"), ("distill.feature_loss", "mse")]
COMPACT = [("reply.output", "foreground"), ("reply.features", "pooled"),
           ("distill.feature_loss", "attention")]


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def finish(cfg: RunConfig, name: str, result: dict, table: str, fig) -> dict:
    root = Path(cfg.output.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    result = {"bench": name, "machine": machine_info(), "config": to_plain(cfg), **result}
    (root / f"bench_{name}.json").write_text(json.dumps(result, indent=1))
    save(fig, root / f"bench_{name}.png")
    print(table)
    print(f"[bench] {name}: {root / f'bench_{name}.json'}, {root / f'bench_{name}.png'}")
    return result


def machine_info() -> dict:
    from simulations.experiment import machine

    return machine()
