"""Published results (simulations.results) and their stamps (common.provenance)."""

import subprocess

import pytest

from simulations.cli import main
from common.provenance import code_version, data_fingerprint, version_label
from simulations.results import MixedVersions, check_one_version, sync


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_the_code_stamp_is_the_commit_and_says_when_tracked_files_changed(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    clean = code_version(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "untracked.txt").write_text("runs, logs")   # untracked files do not count
    assert code_version(tmp_path) == clean
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"commit": clean["commit"], "dirty": True}
    assert version_label(code_version(tmp_path)) == clean["commit"][:7] + "+dirty"
    assert code_version(tmp_path / "nothing") == {"commit": None, "dirty": False}


def test_the_data_fingerprint_follows_content_names_and_missing_folders(tmp_path):
    a = tmp_path / "SiteA"
    a.mkdir()
    (a / "Case00.nii.gz").write_bytes(b"\x01" * 100)
    (a / ".hidden").write_text("ignored")
    first = data_fingerprint([a])
    assert data_fingerprint([a]) == first and len(first) == 16
    (a / ".hidden").write_text("still ignored")
    assert data_fingerprint([a]) == first
    (a / "Case00.nii.gz").write_bytes(b"\x02" + b"\x01" * 99)   # same size, other content
    assert data_fingerprint([a]) != first
    second = data_fingerprint([a])
    (a / "Case00.nii.gz").rename(a / "Case01.nii.gz")
    assert data_fingerprint([a]) != second
    assert data_fingerprint([a, tmp_path / "absent"]) != data_fingerprint([a])


def rows(*stamps, now=("d" * 16, "d" * 16)):
    return [{"run": f"m{i}", "provenance": s, "data_now": n}
            for i, (s, n) in enumerate(zip(stamps, now))]


def test_one_table_takes_one_committed_version_on_todays_data():
    good = {"commit": "c" * 40, "dirty": False, "data": "d" * 16}
    assert check_one_version(rows(good, dict(good)), lambda r: r["run"]) == good
    # runs that read other folders (another fingerprint) are one version if each read today's
    other = {**good, "data": "o" * 16}
    assert check_one_version(rows(good, other, now=("d" * 16, "o" * 16)), lambda r: r["run"])
    with pytest.raises(MixedVersions, match=r"code ccccccc, data as here now: m0\n  code eeeeeee"):
        check_one_version(rows(good, {**good, "commit": "e" * 40}), lambda r: r["run"])
    with pytest.raises(MixedVersions, match=r"data ffff+ \(not the data here now\): m1"):
        check_one_version(rows(good, {**good, "data": "f" * 16}), lambda r: r["run"])
    with pytest.raises(MixedVersions, match="code unknown, data unknown: m1"):   # made before stamps
        check_one_version(rows(good, None), lambda r: r["run"])
    with pytest.raises(MixedVersions, match="no committed version .*ccccccc\\+dirty"):
        check_one_version(rows({**good, "dirty": True}), lambda r: r["run"])
    with pytest.raises(MixedVersions, match="no committed version on today's data"):
        check_one_version(rows({**good, "data": "f" * 16}), lambda r: r["run"])


def test_results_blocks_are_copied_from_the_published_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "grid-a.md").write_text("| m | Dice |\n| kd | 0.61 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results: grid-a -->\nhand-edited 0.99\n<!-- /results -->\nend\n")
    assert main(["results", "--check", str(readme)]) == 1
    assert "hand-edited" in readme.read_text()          # --check changes nothing
    assert main(["results", str(readme)]) == 0
    assert readme.read_text() == ("intro\n<!-- results: grid-a -->\n| m | Dice |\n| kd | 0.61 |\n"
                                  "<!-- /results -->\nend\n")
    assert main(["results", "--check", str(readme)]) == 0
    readme.write_text("<!-- results: nothing -->\n<!-- /results -->\n")
    with pytest.raises(SystemExit, match="README.md: block 'results: nothing' but .*nothing.md"):
        sync([readme])


def test_the_readmes_tables_are_the_published_ones():
    """Every results block of the README is the published table, unedited."""
    from conftest import REPO

    readme = REPO / "README.md"
    assert "<!-- results: " in readme.read_text()
    assert sync([readme], check=True, results_dir=REPO / "docs" / "results") == 0


def test_the_readme_stays_a_readme():
    """Three readers' guide, not a research log: under 25,000 bytes (the log is docs/)."""
    from conftest import REPO

    size = len((REPO / "README.md").read_bytes())
    assert size < 25_000, f"README.md is {size} bytes; move detail to docs/"
