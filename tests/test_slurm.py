"""Sweeps and training jobs on a live SLURM: a private single-node cluster (slurmctld +
slurmd on localhost, its own munge key and socket, config, state and logs in a temporary
directory) started once for this file. Skips where SLURM is not installed (``.ci/run``
installs ``slurm-wlm`` and ``munge``).

Every job trains a nano model for tens of steps on one CPU device per process."""

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from gptjax import cli, scaling
from gptjax.launch import with_cpu_devices
from gptjax.scaling import claims

pytestmark = pytest.mark.beside  # a live cluster: the tests mostly wait on its scheduler
DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "squeue", "scontrol", "scancel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, host: str, user: str, socket_path: Path) -> str:
    return textwrap.dedent(f"""\
        ClusterName=gptjaxtest
        SlurmctldHost={host}(127.0.0.1)
        SlurmctldPort={_free_port()}
        SlurmdPort={_free_port()}
        SlurmUser={user}
        SlurmdUser={user}
        AuthType=auth/munge
        AuthInfo=socket={socket_path}
        CredType=cred/munge
        StateSaveLocation={root}/state
        SlurmdSpoolDir={root}/spool
        SlurmctldPidFile={root}/slurmctld.pid
        SlurmdPidFile={root}/slurmd.pid
        SlurmctldLogFile={root}/log/slurmctld.log
        SlurmdLogFile={root}/log/slurmd.log
        ProctrackType=proctrack/linuxproc
        TaskPlugin=task/none
        SelectType=select/cons_tres
        SelectTypeParameters=CR_Core
        MpiDefault=none
        JobAcctGatherType=jobacct_gather/none
        AccountingStorageType=accounting_storage/none
        SchedulerType=sched/builtin
        SlurmdParameters=config_overrides
        ReturnToService=2
        JobRequeue=1
        MinJobAge=600
        KillWait=5
        InactiveLimit=0
        NodeName={host} NodeAddr=127.0.0.1 CPUs=8 State=UNKNOWN
        PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:8
        """)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A private single-node SLURM; yields its root directory with ``SLURM_CONF`` set."""
    missing = [tool for tool in DAEMONS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir()
    os.chmod(root / "munge", 0o700)
    key, sock = root / "munge" / "munge.key", root / "munge" / "socket"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    munged = [f"--key-file={key}", f"--socket={sock}", f"--pid-file={root}/munge/pid",
              f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/seed"]  # fmt: skip
    subprocess.run(["munged", "--force", *munged], check=True, capture_output=True)
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, socket.gethostname().split(".")[0], getpass.getuser(), sock))
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, capture_output=True)
        # Jobs run on one core, as a cluster binds a one-CPU job to its core: a job's
        # training otherwise keeps a second core busy with its threads' hand-offs, which
        # the suite's other tests need (measured: 1.5 cores -> 1.0 for the same steps).
        one_core = {min(os.sched_getaffinity(0))}
        subprocess.run(
            ["slurmd", "-f", str(conf)], check=True, capture_output=True,
            preexec_fn=lambda: os.sched_setaffinity(0, one_core),
        )  # fmt: skip
        _wait(lambda: _run(["sinfo", "-h", "-o", "%t"]).strip() in ("idle", "mix", "alloc"), 30, "node up")
        yield root
    finally:
        subprocess.run(["scancel", "-u", getpass.getuser()], capture_output=True)
        with contextlib.suppress(AssertionError):  # jobs end before their daemons: no orphans
            _wait(_queue_empty, 30, "cancelled jobs to end")
        _stop([int(p.read_text()) for p in (root / "slurmd.pid", root / "slurmctld.pid") if p.exists()])
        subprocess.run(["munged", "--stop", f"--socket={sock}"], capture_output=True)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


def _stop(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.1)


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _queue_empty() -> bool:
    return _run(["squeue", "-h", "-u", getpass.getuser()]).strip() == ""


@pytest.fixture
def job_env(slurm, tmp_path, monkeypatch):
    """What jobs inherit: one CPU device per process (not the suite's 8 fake devices), a
    private store cache, and a working directory in tmp_path."""
    monkeypatch.setenv("XLA_FLAGS", with_cpu_devices(os.environ.get("XLA_FLAGS", ""), 1))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("GPTJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


_BASE = """
from gptjax.config import Config, DataConfig, ModelConfig, OptimConfig, SampleConfig, TrainConfig


def base(name, steps=20, checkpoint_every=0, log_every=5):
    return Config(
        name=name,
        model=ModelConfig(vocab_size=257, block_size=32, n_layer=1, n_head=2, n_embd=16),
        data=DataConfig(source="stdlib", tokenizer="bytes"),
        optim=OptimConfig(warmup_steps=2),
        train=TrainConfig(batch_size=8, steps=steps, log_every=log_every, eval_every=0,
                          eval_max_batches=2, checkpoint_every=checkpoint_every, peak_flops=1e12),
        sample=SampleConfig(num_samples=0, max_new_tokens=2),
    )
"""


def _sweep_file(path: Path, name: str, axes: str, **base) -> Path:
    args = ", ".join(f"{k}={v!r}" for k, v in base.items())
    path.write_text(
        _BASE + "\nfrom gptjax.scaling import Sweep\n\n\ndef get_sweep():\n"
        f"    return Sweep(name={name!r}, base=base({name!r}, {args}), axes={axes})\n"
    )
    return path


def _config_file(path: Path, **base) -> Path:
    args = ", ".join(f"{k}={v!r}" for k, v in base.items())
    path.write_text(_BASE + f"\n\ndef get_config():\n    return base('job', {args})\n")
    return path


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_sweep_job_array_finishes_and_resubmitting_submits_nothing(job_env, capsys):
    sweep_file = _sweep_file(
        job_env / "sweep.py", "array", "{'size': [(1, 16, 2), (1, 32, 2)], 'tokens': [256 * 10, 256 * 20]}"
    )
    sweep_dir = job_env / "sweep"
    args = ["sweep", str(sweep_file), "--dir", str(sweep_dir)]
    assert cli.main([*args, "--slurm", "--max-parallel", "2", "--time", "10"]) == 0
    out = capsys.readouterr().out
    assert "submitted 4 of 4 runs as job array" in out and "at most 2 at once" in out
    script = (sweep_dir / "slurm" / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --signal=B:USR1@120" in script
    assert "#SBATCH --time=10" in script and "--requeue" in script
    # While it runs: every run is queued or running (or done), and resubmitting adds nothing.
    assert cli.main([*args, "--status"]) == 0
    early = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{early}")
    assert {line.split()[1] for line in early.splitlines()[1:5]} <= {"queued", "running", "finished"}
    assert cli.main([*args, "--slurm"]) == 0
    assert "nothing to submit" in capsys.readouterr().out
    _wait(_queue_empty, 300, "the array to finish")

    assert cli.main([*args, "--status"]) == 0
    status = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{status}")
    lines = status.splitlines()
    assert lines[0].split() == ["run", "status", "step", "loss", "job", "elapsed", "point"]
    assert [line.split()[1] for line in lines[1:5]] == ["finished"] * 4 and lines[-1] == "4 finished (4 runs)"
    assert {line.split()[2] for line in lines[1:5]} == {"10/10", "20/20"}
    rows = scaling.table(sweep_dir)
    assert [r["status"] for r in rows] == ["finished"] * 4
    assert len((sweep_dir / "results.csv").read_text().splitlines()) == 5
    # Every run trained once, by one array task (A_i) of the one submission.
    jobs = {c["label"] for r in rows for c in claims.history(sweep_dir / "runs" / r["hash"])}
    assert len(jobs) == 4 and len({j.split("_")[0] for j in jobs}) == 1

    assert cli.main([*args, "--slurm"]) == 0
    assert "nothing to submit (4 finished)" in capsys.readouterr().out
    assert _queue_empty()
    # By hand: the whole array again; every task sees its run finished and exits.
    job = _run(["sbatch", "--parsable", str(sweep_dir / "slurm" / "sweep.sbatch")]).strip()
    assert job.isdigit()
    _wait(_queue_empty, 120, "the hand-submitted array to exit")
    assert all(len(claims.history(sweep_dir / "runs" / r["hash"])) == 1 for r in rows)
    assert [r["status"] for r in scaling.table(sweep_dir)] == ["finished"] * 4


def test_cancelled_task_resumes_on_resubmission_with_the_uninterrupted_loss(job_env, capsys):
    axes = "{'tokens': [256 * 3000]}"  # 3000 steps, a few seconds: time to cancel mid-run
    cut = _sweep_file(job_env / "cut.py", "cut", axes, checkpoint_every=500, log_every=100)
    whole = _sweep_file(job_env / "whole.py", "whole", axes, checkpoint_every=500, log_every=100)
    cut_dir, whole_dir = job_env / "cut", job_env / "whole"
    for file, directory in ((cut, cut_dir), (whole, whole_dir)):
        assert cli.main(["sweep", str(file), "--dir", str(directory), "--slurm"]) == 0
    (run,) = scaling.expand(scaling.load_sweep(cut), cut_dir)
    run_dir = Path(run.config.train.run_dir)
    _wait(lambda: (run_dir / "checkpoints" / "500").is_dir(), 300, "a checkpoint to cancel after")
    claim = claims.latest(run_dir)
    subprocess.run(["scancel", claim["job"]], check=True)
    _wait(lambda: claims.job_state(claim["job"]) == "", 120, "the cancelled task to leave the queue")
    (state,) = scaling.states(cut_dir)
    assert state["status"] == "interrupted" and 500 <= state["step"] < 3000, state
    capsys.readouterr()

    assert cli.main(["sweep", str(cut), "--dir", str(cut_dir), "--slurm"]) == 0
    assert "submitted 1 of 1 runs" in capsys.readouterr().out
    _wait(_queue_empty, 300, "both sweeps to finish")
    assert [s["status"] for s in scaling.states(cut_dir)] == ["finished"]
    assert len(claims.history(run_dir)) == 2
    assert (run_dir / "metrics.jsonl").read_text().count('"step": 100,') == 1  # not retrained from 0
    (ref,) = scaling.table(whole_dir)
    (got,) = scaling.table(cut_dir)
    assert got["train_loss"] == ref["train_loss"] and got["val_loss"] == ref["val_loss"]
    ref_losses = _train_losses(whole_dir / "runs" / ref["hash"])
    got_losses = _train_losses(run_dir)
    # The logged loss is the mean over the steps a process ran since the last log line: the
    # first row after the resume averages fewer steps when the resume fell between two log
    # steps. Every other row, and the final loss and val loss above, are exactly the same.
    assert sorted(got_losses) == sorted(ref_losses) and max(ref_losses) == 3000
    differing = [step for step in ref_losses if got_losses[step] != ref_losses[step]]
    assert len(differing) <= 1 and all(step > 500 for step in differing), differing


@pytest.mark.slow
def test_time_limit_signal_saves_requeues_and_completes(job_env, capsys):
    """One training job (gptjax submit) with a two-minute limit and USR1 60 s before it:
    it saves, requeues itself, and the requeued job resumes and finishes. SLURM checks
    time limits every 30 s and signals at the check before the due time, so USR1 comes
    30-60 s after the start: the run is long enough to be mid-training then (24,000 steps
    of a one-layer model on the job's one core, 100 s on an idle machine; there USR1 came
    at step 13,450, about a minute after the start, near its latest). SLURM
    holds a requeued job for two minutes before it may start: the test lifts that hold,
    and once a save happened gives the resumed job ten minutes (a USR1 that came before
    training started, on a loaded machine, requeues with nothing to save: that job keeps
    its limit)."""
    config = _config_file(job_env / "long.py", steps=24000, log_every=6000)
    argv = ["submit", str(config), "train.run_dir=long", "--time", "2", "--signal-seconds", "60"]
    assert cli.main(argv) == 0
    job = capsys.readouterr().out.split()[3]
    assert job.isdigit(), job
    script = (job_env / "long" / "submit.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@60" in script and "#SBATCH --time=2" in script
    log, deadline, released, held = job_env / "long" / f"slurm-{job}.out", time.time() + 900, 0, 0
    while time.time() < deadline and not _queue_empty():
        info = _run(["scontrol", "show", "job", job])
        held = held + 1 if "JobState=PENDING" in info and "Reason=BeginTime" in info else 0
        # Not in the second of the requeue: slurmd refuses a credential as old as its revocation.
        if held == 3:
            saved = "stop requested; saved step" in log.read_text()
            update = ["StartTime=now", *(["TimeLimit=10"] if saved else [])]
            subprocess.run(["scontrol", "update", f"JobId={job}", *update], check=True)
            released += 1
        time.sleep(1)
    assert _queue_empty(), "the job did not complete"
    assert released >= 1 and f"Restarts={released}" in _run(["scontrol", "show", "job", job])
    assert json.loads((job_env / "long" / "result.json").read_text())["step"] == 24000
    out = log.read_text()
    assert "stop requested; saved step" in out and "time limit near; saved, requeueing job" in out
    saved = int(out.split("stop requested; saved step ")[-1].split(",")[0])
    assert 0 < saved < 24000 and f"from step {saved}" in out  # resumed where it saved
    assert sorted(_train_losses(job_env / "long")) == list(range(6000, 24001, 6000))


def test_two_task_srun_job_gives_the_one_process_losses(job_env, capsys):
    config = _config_file(job_env / "job.py", steps=20)
    for tasks in (2, 1):
        assert cli.main(["submit", str(config), f"train.run_dir=tasks{tasks}", "--ntasks", str(tasks)]) == 0
    assert "srun --kill-on-bad-exit=1" in (job_env / "tasks2" / "submit.sbatch").read_text()
    _wait(_queue_empty, 400, "both jobs to finish")
    assert "on 2 device(s)" in next((job_env / "tasks2").glob("slurm-*.out")).read_text()
    two, one = _train_losses(job_env / "tasks2"), _train_losses(job_env / "tasks1")
    assert sorted(two) == sorted(one) == [5, 10, 15, 20]
    assert two == pytest.approx(one, rel=1e-5)
