"""experiments.ab: same-machine A/B runs of a command, base files swapped in and restored."""
import json
import subprocess
import sys
import tarfile

import pytest

from experiments import ab

# Reads the compared file, says whether a file that only the new side has exists, and
# writes a record as a benchmark would (a fresh name per run, like --name).
_BENCH = r"""
import json, os, pathlib, sys
root = pathlib.Path('.')
v = float((root / 'pkg' / 'val.txt').read_text())
out = root / 'experiments' / 'results' / 'gpu'
out.mkdir(parents=True, exist_ok=True)
n = len(list(out.glob('*.json')))
(out / f'rec{n}.json').write_text(json.dumps({'figures': {'v': v, 'extra': os.path.exists('pkg/only_new.py')}}))
sys.exit(int(os.environ.get('AB_TEST_EXIT', '0')) if v == 1 else 0)
"""


def _git(root, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path):
    """A repository whose HEAD~1 has val.txt = 1 and whose working tree has 2 and a new file."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "val.txt").write_text("1")
    (tmp_path / "bench.py").write_text(_BENCH)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "base")
    (tmp_path / "pkg" / "val.txt").write_text("2")
    _git(tmp_path, "commit", "-qam", "new")
    (tmp_path / "pkg" / "only_new.py").write_text("x = 1\n")
    return tmp_path


def test_alternating_runs_compare_base_and_new_and_restore_the_tree(repo, tmp_path_factory):
    manifest_dir = ab.prepare("HEAD~1", ["pkg/val.txt", "pkg/only_new.py"], root=repo)
    manifest = json.loads((manifest_dir / ab.MANIFEST).read_text())
    assert manifest["files"] == ["pkg/val.txt"] and manifest["absent_at_base"] == ["pkg/only_new.py"]
    assert manifest["new_commit"] != manifest["base_commit"]
    out = tmp_path_factory.mktemp("out")
    summary = ab.run([sys.executable, "bench.py"], out, repeat=2, metric="figures.v", root=repo)
    assert [(r["label"], r["index"]) for r in summary["runs"]] == [("base", 1), ("new", 1), ("base", 2), ("new", 2)]
    assert [r["metric"] for r in summary["runs"]] == [[1.0], [2.0], [1.0], [2.0]]
    assert summary["median"] == {"base": 1.0, "new": 2.0} and summary["new_over_base"] == 2.0
    # the base runs did not see the file the base revision lacks; the new runs did
    for r in summary["runs"]:
        (rec,) = r["records"]
        got = json.loads((repo / rec).read_text())["figures"]["extra"]
        assert got == (r["label"] == "new")
    # the working tree is as it was
    assert (repo / "pkg" / "val.txt").read_text() == "2" and (repo / "pkg" / "only_new.py").exists()
    assert json.loads((out / "ab_summary.json").read_text())["runs"] == summary["runs"]
    with tarfile.open(out / "ab_runs.tar.gz") as tar:
        names = tar.getnames()
    assert "ab_runs/base_1.log" in names and any(n.endswith("rec0.json") for n in names)


def test_a_failing_base_run_still_restores_the_tree(repo, tmp_path_factory, monkeypatch):
    ab.prepare("HEAD~1", ["pkg/val.txt"], root=repo)
    monkeypatch.setenv("AB_TEST_EXIT", "3")
    out = tmp_path_factory.mktemp("out")
    summary = ab.run([sys.executable, "bench.py"], out, repeat=1, metric="figures.v", root=repo)
    assert [r["rc"] for r in summary["runs"]] == [3, 0]
    assert summary["median"] == {"base": None, "new": 2.0} and "new_over_base" not in summary
    assert (repo / "pkg" / "val.txt").read_text() == "2"


def test_errors_name_what_is_missing(repo, tmp_path):
    with pytest.raises(SystemExit, match="ab.json not found.*prepare"):
        ab.run([sys.executable, "-c", "pass"], tmp_path / "out", root=repo)
    with pytest.raises(SystemExit, match="cannot resolve revision 'nope'"):
        ab.prepare("nope", ["pkg/val.txt"], root=repo)
    with pytest.raises(SystemExit, match="relative to the repository root"):
        ab.prepare("HEAD", ["../x"], root=repo)


def test_cli_refuses_a_run_without_a_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ab.main(["run", "--out", str(tmp_path), "--"])
    assert e.value.code == 2 and "run needs a command after --" in capsys.readouterr().err


def test_two_base_folders_hold_two_base_revisions(repo, tmp_path_factory):
    """--base-dir: two A/Bs prepared side by side, each run against its own base."""
    (repo / "pkg" / "val.txt").write_text("3")  # working tree 3, HEAD 2, HEAD~1 1
    ab.prepare("HEAD~1", ["pkg/val.txt"], root=repo, base_dir="ab_base_one")
    ab.prepare("HEAD", ["pkg/val.txt"], root=repo, base_dir="ab_base_two")
    for name, base_value in (("ab_base_one", 1.0), ("ab_base_two", 2.0)):
        s = ab.run([sys.executable, "bench.py"], tmp_path_factory.mktemp(name), repeat=1, metric="figures.v",
                   root=repo, base_dir=name)
        assert s["median"] == {"base": base_value, "new": 3.0}
    assert (repo / "pkg" / "val.txt").read_text() == "3"


@pytest.mark.parametrize("bad", [".", "pkg", "../ab_base", "ab_base/../pkg"])
def test_a_base_folder_outside_the_ignored_names_is_refused(repo, tmp_path, bad):
    with pytest.raises(SystemExit, match="must be a name starting with 'ab_base'"):
        ab.prepare("HEAD", ["pkg/val.txt"], root=repo, base_dir=bad)
    with pytest.raises(SystemExit, match="must be a name starting with 'ab_base'"):
        ab.run([sys.executable, "-c", "pass"], tmp_path / "out", root=repo, base_dir=bad)
    assert (repo / "pkg" / "val.txt").exists()


def test_record_from_a_returned_ab_folder(repo, tmp_path_factory):
    """`ab record`: the machine fields from the runs' records, each run's metric, the medians."""
    bench = (repo / "bench.py").read_text().replace(
        "{'figures':", "{'gpu': 'NVIDIA H100 80GB HBM3', 'torch': '2.11', 'date': 'd', 'figures':")
    (repo / "bench.py").write_text(bench)
    ab.prepare("HEAD~1", ["pkg/val.txt"], root=repo)
    out = tmp_path_factory.mktemp("out")
    ab.run([sys.executable, "bench.py"], out, repeat=2, metric="figures.v", root=repo)
    path = ab.record(out, "thing_ab", "base: val 1, new: val 2", root=repo)
    assert path == repo / "experiments" / "results" / "h100-80gb-hbm3" / "thing_ab.json"
    rec = json.loads(path.read_text())
    assert rec["gpu"] == "NVIDIA H100 80GB HBM3" and rec["torch"] == "2.11" and rec["commit_note"].startswith("base")
    f = rec["figures"]
    assert f["median"] == {"base": 1.0, "new": 2.0} and f["new_over_base"] == 2.0
    assert [(r["label"], r["metric"]) for r in f["runs"]] == [("base", [1.0]), ("new", [2.0])] * 2
    assert f["base"]["files"] == ["pkg/val.txt"]
    assert rec["command"] == ("python -m experiments.ab run --repeat 2 --metric figures.v --out OUT -- "
                              f"{sys.executable} bench.py")
    with pytest.raises(SystemExit, match="thing_ab.json exists"):
        ab.record(out, "thing_ab", "again", root=repo)
    assert json.loads(path.read_text())["commit_note"].startswith("base")
    assert json.loads(ab.record(out, "thing_ab", "again", root=repo, force=True).read_text())["commit_note"] == "again"
    with pytest.raises(SystemExit, match="ab_summary.json not found"):
        ab.record(tmp_path_factory.mktemp("empty"), "x", "y", root=repo)


def test_record_without_a_metric_and_with_a_base_dir(repo, tmp_path_factory):
    """The recorded command line is the one that ran: no --metric when none was given, the
    base folder and timeout when they were; a first record without the machine's fields is
    skipped for one that has them."""
    bench = (repo / "bench.py").read_text().replace(
        "{'figures':", "{'gpu': 'NVIDIA H200', 'figures':")
    bench = bench.replace("sys.exit(", "(out / 'a_plain.json').write_text('{}')  # no machine fields, sorts first\nsys.exit(")
    (repo / "bench.py").write_text(bench)
    ab.prepare("HEAD~1", ["pkg/val.txt"], root=repo, base_dir="ab_base_x")
    out = tmp_path_factory.mktemp("out")
    ab.run([sys.executable, "bench.py", "--flag=a b"], out, repeat=1, root=repo, base_dir="ab_base_x", timeout=60)
    with tarfile.open(out / "ab_runs.tar.gz") as tar:
        jsons = [m.name for m in tar.getmembers() if m.name.endswith(".json")]
    assert jsons[0].endswith("a_plain.json"), jsons
    rec = json.loads(ab.record(out, "plain_ab", "n", root=repo).read_text())
    assert rec["command"] == ("python -m experiments.ab run --repeat 1 --timeout 60 --base-dir ab_base_x --out OUT "
                              f"-- {sys.executable} bench.py '--flag=a b'")
    assert rec["figures"]["median"] is None and rec["figures"]["metric"] is None
    (out / "ab_runs.tar.gz").unlink()
    with pytest.raises(SystemExit, match="ab_runs.tar.gz not found"):
        ab.record(out, "other", "n", root=repo)
