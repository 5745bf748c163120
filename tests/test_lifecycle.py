"""A job and the processes it started die together; temporary outputs name their owner and the next
run removes those of dead owners (nemo_minitron/lifecycle.py, nemo_minitron/checkpoint/scratch.py).

The kill tests run the real command (``python -m nemo_minitron.cli ...``) under a monitor process
(this file run as a script) that is a child subreaper: a process orphaned by the ``kill -9`` is
re-parented to the monitor instead of init, so "no process of the job remains" is checked over
every process the job ever started, including ones started after the monitor last looked.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GONE_WITHIN_S = 5.0  # "within a few seconds" (measured: under 0.2 s)


# ---- owner-named temporary outputs and the sweep -------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_sweep_removes_only_dead_owners_entries(tmp_path):
    from nemo_minitron.checkpoint import scratch

    me, dead = os.getpid(), _dead_pid()
    host_me, host_dead = scratch.owner_tag(), scratch.owner_tag(dead)
    assert host_dead.endswith(f"-{dead}-0")  # no /proc entry: start 0
    start = scratch.process_start(me)
    names = {
        "dead_dir": f".out.nemo.staging-{host_dead}-abcd1234",
        "dead_file": f".out.nemo.tmp-{host_dead}-abcd_234",
        "reused_pid": f".out.tmp-{scratch._host()}-{me}-{start + 1}-zzzzzzzz",  # pid reused
        "live": f".out.tmp-{host_me}-abcdefgh",
        "other_host": f".out.tmp-otherhost-{dead}-1-abcdefgh",
        "other_kind": f".out.old-{host_dead}-abcdefgh",
        "plain_mkdtemp": ".out.tmp-abcdefgh",
        "suffixed": f".out.tmp-{host_dead}-abcdefgh.bak",
        "user_file": "results.tmp-1-2-3",
    }
    for key, name in names.items():
        if key.endswith("dir"):
            os.makedirs(tmp_path / name / "sub")
            (tmp_path / name / "sub" / "x").write_bytes(b"x")
        else:
            (tmp_path / name).write_bytes(b"x")
    removed = sorted(os.path.basename(p) for p in scratch.sweep(str(tmp_path), ".tmp-"))
    assert removed == sorted([names["dead_file"], names["reused_pid"]])
    assert scratch.sweep(str(tmp_path), ".staging-") == [str(tmp_path / names["dead_dir"])]
    left = set(os.listdir(tmp_path))
    assert left == {names[k] for k in ("live", "other_host", "other_kind", "plain_mkdtemp",
                                       "suffixed", "user_file")}


def test_a_killed_owner_not_yet_reaped_is_dead(tmp_path):
    """A process killed with SIGKILL stays a zombie until its parent reaps it, for ever where the
    parent is a container's pid 1 that never reaps (seen in CI): its outputs are still swept."""
    from nemo_minitron.checkpoint import scratch

    p = subprocess.Popen(["sleep", "60"])
    try:
        start = scratch.process_start(p.pid)
        assert start, "a running process has a start time"
        name = tmp_path / f".out.nemo.tmp-{scratch._host()}-{p.pid}-{start}-abcdefgh"
        name.write_bytes(b"x")
        assert scratch.sweep(str(tmp_path), ".tmp-") == []  # alive: kept
        p.kill()
        deadline = time.monotonic() + 5
        while open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert scratch.sweep(str(tmp_path), ".tmp-") == [str(name)]  # zombie: removed
    finally:
        p.kill()
        p.wait()


def test_make_dir_names_its_owner_and_sweeps_first(tmp_path):
    from nemo_minitron.checkpoint import scratch

    stale = tmp_path / f".x.tmp-{scratch.owner_tag(_dead_pid())}-abcdefgh"
    stale.mkdir()
    made = scratch.make_dir(".tmp-", str(tmp_path), stem=".y")
    assert os.path.basename(made).startswith(f".y.tmp-{scratch.owner_tag()}-")
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(made)]
    fd, path = scratch.make_file(".tmp-", str(tmp_path), stem=".z")
    os.close(fd)
    assert scratch.sweep(str(tmp_path), ".tmp-") == []  # this process is alive: both kept
    assert len(os.listdir(tmp_path)) == 2 and os.path.isfile(path)


def test_atomic_output_dir_removes_a_killed_runs_leftover(tmp_path):
    from nemo_minitron.checkpoint import scratch
    from nemo_minitron.checkpoint.fsutil import atomic_output_dir

    leftover = tmp_path / f".out.tmp-{scratch.owner_tag(_dead_pid())}-abcdefgh"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    with atomic_output_dir(str(tmp_path / "out")) as tmp:
        assert os.path.basename(tmp).startswith(f".out.tmp-{scratch.owner_tag()}-")
        open(os.path.join(tmp, "config.json"), "w").close()
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---- processes die with their parent -------------------------------------------------------------
_TREE = r"""
import multiprocessing, os, sys, threading, time
from nemo_minitron import lifecycle

lifecycle.tie_children()

def sleeper():
    time.sleep(60)

def fork_one():
    pid = os.fork()
    if pid == 0:
        sleeper(); os._exit(0)
    return pid

pids = [fork_one()]  # from the main thread: PR_SET_PDEATHSIG
box = []
t = threading.Thread(target=lambda: box.append(fork_one()))  # from a thread: the watchdog
t.start(); t.join()
pids += box
manager = lifecycle.start_manager(multiprocessing.get_context(sys.argv[1]))  # Megatron's queue's
pids += [p.pid for p in multiprocessing.active_children()]
print(" ".join(map(str, pids)), flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_children_die_with_a_killed_parent(method):
    """Forked from the main thread, from another thread (which has ended: the child must live on
    until its process dies), and a manager server (fork or spawn)."""
    parent = subprocess.Popen([sys.executable, "-c", _TREE, method], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    try:
        children = [int(p) for p in parent.stdout.readline().split()]
        assert len(children) == 3 and all(_alive(p) for p in children)
        time.sleep(0.3)  # past one watchdog period: the thread-forked child outlives its thread
        assert all(_alive(p) for p in children)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        killed = time.monotonic()
        while any(_alive(p) for p in children) and time.monotonic() - killed < GONE_WITHIN_S:
            time.sleep(0.01)
        assert not [p for p in children if _alive(p)]
    finally:
        parent.kill()
        for p in children if "children" in locals() else []:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_launched_process_refuses_to_start_when_its_launcher_is_gone(monkeypatch):
    from nemo_minitron import lifecycle
    from nemo_minitron.errors import MinitronError

    env = lifecycle.child_env({})
    assert env == {lifecycle.LAUNCHER_ENV: str(os.getpid())}
    # this process's parent is not the pid named: as if re-parented after the launcher died
    monkeypatch.setenv(lifecycle.LAUNCHER_ENV, str(os.getpid()))
    with pytest.raises(MinitronError, match=f"pid {os.getpid()}.* has exited"):
        lifecycle.die_with_launcher()
    assert lifecycle.LAUNCHER_ENV not in os.environ  # never passed on
    lifecycle.die_with_launcher()  # started some other way: nothing to do


# ---- kill -9 of real jobs ------------------------------------------------------------------------
def _monitor(spec: dict) -> dict:
    """(In its own process.) Start ``spec["cmd"]``, wait until ``spec["trigger"]`` exists and the
    job has ``spec["min_children"]`` live descendants, SIGKILL it, then report how long until no
    process of it was left and which ``spec["never"]`` paths appeared afterwards."""
    import ctypes

    import psutil

    assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    with open(spec["log"], "w") as log:
        job = subprocess.Popen(spec["cmd"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    start, report = time.monotonic(), {}
    def live(procs):  # processes that exit while being looked at count as gone
        out = []
        for c in procs:
            try:
                if c.status() != psutil.STATUS_ZOMBIE:
                    out.append((c, " ".join(c.cmdline()[:5])))
            except (psutil.Error, OSError):
                pass
        return out

    def descendants(pid):
        try:
            return psutil.Process(pid).children(recursive=True)
        except (psutil.Error, OSError):
            return []

    while True:
        below = live(descendants(job.pid))
        if glob.glob(spec["trigger"]) and len(below) >= spec["min_children"]:
            break
        if job.poll() is not None or time.monotonic() - start > spec["timeout"]:
            job.kill()
            return {"error": f"job ended or timed out before the trigger (rc {job.poll()})"}
        time.sleep(0.005)
    report["trigger_after_s"] = round(time.monotonic() - start, 2)
    report["children_at_kill"] = [cmd for _, cmd in below]
    job.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    job.wait()
    survivors = []
    while time.monotonic() - killed < spec["grace"]:
        reaped = True
        while reaped:  # orphans re-parented here: reap the ones that died
            try:
                reaped = os.waitpid(-1, os.WNOHANG)[0] != 0
            except ChildProcessError:
                reaped = False
        survivors = live(descendants(os.getpid()))
        if not survivors:
            report["gone_after_s"] = round(time.monotonic() - killed, 3)
            break
        time.sleep(0.01)
    report["survivors"] = [f"{c.pid} {cmd}" for c, cmd in survivors]
    time.sleep(max(0.0, killed + spec["watch"] - time.monotonic()))
    report["appeared"] = sorted(p for pattern in spec["never"] for p in glob.glob(pattern))
    for _ in range(100):  # a failed test leaves nothing running either (orphans come here)
        left = live(descendants(os.getpid()))
        if not left:
            break
        for c, _ in left:
            c.kill()
        time.sleep(0.05)
    return report


def _kill_job(tmp_path, cmd, trigger, never, min_children, timeout=120):
    spec = dict(cmd=[sys.executable, "-m", "nemo_minitron.cli"] + cmd, trigger=trigger,
                never=never, min_children=min_children, timeout=timeout, grace=GONE_WITHIN_S,
                watch=3.0, log=str(tmp_path / "job.log"))
    # the megatron-core 0.7 tier's transformer_engine stand-in (conftest.py), for the job too
    stub = [p for p in sys.path if p.endswith(os.path.join("support", "te_stub"))]
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout + 30,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + stub)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in report, (report, open(spec["log"]).read()[-3000:])
    print(report)
    assert report["survivors"] == [] and "gone_after_s" in report, report
    assert report["appeared"] == [], report
    return report


def _owned_leftovers(directory, kind):
    """The temporary outputs a killed run left in ``directory``: named after a dead owner, removed
    by the next run's sweep (called here as that run calls it)."""
    from nemo_minitron.checkpoint import scratch

    def named():
        return sorted(os.path.join(directory, n) for n in os.listdir(directory) if kind in n)

    before = named()
    assert sorted(scratch.sweep(directory, kind)) == before and named() == []
    return before


@pytest.mark.slow  # ~5 s: one conversion started and killed
def test_kill_9_during_conversion(tiny_hf_dir, tmp_path):
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from nemo_minitron.lifecycle import writer_queue_factory_name

    out = str(tmp_path / "m.nemo")
    # the archive's temporary file exists and Megatron's writers are at work: its result-queue
    # manager and forked writer processes (megatron-core <= 0.16; 0.19 writes in threads, so only
    # the manager is a process; 0.7 forks a manager per save and the writers)
    forks_writers = writer_queue_factory_name(fa) != "get_write_results_queue"
    _kill_job(tmp_path, ["convert", "hf-to-nemo", tiny_hf_dir, out],
              trigger=str(tmp_path / ".m.nemo.tmp-*"), never=[out],
              min_children=2 if forks_writers else 1)
    assert len(_owned_leftovers(str(tmp_path), ".tmp-")) == 1
    assert len(_owned_leftovers(str(tmp_path), ".staging-")) == 1
    assert sorted(os.listdir(tmp_path)) == ["job.log"]


def _finetune_args(tiny_hf_dir, tmp_path, out, *overrides):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"question {i}?", "output": f"answer {i}"}) + "\n"
                            for i in range(4)))
    return ["finetune", "--config", os.path.join(ROOT, "nemo_minitron/conf/finetune/tiny_sft.yaml"),
            "--model", tiny_hf_dir, "--data", str(data), "--out", out, "data.seq_length=32",
            "model.micro_batch_size=1", "model.global_batch_size=1", *overrides]


@pytest.mark.slow  # ~10 s: one finetune started and killed in its first checkpoint save
def test_kill_9_of_finetune_during_a_checkpoint_save(tiny_hf_dir, tmp_path):
    pytest.importorskip("tokenizers", reason="finetune tokenizes its data")
    out = str(tmp_path / "out")
    ckpt = out + ".ckpt"
    report = _kill_job(tmp_path, _finetune_args(tiny_hf_dir, tmp_path, out, "trainer.max_steps=2",
                                                "trainer.ckpt_every_n_steps=1"),
                       trigger=os.path.join(ckpt, ".step_000001.tmp"),
                       never=[os.path.join(ckpt, "step_*"), os.path.join(ckpt, "latest"), out],
                       min_children=1)  # Megatron's result-queue manager: the save has begun
    assert report["children_at_kill"]


@pytest.mark.slow  # ~12 s: one finetune (no steps) killed while its .nemo output is written
def test_kill_9_of_finetune_during_the_final_export(tiny_hf_dir, tmp_path):
    pytest.importorskip("tokenizers", reason="finetune tokenizes its data")
    out = str(tmp_path / "out.nemo")
    # the job's own ranks save the .nemo (nemo_minitron/model/save.py): killed while
    # Megatron's writer processes write into the owner-named staging directory next to the output
    _kill_job(tmp_path, _finetune_args(tiny_hf_dir, tmp_path, out, "trainer.max_steps=0"),
              trigger=str(tmp_path / ".out.nemo.save-*" / "model_weights"), never=[out],
              min_children=1)
    assert len(_owned_leftovers(str(tmp_path), ".save-")) == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.nemo")]  # nothing else


if __name__ == "__main__":  # the monitor of the kill tests
    print(json.dumps(_monitor(json.loads(sys.argv[1]))))
