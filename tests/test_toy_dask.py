"""``--scheduler``: the same (experiment, seed) runs on a Dask distributed cluster (a 2-worker LocalCluster
here) give exactly the numbers of the local sequential run; without Dask installed, a one-line error."""

import io
import json
import sys

import pytest

from tests import toy_dummies
from toy_experiments.parallel import run_suite

toy_dummies.unregister()  # registered only while a test uses the fixture (workers import the module anew)

NO_DASK = ("Dask distributed is not installed (the optional 'cluster' extra: "
           "python -m pip install '.[cluster]'; CI installs it)")


@pytest.fixture
def dummies():
    exps = toy_dummies.register()
    yield {e.name: e for e in exps}
    toy_dummies.unregister()


@pytest.fixture(scope="module")
def cluster():
    try:
        import distributed
    except ImportError:
        pytest.skip(NO_DASK)
    # separate worker processes (a nanny each), one thread each: like a real cluster's workers
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        yield c


def test_dask_cluster_gives_the_numbers_of_the_local_run(tmp_path, dummies, cluster):
    exps = [dummies["toy_dummy_a"], dummies["toy_dummy_b"]]
    names, seeds = [e.name for e in exps], [0, 1]
    log = io.StringIO()
    for where, scheduler in (("local", None), ("dask", cluster.scheduler_address)):
        run_suite(exps, level="tiny", seeds=seeds, dests={e.name: tmp_path / where / e.name for e in exps},
                  scheduler=scheduler, stream=log if scheduler else io.StringIO())
    assert toy_dummies.results(tmp_path / "dask", names, seeds) == toy_dummies.results(tmp_path / "local", names,
                                                                                        seeds)
    # the workers sent the files back; this process wrote them (figures included)
    assert (tmp_path / "dask" / "toy_dummy_a" / "seed-1" / "curve.npy").stat().st_size > 100
    lines = log.getvalue().splitlines()
    assert [ln.split(",")[0] for ln in lines] == [f"[suite {k}/4 finished" for k in range(1, 5)]
    assert all(f"on the Dask scheduler {cluster.scheduler_address}" in ln for ln in lines)


def test_command_line_scheduler(tmp_path, dummies, cluster, capsys):
    from toy_experiments.__main__ import main

    args = ["run", "toy_dummy_b", "--tiny", "--seeds", "0,1", "--out"]
    assert main([*args, str(tmp_path / "local")]) == 0
    assert main([*args, str(tmp_path / "dask"), "--scheduler", cluster.scheduler_address]) == 0
    local, dask = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("local", "dask"))
    assert dask["metrics"] == local["metrics"] and dask["verdict"] == local["verdict"]


def test_unreachable_scheduler_is_one_line(tmp_path, dummies, capsys):
    dask = pytest.importorskip("dask", reason=NO_DASK)
    pytest.importorskip("distributed", reason=NO_DASK)
    from toy_experiments.__main__ import main

    with dask.config.set({"distributed.comm.timeouts.connect": "200ms"}):
        rc = main(["run", "toy_dummy_b", "--tiny", "--out", str(tmp_path / "x"), "--scheduler", "tcp://127.0.0.1:9"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot connect to the Dask scheduler at tcp://127.0.0.1:9" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_without_dask_scheduler_is_a_one_line_error(tmp_path, dummies, capsys, monkeypatch):
    from toy_experiments.__main__ import main

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed: importing it fails
    rc = main(["run", "toy_dummy_b", "--tiny", "--out", str(tmp_path / "x"), "--scheduler", "tcp://127.0.0.1:8786"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--scheduler needs Dask distributed" in err[0]
    assert list(tmp_path.iterdir()) == []
