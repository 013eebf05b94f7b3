"""The executor seam on a real Dask cluster: same numbers as the local executor.

A ``distributed.LocalCluster`` of worker processes (one per module), and in one
test a ``dask scheduler`` + ``dask worker`` pair started as subprocesses; all
on 127.0.0.1. Marked ``dask`` and grouped so that CI runs them on one xdist
worker; each uses a handful of small cases.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from oarbench.executors import LocalExecutor, parse_resources

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.dask, pytest.mark.xdist_group("dask")]

SPACING_XYZ = (0.9, 0.8, 2.5)


def _write(path: Path, arr: np.ndarray) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING_XYZ)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _study(root: Path, n: int, shape=(12, 20, 24)) -> tuple[Path, Path, Path]:
    """n cases, each prediction shifted by i % 3 voxels (different numbers per case)."""
    ref_dir, pred_dir = root / "ref", root / "pred"
    for i in range(n):
        ref = np.zeros(shape, np.uint8)
        ref[2:9, 3:12, 3:14] = 1
        ref[4:8, 13:17, 4:8] = 2
        ref[4:8, 13:17, 15:19] = 3
        _write(ref_dir / f"case{i:02d}.nii.gz", ref)
        _write(pred_dir / f"case{i:02d}.nii.gz", np.roll(ref, i % 3, axis=2))
    labels = root / "labels.toml"
    labels.write_text("[labels]\nLiver = 1\nKidney_L = 2\nKidney_R = 3\n")
    return ref_dir, pred_dir, labels


def _cli(args: list[str]):
    from oarbench.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def cluster():
    from oarbench.executors import DaskExecutor

    ex = DaskExecutor(workers=2, echo=None)
    try:
        yield ex
    finally:
        ex.close()


# --- the seam itself ----------------------------------------------------------------------------


def _square(x: int) -> int:
    return x * x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("case 3: bad input")
    return x


def test_parse_resources() -> None:
    assert parse_resources(["GPU=1", "MEM=4e9,FOO=0.5"]) == {"GPU": 1.0, "MEM": 4e9, "FOO": 0.5}
    assert parse_resources(None) == {}
    for bad in ("GPU", "GPU=0", "=1", "GPU=x", "GPU=-1"):
        with pytest.raises(ValueError, match="NAME=AMOUNT"):
            parse_resources([bad])


@pytest.mark.parametrize("workers", [1, 2])
def test_local_executor_order_callbacks_errors(workers: int) -> None:
    seen: list[tuple[int, int]] = []
    ex = LocalExecutor(workers)
    assert ex.map(_square, list(range(7)), on_result=lambda i, r: seen.append((i, r))) == [i * i for i in range(7)]
    assert sorted(seen) == [(i, i * i) for i in range(7)]
    with pytest.raises(ValueError, match="case 3: bad input"):
        ex.map(_fail_on_three, list(range(6)))
    # the caller's own work while a pool runs: once, only with a pool, in this process, after the workers started
    calls: list[int] = []
    assert ex.map(_square, [1, 2, 3], while_running=lambda: calls.append(os.getpid())) == [1, 4, 9]
    assert calls == ([] if workers == 1 else [os.getpid()])


def test_evaluate_imports_pandas_only_after_the_workers_fork() -> None:
    """A forked worker never inherits a half-done import: the evaluate path imports pandas after the pool
    started (in a background thread), not at import time."""
    code = ("import sys, oarbench.evaluate, oarbench.tables, oarbench.cli.evaluate_cmd; "
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_dask_executor_order_callbacks_errors_window(cluster) -> None:
    seen: list[tuple[int, int]] = []
    assert cluster.map(_square, list(range(25)), on_result=lambda i, r: seen.append((i, r))) == [i * i for i in range(25)]
    assert sorted(seen) == [(i, i * i) for i in range(25)]
    # fewer tasks in flight than tasks: the window refills as tasks finish
    small = type(cluster).__new__(type(cluster))
    small.__dict__.update(cluster.__dict__, max_in_flight=3)
    assert small.map(_square, list(range(10))) == [i * i for i in range(10)]
    with pytest.raises(ValueError, match="case 3: bad input"):
        cluster.map(_fail_on_three, list(range(6)))
    # several tasks per Dask task: results, callbacks and errors still per task
    batched = type(cluster).__new__(type(cluster))
    batched.__dict__.update(cluster.__dict__, batch=4, max_in_flight=2)
    seen.clear()
    assert batched.map(_square, list(range(11)), on_result=lambda i, r: seen.append((i, r))) == [i * i for i in range(11)]
    assert sorted(seen) == [(i, i * i) for i in range(11)]
    with pytest.raises(ValueError, match="case 3: bad input"):
        batched.map(_fail_on_three, list(range(6)))


def test_two_clusters_in_one_process(cluster) -> None:
    """Each executor waits on its own client, not on the process's most recent one."""
    from concurrent.futures import ThreadPoolExecutor

    from oarbench.executors import DaskExecutor

    with DaskExecutor(workers=1, echo=None) as other, ThreadPoolExecutor(1) as pool:
        assert pool.submit(cluster.map, _square, list(range(30))).result(timeout=120) == [i * i for i in range(30)]
        assert pool.submit(other.map, _square, list(range(5))).result(timeout=120) == [i * i for i in range(5)]


def test_missing_dask_is_one_line_error(monkeypatch) -> None:
    import builtins

    real = builtins.__import__

    def no_distributed(name, *args, **kwargs):
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_distributed)
    from oarbench.executors import make_executor

    with pytest.raises(ValueError, match=r"pip install 'oarbench\[dask\]'"):
        make_executor("dask", workers=1)


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_byte_identical_local_vs_dask(tmp_path, cluster) -> None:
    from oarbench.evaluate import EvalOptions, evaluate_jobs, jobs_from_folders, write_outputs
    from oarbench.labels import load_label_map

    ref_dir, pred_dir, labels = _study(tmp_path, 6)
    local = _cli(["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir), "--labels", str(labels),
                  "--out", str(tmp_path / "local"), "--workers", "2", "--quiet"])
    assert local.exit_code == 0, local.output
    options = EvalOptions(labels=load_label_map(labels))
    table, prov = evaluate_jobs(jobs_from_folders(ref_dir, pred_dir), options, tmp_path / "dask", executor=cluster,
                                progress=False)
    write_outputs(tmp_path / "dask", table, prov)
    assert prov["cases_computed"] == 6 and prov["options"]["executor"] == "DaskExecutor"
    local_csv = (tmp_path / "local" / "metrics.csv").read_bytes()
    assert (tmp_path / "dask" / "metrics.csv").read_bytes() == local_csv
    assert (tmp_path / "dask" / "summary.csv").read_bytes() == (tmp_path / "local" / "summary.csv").read_bytes()
    # shifted by 1 voxel along x (0.9 mm): the Liver DSC of case01 is 2 * (7*9*10) / (2 * 7*9*11) = 10/11
    t = table.set_index(["case", "structure"])
    assert t.loc[("case01", "Liver"), "dsc"] == pytest.approx(10 / 11)
    # resume on Dask: a second run takes everything from the cache
    _, again = evaluate_jobs(jobs_from_folders(ref_dir, pred_dir), options, tmp_path / "dask", executor=cluster,
                             progress=False)
    assert again["cases_computed"] == 0 and again["cases_from_cache"] == 6


def test_evaluate_cli_local_cluster_prints_dashboard(tmp_path) -> None:
    # tasks that ask for GPU=1 run: the local cluster gives its workers the resources asked for
    ref_dir, pred_dir, labels = _study(tmp_path, 3)
    result = _cli(["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir), "--labels", str(labels),
                   "--out", str(tmp_path / "out"), "--executor", "dask", "--workers", "1", "--resources", "GPU=1",
                   "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Dask LocalCluster (1 worker processes) at tcp://127.0.0.1:" in result.output
    assert "dashboard:" in result.output
    assert "3 cases computed" in result.output


def test_cli_executor_option_errors(tmp_path) -> None:
    ref_dir, pred_dir, labels = _study(tmp_path, 1)
    base = ["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir), "--labels", str(labels),
            "--out", str(tmp_path / "o")]
    r = _cli(base + ["--scheduler", "tcp://127.0.0.1:1"])
    assert r.exit_code == 1 and "--scheduler needs --executor dask" in r.output
    r = _cli(base + ["--executor", "dask", "--resources", "GPU"])
    assert r.exit_code == 1 and "NAME=AMOUNT" in r.output
    assert "Traceback" not in r.output
    r = _cli(base + ["--batch", "4"])
    assert r.exit_code == 1 and "--batch needs --executor dask" in r.output
    for bad in ("0", "some"):
        r = _cli(base + ["--executor", "dask", "--batch", bad])
        assert r.exit_code == 2 and "neither 'auto' nor a whole number" in r.output


def test_killed_worker_loses_only_its_task(tmp_path, cluster) -> None:
    """SIGKILL one worker process mid-run: Dask reruns its task elsewhere, the output is identical."""
    from oarbench.evaluate import EvalOptions, evaluate_jobs, jobs_from_folders, write_outputs
    from oarbench.labels import load_label_map

    n = 16
    ref_dir, pred_dir, labels = _study(tmp_path, n, shape=(40, 64, 64))
    options = EvalOptions(labels=load_label_map(labels))
    jobs = jobs_from_folders(ref_dir, pred_dir)
    client = cluster.client
    pids_before = set(client.run(os.getpid).values())
    out = tmp_path / "killed"
    killed: list[int] = []
    done_at_kill: list[int] = []

    def complete() -> int:
        cache = out / "cache"
        return len([p for p in cache.rglob("*.json") if ".partial" not in p.name]) if cache.exists() else 0

    def killer() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and complete() < 2:
            time.sleep(0.005)
        pid = sorted(pids_before)[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        done_at_kill.append(complete())

    thread = threading.Thread(target=killer)
    thread.start()
    table, prov = evaluate_jobs(jobs, options, out, executor=cluster, progress=False)
    thread.join()
    assert killed, "no worker was killed"
    assert done_at_kill[0] < n, "the worker was killed after the run had finished"
    write_outputs(out, table, prov)
    assert prov["cases_computed"] == n
    # the nanny restarted the killed worker: a new process took its place
    deadline = time.time() + 30
    while time.time() < deadline and len(client.scheduler_info()["workers"]) < 2:
        time.sleep(0.1)
    assert killed[0] not in set(client.run(os.getpid).values())
    clean = tmp_path / "clean"
    t2, p2 = evaluate_jobs(jobs, options, clean, workers=1, progress=False)
    write_outputs(clean, t2, p2)
    assert (out / "metrics.csv").read_bytes() == (clean / "metrics.csv").read_bytes()


# --- a scheduler and a worker started as separate processes ----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_scheduler_and_worker_subprocesses(tmp_path) -> None:
    dask_cli = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    if dask_cli is None:
        pytest.skip("the dask command is not installed")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0", "--no-show"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        procs.append(subprocess.Popen([dask_cli, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                       "--nworkers", "1", "--resources", "GPU=1", "--no-dashboard"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        client = distributed.Client(address, timeout="30s")
        client.wait_for_workers(1, timeout=60)
        client.close()
        ref_dir, pred_dir, labels = _study(tmp_path, 4)
        base = ["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir), "--labels", str(labels),
                "--quiet"]
        r = _cli(base + ["--out", str(tmp_path / "remote"), "--executor", "dask", "--scheduler", address,
                         "--resources", "GPU=1"])
        assert r.exit_code == 0, r.output
        assert f"Dask scheduler at {address}" in r.output and "4 cases computed" in r.output
        r = _cli(base + ["--out", str(tmp_path / "local")])
        assert r.exit_code == 0, r.output
        assert (tmp_path / "remote" / "metrics.csv").read_bytes() == (tmp_path / "local" / "metrics.csv").read_bytes()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


# --- robustness: one task per case x condition ---------------------------------------------------


class _HUPredictor:
    """A picklable in-process predictor (the HU rule of the robustness tests)."""

    def predict(self, image_paths, out_dir):
        from oarbench.io import read_volume, write_volume
        from tests.test_robustness import segment

        out = {}
        for p in image_paths:
            vol = read_volume(p)
            case = Path(p).name[: -len("_0000.nii.gz")]
            out[case] = write_volume(vol.with_array(np.asarray(segment(vol.array), dtype=np.uint8)),
                                     Path(out_dir) / f"{case}.nii.gz")
        return out

    def describe(self):
        return {"kind": "hu-rule"}


class _FailingPredictor(_HUPredictor):
    def predict(self, image_paths, out_dir):
        raise RuntimeError("the predictor must not be called: results are cached")


def test_robustness_byte_identical_local_vs_dask(tmp_path, cluster) -> None:
    from oarbench.robustness import run_robustness
    from oarbench.robustness.run import write_robustness
    from tests.test_robustness import LABELS, make_phantom, write_case
    from oarbench.robustness.transforms import Reorient

    ct, ref = make_phantom(shape=(16, 32, 40))
    write_case(tmp_path, "P001", ct, ref)
    ras = Reorient("ASR")
    write_case(tmp_path, "P002", ras.apply(ct), ras.apply(ref))
    images, reference = tmp_path / "images", tmp_path / "reference"
    conds = ["flip_lr", "rot_z+10"]
    seq = run_robustness(images, reference, _HUPredictor(), conds, LABELS)
    saved = str(tmp_path / "saved" / "{condition}")
    cache = tmp_path / "cache"
    dask = run_robustness(images, reference, _HUPredictor(), conds, LABELS, executor=cluster, save_predictions=saved,
                          cache_dir=cache)
    # one task per condition (original and controls added) x case; rows in the sequential run's order
    n_conditions = dask.table["condition"].nunique()
    assert n_conditions >= 3 and len(dask.table) == n_conditions * 2 * len(LABELS)
    assert len(dask.noise_floor) == len(seq.noise_floor) > 0
    write_robustness(seq, tmp_path / "seq")
    write_robustness(dask, tmp_path / "dask")
    for name in ("robustness.csv", "noise_floor.csv", "robustness_summary.csv"):
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "seq" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "saved" / "flip_lr").iterdir()) == ["P001.nii.gz", "P002.nii.gz"]
    # the HU rule is exact on the unperturbed phantom (an independent check that the tasks really ran)
    orig = dask.table[dask.table["condition"] == "original"]
    assert (orig["dsc"] == 1.0).all()
    # resume: every case x condition is stored, so a re-run never calls the predictor
    assert len(list(cache.rglob("*.json"))) == n_conditions * 2
    again = run_robustness(images, reference, _FailingPredictor(), conds, LABELS, executor=cluster, cache_dir=cache)
    write_robustness(again, tmp_path / "again")
    for name in ("robustness.csv", "noise_floor.csv", "robustness_summary.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "seq" / name).read_bytes(), name
    # a changed input invalidates only that case's results
    stale = next(cache.rglob("flip_lr/P002.json"))
    (tmp_path / "reference" / "P002.nii.gz").touch()
    with pytest.raises(Exception, match="must not be called"):
        run_robustness(images, reference, _FailingPredictor(), conds, LABELS, executor=cluster, cache_dir=cache)
    assert stale.exists()


# --- absent: one task per case ---------------------------------------------------------------------

from tests.test_absent import BLOBS, META, _preds, study  # noqa: E402,F401  (study: the absent fixture)


def test_absent_identical_local_vs_dask(study, cluster, tmp_path) -> None:  # noqa: F811
    from oarbench.absent import analyse_absent, read_nephrectomy, write_absent

    refs = {c: study / "ref" / f"{c}.nii.gz" for c in META}
    neph = read_nephrectomy(study / "meta.csv")
    seq = analyse_absent(neph, _preds(study), references=refs)
    dask = analyse_absent(neph, _preds(study), references=refs, executor=cluster)
    write_absent(seq, tmp_path / "seq")
    paths = write_absent(dask, tmp_path / "dask")
    for path in paths.values():
        assert path.read_bytes() == (tmp_path / "seq" / path.name).read_bytes(), path.name
    # an independent check: model B's only blob is 3 mL (voxelised sphere within 1 %)
    b = dask.cases.set_index(["model", "case"]).loc[("B", "c1")]
    assert b["status"] == "fp" and b["pred_ml"] == pytest.approx(BLOBS["B"]["c1"], rel=0.01)
    assert set(dask.warnings["case"]) == {"c2", "c7"}


# --- inputs and outputs on S3 (moto on loopback) ----------------------------------------------------


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on 127.0.0.1 (moto server mode); credentials and endpoint from the environment,
    as a user would pass them, so that worker processes started afterwards see them too."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists("bucket"):  # moto keeps its buckets for the whole test process
        fs.mkdir("bucket")
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_s3_inputs_and_outputs_on_dask(tmp_path, s3) -> None:
    from oarbench.tables import read_table

    ref_dir, pred_dir, labels = _study(tmp_path, 4)
    s3.put(str(ref_dir), "bucket/study/ref", recursive=True)
    s3.put(str(pred_dir), "bucket/study/pred", recursive=True)
    base = ["--labels", str(labels), "--quiet"]
    local = _cli(["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir),
                  "--out", str(tmp_path / "local")] + base)
    assert local.exit_code == 0, local.output
    r = _cli(["evaluate", "--reference", "s3://bucket/study/ref", "--prediction", "s3://bucket/study/pred",
              "--out", "s3://bucket/results", "--executor", "dask", "--workers", "1"] + base)
    assert r.exit_code == 0, r.output
    assert "4 cases computed, 0 from cache" in r.output
    s3.invalidate_cache()
    assert s3.cat("bucket/results/metrics.csv") == (tmp_path / "local" / "metrics.csv").read_bytes()
    assert sorted(s3.ls("bucket/results/metrics.parquet")) == ["bucket/results/metrics.parquet/centre=all"]
    remote = read_table("s3://bucket/results/metrics.parquet")
    assert remote.equals(read_table(tmp_path / "local" / "metrics.parquet"))
    # resume: the per-case cache lives in the bucket too
    again = _cli(["evaluate", "--reference", "s3://bucket/study/ref", "--prediction", "s3://bucket/study/pred",
                  "--out", "s3://bucket/results"] + base)
    assert again.exit_code == 0 and "0 cases computed, 4 from cache" in again.output
    # file:// URLs are local paths
    r = _cli(["evaluate", "--reference", ref_dir.as_uri(), "--prediction", pred_dir.as_uri(),
              "--out", (tmp_path / "fileurl").as_uri()] + base)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "fileurl" / "metrics.csv").read_bytes() == (tmp_path / "local" / "metrics.csv").read_bytes()
    # a missing remote folder is a clear error naming the URL
    r = _cli(["evaluate", "--reference", "s3://bucket/nothing", "--prediction", "s3://bucket/study/pred",
              "--out", str(tmp_path / "x")] + base)
    assert r.exit_code == 1 and "s3://bucket/nothing: folder not found" in r.output and "Traceback" not in r.output


def test_s3_absent_and_robustness_inputs(tmp_path, s3, study, cluster) -> None:  # noqa: F811
    from oarbench.absent import analyse_absent, read_nephrectomy, write_absent
    from oarbench.io import find_cases

    s3.put(str(study / "ref"), "bucket/absent/ref", recursive=True)
    s3.put(str(study / "A"), "bucket/absent/A", recursive=True)
    neph = read_nephrectomy(study / "meta.csv")
    remote = analyse_absent(neph, {"A": find_cases("s3://bucket/absent/A")},
                            references=find_cases("s3://bucket/absent/ref"))
    local = analyse_absent(neph, {"A": _preds(study)["A"]}, references={c: study / "ref" / f"{c}.nii.gz" for c in META})
    cols = [c for c in remote.cases.columns if c != "prediction"]
    assert remote.cases[cols].equals(local.cases[cols])
    assert remote.cases["prediction"].str.startswith("s3://bucket/absent/A/").all()
    write_absent(local, tmp_path / "out")
    write_absent(remote, "s3://bucket/absent/out")
    s3.invalidate_cache()
    assert s3.cat("bucket/absent/out/absent_summary.csv") == (tmp_path / "out" / "absent_summary.csv").read_bytes()


def test_s3_robustness_inputs_and_outputs(tmp_path, s3) -> None:
    """Robustness tasks read their image and reference from the bucket; the tables go back to it."""
    from oarbench.executors import LocalExecutor
    from oarbench.robustness import run_robustness
    from oarbench.robustness.run import write_robustness
    from tests.test_robustness import LABELS, make_phantom, write_case

    ct, ref = make_phantom(shape=(16, 32, 40))
    write_case(tmp_path, "P001", ct, ref)
    s3.put(str(tmp_path / "images"), "bucket/rob/images", recursive=True)
    s3.put(str(tmp_path / "reference"), "bucket/rob/reference", recursive=True)
    local = run_robustness(tmp_path / "images", tmp_path / "reference", _HUPredictor(), ["flip_lr"], LABELS)
    remote = run_robustness("s3://bucket/rob/images", "s3://bucket/rob/reference", _HUPredictor(), ["flip_lr"],
                            LABELS, executor=LocalExecutor(1), cache_dir="s3://bucket/rob/out/cache")
    write_robustness(local, tmp_path / "local")
    write_robustness(remote, "s3://bucket/rob/out")
    s3.invalidate_cache()
    assert s3.cat("bucket/rob/out/robustness.csv") == (tmp_path / "local" / "robustness.csv").read_bytes()
    assert len(s3.find("bucket/rob/out/cache")) == remote.table["condition"].nunique()


# --- batch sizes ------------------------------------------------------------------------------------


def test_batch_sizer_fixed_and_auto() -> None:
    from oarbench.executors import AUTO_BATCH_MAX, AUTO_BATCH_SECONDS, BatchSizer

    fixed = BatchSizer(8, workers=2)
    assert [fixed.next_size(r) for r in (100, 8, 3, 0)] == [8, 8, 3, 0]
    auto = BatchSizer("auto", workers=2)
    assert auto.next_size(1000) == 1  # nothing measured yet: one case per Dask task
    auto.record(1, 0.010)  # 10 ms per case
    assert auto.next_size(1000) == int(AUTO_BATCH_SECONDS / 0.010)  # 20 cases, about 0.2 s of work
    # near the end the size shrinks so that every worker still gets two Dask tasks: ceil(30 / 4)
    assert auto.next_size(30) == 8
    assert auto.next_size(3) == 1
    # the median of the measured times per case: one slow first task (imports) does not decide
    auto.record(4, 0.040)
    auto.record(20, 5.0)
    assert auto.next_size(1000) == int(AUTO_BATCH_SECONDS / 0.010)
    slow = BatchSizer("auto", workers=4)
    slow.record(1, 2.5)  # CT-sized cases: one case per Dask task
    assert slow.next_size(1000) == 1
    fast = BatchSizer("auto", workers=1)
    fast.record(100, 0.0)
    assert fast.next_size(10_000) == AUTO_BATCH_MAX
    for bad in (0, -1, "many", 2.5, True):
        with pytest.raises(ValueError, match="batch must be 'auto' or an integer"):
            BatchSizer(bad, workers=1)


def _sleep_square(x: int) -> int:
    time.sleep(0.002)
    return x * x


def test_auto_batches_tiny_tasks_and_keeps_order(cluster) -> None:
    """auto (the default) groups tiny cases into larger Dask tasks; results and callbacks stay per case."""
    assert cluster.batch == "auto"
    seen: list[tuple[int, int]] = []
    n = 400
    with distributed.get_task_stream(cluster.client) as stream:
        out = cluster.map(_sleep_square, list(range(n)), on_result=lambda i, r: seen.append((i, r)), name="sq")
    assert out == [i * i for i in range(n)]
    assert sorted(seen) == [(i, i * i) for i in range(n)]
    keys = {str(t["key"]) for t in stream.data if str(t["key"]).startswith("sq-")}
    # fewer Dask tasks than cases: tiny cases were grouped
    assert 0 < len(keys) < n / 4, len(keys)


# --- a scheduler that asks who is calling: TLS with certificates ----------------------------------


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a certificate for the cluster (scheduler and worker), one for this client, and a second CA
    with a client certificate of its own (an outsider's), as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def sign_certificate(name: str, issuer_name: x509.Name | None, issuer_key, ca: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            import ipaddress

            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return key, cert

    def save(stem: str, key, cert) -> None:
        paths[f"{stem}_cert"] = folder / f"{stem}.crt"
        paths[f"{stem}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{stem}_key"] = folder / f"{stem}.key"
        paths[f"{stem}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        paths[f"{stem}_key"].chmod(0o600)

    ca_key, ca_cert = sign_certificate("oarbench test CA", None, None, ca=True)
    save("ca", ca_key, ca_cert)
    for stem in ("cluster", "client"):
        save(stem, *sign_certificate(f"oarbench test {stem}", ca_cert.subject, ca_key, ca=False))
    other_key, other_cert = sign_certificate("another CA", None, None, ca=True)
    save("other_ca", other_key, other_cert)
    save("outsider", *sign_certificate("outsider", other_cert.subject, other_key, ca=False))
    return paths


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """A LocalCluster on 127.0.0.1 that speaks TLS only and requires client certificates of its CA."""
    pytest.importorskip("cryptography")
    from distributed.security import Security

    certs = _certificates(tmp_path_factory.mktemp("certs"))
    server = Security(require_encryption=True, tls_ca_file=str(certs["ca_cert"]),
                      tls_scheduler_cert=str(certs["cluster_cert"]), tls_scheduler_key=str(certs["cluster_key"]),
                      tls_worker_cert=str(certs["cluster_cert"]), tls_worker_key=str(certs["cluster_key"]),
                      tls_client_cert=str(certs["cluster_cert"]), tls_client_key=str(certs["cluster_key"]))
    local = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
                                     host="127.0.0.1", security=server, dashboard_address=None, silence_logs=40)
    try:
        assert local.scheduler_address.startswith("tls://127.0.0.1:")
        yield local.scheduler_address, certs
    finally:
        local.close()


def test_tls_scheduler_with_certificates_gives_the_local_numbers(tmp_path, tls_cluster) -> None:
    address, certs = tls_cluster
    ref_dir, pred_dir, labels = _study(tmp_path, 3)
    base = ["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir), "--labels", str(labels), "--quiet"]
    local = _cli(base + ["--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    tls = ["--executor", "dask", "--scheduler", address, "--tls-ca-file", str(certs["ca_cert"]),
           "--tls-cert", str(certs["client_cert"]), "--tls-key", str(certs["client_key"])]
    result = _cli(base + ["--out", str(tmp_path / "tls")] + tls)
    assert result.exit_code == 0, result.output
    assert f"Dask scheduler at {address}" in result.output and "3 cases computed" in result.output
    assert (tmp_path / "tls" / "metrics.csv").read_bytes() == (tmp_path / "local" / "metrics.csv").read_bytes()

    # the library: the Security that dask_security builds requires encryption, and tasks run
    from oarbench.executors import dask_security, make_executor

    security = dask_security(address, ca_file=certs["ca_cert"], cert=certs["client_cert"], key=certs["client_key"])
    assert security.require_encryption and security.tls_client_cert == str(certs["client_cert"])
    with make_executor("dask", scheduler=address, tls_ca_file=certs["ca_cert"], tls_cert=certs["client_cert"],
                       tls_key=certs["client_key"], echo=None) as ex:
        assert ex.map(_square, list(range(5))) == [0, 1, 4, 9, 16]


def test_tls_scheduler_refuses_clients_without_its_certificates(tls_cluster) -> None:
    from distributed.security import Security

    address, certs = tls_cluster
    port = address.rsplit(":", 1)[1]
    # no credentials at all: a plain client on the TLS port gets no connection
    with pytest.raises((OSError, TimeoutError)):
        distributed.Client(f"tcp://127.0.0.1:{port}", timeout="3s")
    # a certificate from another CA: the scheduler does not accept it
    outsider = Security(require_encryption=True, tls_ca_file=str(certs["ca_cert"]),
                        tls_client_cert=str(certs["outsider_cert"]), tls_client_key=str(certs["outsider_key"]))
    with pytest.raises((OSError, TimeoutError)):
        distributed.Client(address, security=outsider, timeout="3s")
    # oarbench itself: a tls:// address without certificates is one line, before any connection
    r = _cli(["evaluate", "--reference", ".", "--prediction", ".", "--executor", "dask", "--scheduler", address])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == (
        f"Error: --scheduler {address}: TLS needs --tls-ca-file, --tls-cert and --tls-key (or Dask's "
        "distributed.comm.tls settings); docs/scale.md")


def test_plain_tcp_scheduler_off_loopback_is_refused(tmp_path) -> None:
    from oarbench.executors import dask_security

    ref_dir, pred_dir, labels = _study(tmp_path, 1)
    base = ["evaluate", "--reference", str(ref_dir), "--prediction", str(pred_dir), "--labels", str(labels),
            "--out", str(tmp_path / "o"), "--executor", "dask"]
    for address in ("tcp://192.0.2.10:8786", "192.0.2.10:8786", "tcp://dask-scheduler.example:8786",
                    "tcp://[2001:db8::1]:8786"):
        start = time.monotonic()
        r = _cli(base + ["--scheduler", address])
        assert time.monotonic() - start < 10  # refused before any connection attempt (Client waits 20 s)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]  # after the labels note
        assert len(errors) == 1 and r.output.strip().splitlines()[-1] == errors[0], r.output
        line = errors[0]
        assert line.startswith(f"Error: --scheduler {address}: a plain tcp:// scheduler is unauthenticated and "
                               "unencrypted")
        assert "--insecure" in line and "tls://" in line
    assert not (tmp_path / "o").exists()
    # loopback and --insecure pass the check; certificate files with a plain address are refused
    for address in ("tcp://127.0.0.1:8786", "localhost:8786", "tcp://[::1]:8786", "tcp://127.0.1.1:8786",
                    "inproc://127.0.0.1/1/1"):
        assert dask_security(address) is None
    assert dask_security("tcp://192.0.2.10:8786", insecure=True) is None
    from oarbench.executors import DaskExecutor

    with pytest.raises(ValueError, match="unauthenticated and unencrypted"):  # the library refuses it too
        DaskExecutor("tcp://192.0.2.10:8786", echo=None)
    with pytest.raises(ValueError, match=r"^--tls-cert need a tls:// scheduler address, not tcp://127\.0\.0\.1:1$"):
        dask_security("tcp://127.0.0.1:1", cert=tmp_path / "x.crt")
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"--tls-ca-file .*ca\.fifo: not a file"):
        dask_security("tls://192.0.2.10:8786", ca_file=fifo, cert=fifo)
    r = _cli(base[:-2] + ["--tls-cert", "c.pem"])
    assert r.exit_code == 2 and "--tls-cert: only with --executor dask --scheduler ADDRESS" in r.output
