"""``fedkd mia --config GRID``: a membership-inference audit of what each method releases.

For every finished run of an experiment grid (``fedkd experiment``), the released model is
attacked case by case:

* **members**: the training cases of the federation's sites in that run's fold (what the
  sites trained on); **non-members**: the fold's test cases, which no model of the run saw.
  Validation cases are left out of both (they picked epochs). The unit is a case (a patient's
  volume), whatever the unit of a DP guarantee.
* **the released model**: the federation's final student (``kd``, ``fedavg``, ``feddf``,
  ``central-*``), or for ``local`` each site's own teacher, attacked on its own members and
  every non-member. **The coordinator's view** of a ``kd`` run, the sites' replies on the
  public slices, is audited through the teachers that computed them: a reply is a function of
  its teacher, so an attack on the teacher bounds any attack on its replies (column
  "replies").
* **loss-threshold attack** (Yeom et al., CSF 2018): a case's score is minus the model's mean
  cross-entropy on its slices; members of an overfit model score higher.
* **reference-model attack** (LiRA offline, Carlini et al., S&P 2022): ``--shadows`` K shadow
  students per fold, each trained with the grid's own student recipe (its ``model``,
  ``train`` and ``student`` sections, not a method's) on a random half of the fold's members
  and non-members (:func:`shadow_losses`; kept in ``RUN_DIR/mia_shadows`` and reused by later
  audits of the grid); for each case, the losses of the shadows that did *not* train on it
  give its "out" distribution (mean per case, one shared std); the score is how far below
  that the target's loss lies. K is small on a CPU (default 4: each case is out in about 2
  shadows); the report says K.

The metrics come from scikit-learn (``roc_auc_score``, ``roc_curve``): AUC, and TPR at 1 %
FPR (with few non-members this is the TPR at FPR 0: stated with the counts), each with a
bootstrap interval over cases (``--bootstrap`` resamples, 95 %). An AUC whose interval holds
0.5 is no evidence of leakage at that sample size; it is not proof of privacy either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from client.node import load_private
from client.teacher import load_teacher
from common.config import RunConfig
from common.data import CaseVolume
from common.models import FeatureNet, build_student, input_channels
from common.slices import slice_stack
from common.training import train_segmenter
from simulations.baselines import final_model, site_nodes

FPR = 0.01


@torch.no_grad()
def case_losses(model: torch.nn.Module, cases: list[CaseVolume], context: int = 0,
                batch: int = 32) -> np.ndarray:
    """(cases,) each case's mean per-pixel cross-entropy of ``model`` against its mask."""
    model.eval()
    out = []
    for case in cases:
        total, n = 0.0, 0
        for start in range(0, case.num_slices, batch):
            zs = range(start, min(case.num_slices, start + batch))
            x = torch.from_numpy(np.stack([slice_stack(case.image, z, context) for z in zs]))
            y = torch.from_numpy(np.asarray(case.label[list(zs)], np.int64))
            logits = model(x)
            logits = logits[0] if isinstance(logits, tuple) else logits
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += y.numel()
        out.append(total / n)
    return np.asarray(out, np.float64)


def attack_metrics(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                   bootstrap: int = 1000, seed: int = 0) -> dict:
    """AUC and TPR at 1 % FPR of ``scores`` (higher = more likely a member), with 95 %
    bootstrap intervals (cases resampled within each group)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    def both(m: np.ndarray, n: np.ndarray) -> tuple[float, float]:
        y = np.r_[np.ones(len(m)), np.zeros(len(n))]
        s = np.r_[m, n]
        fpr, tpr, _ = roc_curve(y, s)
        return float(roc_auc_score(y, s)), float(tpr[fpr <= FPR].max())

    auc, tpr = both(member_scores, nonmember_scores)
    rng = np.random.default_rng(seed)
    boots = np.array([both(rng.choice(member_scores, len(member_scores)),
                           rng.choice(nonmember_scores, len(nonmember_scores)))
                      for _ in range(bootstrap)])
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    return {"auc": auc, "auc_ci": [float(lo[0]), float(hi[0])], "tpr_at_1pct_fpr": tpr,
            "tpr_ci": [float(lo[1]), float(hi[1])], "members": int(len(member_scores)),
            "non_members": int(len(nonmember_scores))}


def fold_cases(cfg: RunConfig) -> tuple[dict[str, list[CaseVolume]], list[CaseVolume]]:
    """The fold's members ({site: its training cases}) and non-members (every test case)."""
    members, non = {}, []
    for node in site_nodes(cfg):
        data = load_private(cfg, node)
        members[node.site] = list(data.train)
        non += list(data.test)
    return members, non


def shadow_losses(cfg: RunConfig, cases: list[CaseVolume], shadows: int,
                  log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """K shadow students, each trained on a random half of ``cases`` with the student recipe
    (``student.*``, ``train.epochs`` epochs, no validation). Returns (losses (K, cases), inside
    (K, cases) bool: whether the shadow trained on the case)."""
    rng = np.random.default_rng(cfg.runtime.seed + 7)
    losses, inside = [], []
    tcfg = cfg.student_train()
    for k in range(shadows):
        pick = np.zeros(len(cases), bool)
        pick[rng.choice(len(cases), len(cases) // 2, replace=False)] = True
        torch.manual_seed(cfg.runtime.seed * 100 + k)
        model = build_student(cfg.model.student, cfg.model.teacher, input_channels(cfg.data),
                              cfg.model.max_student_fraction)
        train_segmenter(model, [c for c, p in zip(cases, pick) if p], [], tcfg,
                        cfg.data.context_slices, cfg.runtime.seed * 100 + k,
                        log=lambda s: None, tag=f"shadow {k}")
        losses.append(case_losses(model, cases, cfg.data.context_slices))
        inside.append(pick)
        log(f"[mia] shadow {k + 1}/{shadows} trained on {pick.sum()} of {len(cases)} cases")
    return np.asarray(losses), np.asarray(inside)


def lira_scores(target: np.ndarray, shadow: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Offline LiRA with a fixed variance: (mu_out(x) - loss(x)) / sigma_out, mu_out the mean
    loss of the shadows without case x, sigma_out the std of all such out losses around their
    case means. A case that no shadow left out gets the shared mean."""
    out = np.where(inside, np.nan, shadow)
    mu = np.nanmean(np.where(np.isnan(out).all(axis=0), np.nanmean(out), out), axis=0)
    sigma = float(np.nanstd(out - mu)) or 1.0
    return (mu - target) / sigma


def teachers(cfg: RunConfig) -> list[tuple[str, FeatureNet]]:
    """Each site's teacher in this run's settings (``local``'s released models; a KD site's
    replies are computed from it)."""
    return [(node.site, load_teacher(cfg, node)[0]) for node in site_nodes(cfg)]


def released_models(cfg: RunConfig) -> list[tuple[str, FeatureNet]]:
    """What a run releases: its final model, or for ``local`` each site's own teacher."""
    return teachers(cfg) if cfg.federation.strategy == "local" else [("", final_model(cfg))]


def loss_attack(cfg: RunConfig, models: list[tuple[str, FeatureNet]],
                members: dict[str, list[CaseVolume]], non: list[CaseVolume]
                ) -> tuple[list[list[CaseVolume]], list[np.ndarray], list[np.ndarray]]:
    """Per model: its members (all sites', or its own site's), and the losses of members and
    non-members."""
    mine, lm, ln = [], [], []
    for site, model in models:
        cases = [c for s, cs in members.items() for c in cs if not site or s == site]
        mine.append(cases)
        lm.append(case_losses(model, cases, cfg.data.context_slices))
        ln.append(case_losses(model, non, cfg.data.context_slices))
    return mine, lm, ln


def audit_run(cfg: RunConfig, lira: Optional[tuple[np.ndarray, np.ndarray, list]] = None,
              bootstrap: int = 1000) -> dict:
    """The loss attack (and with ``lira`` = (shadow losses, inside, the cases they are of), the
    reference-model attack) on one finished run."""
    members, non = fold_cases(cfg)
    mine, lm, ln = loss_attack(cfg, released_models(cfg), members, non)
    out = {"loss": attack_metrics(-np.concatenate(lm), -np.concatenate(ln), bootstrap)}
    if lira:
        shadow, inside, cases = lira
        index = {(c.site, c.case_id): i for i, c in enumerate(cases)}
        m_lira, n_lira = [], []
        for cs, a, b in zip(mine, lm, ln):
            rows = [index[c.site, c.case_id] for c in cs + non]
            s = lira_scores(np.r_[a, b], shadow[:, rows], inside[:, rows])
            m_lira.append(s[:len(cs)])
            n_lira.append(s[len(cs):])
        out["lira"] = attack_metrics(np.concatenate(m_lira), np.concatenate(n_lira), bootstrap)
        out["lira"]["shadows"] = int(len(shadow))
    if cfg.federation.strategy == "kd":   # the coordinator's view: the sites' replies, bounded
        _, tm, tn = loss_attack(cfg, teachers(cfg), members, non)   # by the teachers behind them
        out["replies"] = attack_metrics(-np.concatenate(tm), -np.concatenate(tn), bootstrap)
    return out


def fold_shadows(base: RunConfig, cfg: RunConfig, cases: list[CaseVolume], shadows: int,
                 cache: Path, log: Callable[[str], None] = print
                 ) -> tuple[np.ndarray, np.ndarray, list[CaseVolume]]:
    """The fold's shadows (:func:`shadow_losses`), trained with the grid's own recipe ``base``
    (its ``model``, ``train`` and ``student`` sections, whichever method's run ``cfg`` names the
    fold), kept in ``cache`` (an .npz holding the digest of that recipe, the seed and the
    cases) so that an audit of other methods of the grid reuses them."""
    scfg = dataclasses.replace(cfg, model=base.model, train=base.train, student=base.student)
    d = scfg.to_dict()
    key = hashlib.sha256(json.dumps(
        [d["model"], d["train"], d["student"], d["data"], d["runtime"]["seed"], shadows,
         [(c.site, c.case_id) for c in cases]], sort_keys=True, default=str).encode()).hexdigest()
    if cache.is_file():
        saved = np.load(cache)
        if str(saved["key"]) == key:
            log(f"[mia] reusing the {shadows} shadows of {cache}")
            return saved["losses"], saved["inside"], cases
    losses, inside = shadow_losses(scfg, cases, shadows, log)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, losses=losses, inside=inside, key=key)
    return losses, inside, cases


def run_mia(runs: list[tuple[str, int, RunConfig]], shadows: int = 4, bootstrap: int = 1000,
            log: Callable[[str], None] = print, base: Optional[RunConfig] = None) -> list[dict]:
    """Audit every finished run of ``runs`` (method, seed, config); the shadows are trained
    once per fold with the grid's recipe ``base`` (default: the first run's config), kept in
    ``base.output.run_dir/mia_shadows`` and shared by its methods. Returns one row per run,
    stamped with the audited run's code version and config digest and the audit's own code
    version (a published table takes only audits of its own runs by its own commit:
    :func:`published_mia`)."""
    from common.provenance import code_version
    from server.state import config_digest
    from simulations.tables import fold_of

    rows, per_fold, version = [], {}, code_version()
    for method, seed, cfg in runs:
        path = Path(cfg.output.run_dir) / "report.json"
        if not path.is_file():
            log(f"[mia] {method} seed {seed} fold {cfg.data.fold}: no finished run; skipped")
            continue
        report = json.loads(path.read_text())
        fold = (seed, cfg.data.fold)
        if shadows and fold not in per_fold:
            members, non = fold_cases(cfg)
            cases = [c for cs in members.values() for c in cs] + non
            grid = base or runs[0][2]
            per_fold[fold] = fold_shadows(grid, cfg, cases, shadows, Path(
                grid.output.run_dir) / "mia_shadows" / f"seed_{seed}_fold_{cfg.data.fold}.npz",
                log)
        result = audit_run(cfg, per_fold.get(fold), bootstrap)
        rows.append({"method": method, "seed": seed, "fold": fold_of(cfg), **result,
                     "run_provenance": report.get("provenance"), "run_digest": config_digest(cfg),
                     "provenance": version})
        log(f"[mia] {method} fold {cfg.data.fold}: loss AUC {result['loss']['auc']:.3f} "
            f"[{result['loss']['auc_ci'][0]:.3f}, {result['loss']['auc_ci'][1]:.3f}]"
            + (f", LiRA AUC {result['lira']['auc']:.3f}" if "lira" in result else ""))
    return rows


def mia_markdown(rows: list[dict]) -> str:
    """Mean over folds of each attack's AUC and TPR at 1 % FPR, with the folds' 95 % intervals
    and the number of cases."""
    lines = ["| method | folds | members / non-members | loss AUC (mean; fold intervals) | "
             "loss TPR @1% FPR | LiRA AUC | LiRA TPR @1% FPR | replies: loss AUC (teacher "
             "bound) |", "|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]

        def cell(attack: str, key: str) -> str:
            if any(attack not in r for r in rs):
                return "-"
            vals = [r[attack][key] for r in rs]
            cis = "; ".join(f"[{r[attack][key[:3] + '_ci'][0]:.2f}, "
                            f"{r[attack][key[:3] + '_ci'][1]:.2f}]" for r in rs)
            return f"{np.mean(vals):.3f} ({cis})"
        n_m = sum(r["loss"]["members"] for r in rs)
        n_n = sum(r["loss"]["non_members"] for r in rs)
        lines.append(f"| {method} | {len(rs)} | {n_m} / {n_n} | {cell('loss', 'auc')} | "
                     f"{cell('loss', 'tpr_at_1pct_fpr')} | {cell('lira', 'auc')} | "
                     f"{cell('lira', 'tpr_at_1pct_fpr')} | {cell('replies', 'auc')} |")
    return "\n".join(lines)


def write_mia(root: Path, rows: list[dict], shadows: int) -> Path:
    """``ROOT/mia.json`` and ``ROOT/mia.md``: ``rows``, and the rows of an earlier audit (same
    number of shadows) of runs not audited again (``--only`` audits a grid method by method)."""
    root.mkdir(parents=True, exist_ok=True)
    old = json.loads((root / "mia.json").read_text()) if (root / "mia.json").is_file() else {}
    if old.get("shadows") == shadows:
        again = {(r["method"], r["seed"], r["fold"]) for r in rows}
        rows = [r for r in old["rows"] if (r["method"], r["seed"], r["fold"]) not in again] + rows
    (root / "mia.json").write_text(json.dumps({"shadows": shadows, "rows": rows}, indent=1))
    path = root / "mia.md"
    path.write_text(f"# Membership inference (fedkd mia, {shadows} shadow models)\n\n"
                    + mia_markdown(rows) + "\n")
    return path


def published_mia(root: Path, digests: dict[tuple, str], stamp: dict) -> tuple[str, list[dict]]:
    """The audit table of ``ROOT/mia.json`` for a published table: only rows of the table's runs
    (``digests``: (method, seed, fold) -> config digest of the run shown) whose audit and audited
    run are of the table's commit ``stamp``; the others are named as left out. ("", []) when
    there is no audit."""
    from common.provenance import version_label

    path = root / "mia.json"
    if not path.is_file():
        return "", []
    audit = json.loads(path.read_text())
    kept, left = [], []
    for r in audit["rows"]:
        key = (r["method"], r["seed"], r["fold"])
        versions = {version_label(r.get("provenance") or {}),
                    version_label(r.get("run_provenance") or {})}
        if key not in digests:
            continue
        if r.get("run_digest") != digests[key] or versions != {version_label(stamp)}:
            left.append(f"{r['method']} seed {r['seed']} fold {r['fold']} "
                        f"(audit of another run or version: {', '.join(sorted(versions))})")
            continue
        kept.append(r)
    if not kept:
        return ("\n\nNo membership-inference audit of these runs at this commit"
                + (f" (left out: {'; '.join(left)})" if left else "") + ".\n"), []
    text = (f"\n\nMembership inference (`fedkd mia`, {audit['shadows']} shadow models per fold; "
            "members: the sites' training cases, non-members: the fold's test cases; per fold a "
            "95 % bootstrap interval; replies: the sites' answers on the public slices, audited "
            "through the teachers that computed them, an upper bound):\n\n"
            + mia_markdown(kept) + "\n")
    if left:
        text += "\nLeft out of the audit table: " + "; ".join(left) + "\n"
    return text, kept
