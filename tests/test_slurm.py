"""SLURM submission: rendered sbatch scripts, quoting of hostile values, the pipeline's dependency
chain, and a recipe trained across 2 ranks started by a fake sbatch + srun.

The fakes are small executables written into tmp_path and put first on PATH: ``sbatch`` records its
argv, reads the ``#SBATCH`` lines with shlex (sbatch's own parser undoes the same double-quoted
form) and -- when asked -- runs the script with bash, its output in the ``--output`` file;
``srun`` records its argv, working directory and environment, drops its own options (the pyxis
container flags) and -- when asked -- starts the command as SLURM_NTASKS local processes with
SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS / SLURM_NODELIST / SLURM_JOB_ID set, as srun does.
"""
import glob
import json
import os
import shlex
import subprocess
import sys

import pytest

from nemo_minitron.cli import main as cli_main
from nemo_minitron.errors import ConfigError
from nemo_minitron.launch import pipeline, slurm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SFT = os.path.join(ROOT, "nemo_minitron", "conf", "finetune", "tiny_sft.yaml")

FAKE_SBATCH = r'''
import json, os, shlex, subprocess, sys
log = os.environ["FAKE_SLURM_DIR"]
script = sys.argv[-1]
directives = {}
for line in open(script):
    if line.startswith("#SBATCH"):
        for word in shlex.split(line[len("#SBATCH"):]):
            key, _, value = word.partition("=")
            directives[key] = value
    elif line.strip() and not line.startswith("#"):
        break
counter = os.path.join(log, "next_id")
job_id = int(open(counter).read()) if os.path.exists(counter) else 1001
open(counter, "w").write(str(job_id + 1))
with open(os.path.join(log, "sbatch.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "directives": directives, "id": job_id}) + "\n")
if os.environ.get("FAKE_SBATCH_RUN"):
    def expand(pattern):
        return (pattern.replace("%%", "\0").replace("%x", directives["--job-name"])
                .replace("%j", str(job_id)).replace("\0", "%"))
    nodes, per_node = int(directives["--nodes"]), int(directives["--ntasks-per-node"])
    env = dict(os.environ, SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME=directives["--job-name"],
               SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(per_node),
               SLURM_NTASKS=str(nodes * per_node), SLURM_JOB_NODELIST="127.0.0.1")
    with open(expand(directives["--output"]), "w") as out, open(expand(directives["--error"]), "w") as err:
        rc = subprocess.call(["bash", script], env=env, cwd=directives["--chdir"], stdout=out, stderr=err)
    if rc:
        sys.exit(rc)
print(job_id)
'''

FAKE_SRUN = r'''
import json, os, subprocess, sys, time
log = os.environ["FAKE_SLURM_DIR"]
args = sys.argv[1:]
i = next(k for k, a in enumerate(args) if not a.startswith("-"))
options, command = args[:i], args[i:]
keep = ("PYTHONPATH", "CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_AVOID_RECORD_STREAMS",
        "NVTE_FUSED_ATTN", "NVTE_FLASH_ATTN", "SLURM_JOB_ID")
record = {"options": options, "command": command, "cwd": os.getcwd(),
          "env": {k: os.environ.get(k) for k in keep}}
if os.environ.get("FAKE_SRUN_WAIT"):  # a long step: runs until the fake scontrol releases it
    open(os.path.join(log, "started"), "w").close()
    while not os.path.exists(os.path.join(log, "release")):
        time.sleep(0.05)
if os.environ.get("FAKE_SRUN_RUN"):
    assert os.environ["SLURM_NNODES"] == "1", "the fake srun runs one node"
    n = int(os.environ["SLURM_NTASKS"])
    procs = []
    for rank in range(n):
        env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                   SLURM_NODELIST="127.0.0.1", MASTER_PORT=os.environ["FAKE_MASTER_PORT"])
        procs.append(subprocess.Popen(command, env=env))
    record["ranks"] = [{"rank": r, "rc": p.wait()} for r, p in enumerate(procs)]
with open(os.path.join(log, "srun.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")
sys.exit(max([r["rc"] for r in record.get("ranks", [])] or [0]))
'''

FAKE_SCONTROL = r'''
import json, os, sys
log = os.environ["FAKE_SLURM_DIR"]
with open(os.path.join(log, "scontrol.jsonl"), "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:]}) + "\n")
open(os.path.join(log, "release"), "w").close()  # SLURM would now stop the job's steps
'''


@pytest.fixture()
def fake_slurm(tmp_path, monkeypatch):
    """PATH with the fake sbatch / srun (and `python`: this interpreter); returns the record
    directory."""
    bin_dir, log = tmp_path / "fakebin", tmp_path / "fakelog"
    bin_dir.mkdir()
    log.mkdir()
    for name, source in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{source}")
        (bin_dir / name).chmod(0o755)
    # a wrapper, not a symlink: a venv's interpreter finds its site-packages by its own path
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(log))
    return log


def records(log, name):
    path = os.path.join(log, f"{name}.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def parse_script(text):
    """(#SBATCH options, exported env, srun options, job argv) read with shlex."""
    directives, env = {}, {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            for word in shlex.split(line[len("#SBATCH"):]):
                key, _, value = word.partition("=")
                directives[key] = value
        elif line.startswith("export "):
            key, _, value = shlex.split(line[len("export "):])[0].partition("=")
            env[key] = value
    joined = text.replace("\\\n", " ")
    srun_line = next(line for line in joined.splitlines() if line.startswith("srun "))
    words = shlex.split(srun_line.rstrip("&"))
    i = next(k for k, w in enumerate(words) if k and not w.startswith("-"))
    return directives, env, words[1:i], words[i:]


# each task: extend the container's PYTHONPATH with the checkout, then the command
JOB_PREFIX = ["bash", "-c", slurm.EXTEND_PYTHONPATH, "nemo-minitron", ROOT, "python", "-m",
              "nemo_minitron.cli"]


def _opts(tmp_path, **kw):
    kw.setdefault("mounts", [f"{tmp_path}:{tmp_path}"])
    return slurm.SlurmOptions(job_dir=str(tmp_path), **kw)


@pytest.mark.parametrize("nodes, tp", [(1, 1), (2, 2)])
def test_rendered_script_structure(tmp_path, nodes, tp):
    command = ["finetune", "--config", TINY_SFT, "--model", "/m", "--out", "/o",
               f"trainer.tensor_model_parallel_size={tp}"]
    opts = slurm.prepare(_opts(tmp_path, nodes=nodes, gpus_per_node=4, partition="batch",
                               account="proj", time="1-02:00:00", after="4242" if nodes == 2 else None,
                               requeue=nodes == 2, mem="0"), command)
    text = slurm.render(opts, command)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid shell
    directives, env, srun_opts, argv = parse_script(text)
    log = os.path.join(str(tmp_path), "slurm_logs")
    expected = {"--job-name": "nemo-minitron", "--nodes": str(nodes), "--ntasks-per-node": "4",
                "--gpus-per-node": "4", "--time": "1-02:00:00", "--partition": "batch",
                "--account": "proj", "--output": f"{log}/%x-%j.out", "--error": f"{log}/%x-%j.err",
                "--chdir": str(tmp_path), "--exclusive": "", "--mem": "0"}
    if nodes == 2:
        expected.update({"--dependency": "afterok:4242", "--requeue": "", "--open-mode": "append",
                         "--signal": "B:USR1@300"})
    assert directives == expected
    assert env == dict(({"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if tp > 1 else {}),
                       TORCH_NCCL_AVOID_RECORD_STREAMS="1", NVTE_FUSED_ATTN="1",
                       NVTE_FLASH_ATTN="1")
    assert "\nunset PYTHONPATH " in text  # the submitting host's never reaches the job
    # the checkout is mounted at its own path unless a mount already covers it
    mounts = f"{tmp_path}:{tmp_path}" if ROOT.startswith(str(tmp_path)) else f"{ROOT}:{ROOT},{tmp_path}:{tmp_path}"
    assert srun_opts == ["--container-image=nvcr.io/nvidia/nemo:24.05",
                         f"--container-mounts={mounts}", f"--container-workdir={tmp_path}",
                         "--no-container-mount-home"]
    assert argv == [*JOB_PREFIX, *command]
    assert ("trap " in text) == (nodes == 2) and ("scontrol requeue" in text) == (nodes == 2)


def test_single_task_commands_and_layout_errors(tmp_path):
    opts = slurm.prepare(_opts(tmp_path, nodes=4), ["convert", "hf-to-nemo", "/a", "/b.nemo"])
    assert (opts.nodes, opts.tasks_per_node, opts.gpus_per_node, opts.exclusive) == (1, 1, 1, False)
    cases = [
        (dict(time="4 hours"), "--time='4 hours' is not a SLURM time"),
        (dict(nodes=0), "nodes=0 must be a positive integer"),
        (dict(mounts=["/a"]), "mount '/a' must be SRC:DST"),
        (dict(mounts=[f"rel:{tmp_path}"]), "SRC and DST must be absolute"),
        (dict(after="12; rm -rf /"), "--after='12; rm -rf /' must be a job id"),
        (dict(partition="a\nb"), "partition='a\\\\nb': newlines"),
        (dict(env=["1X=2"]), "must be NAME=VALUE"),
        (dict(gpus_per_node=3), "3 ranks is not a multiple of TP x PP = 2 x 1"),
    ]
    for kw, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            slurm.prepare(_opts(tmp_path, **kw), ["finetune", "trainer.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_stepz'"):
        slurm.prepare(_opts(tmp_path), ["finetune", "--config", TINY_SFT, "trainer.max_stepz=2"])
    with pytest.raises(ConfigError, match="unknown config key 'tpp'"):  # prune's flat config
        slurm.prepare(_opts(tmp_path), ["prune", "--model", "/t", "--out", "/s", "tpp=2"])


HOSTILE = "a b; $(touch PWNED) `touch PWNED` 'single' \"double\" \\back $HOME && touch PWNED #"


def test_hostile_values_reach_the_job_verbatim_and_never_run(tmp_path, fake_slurm, monkeypatch,
                                                             capsys):
    monkeypatch.setenv("FAKE_SBATCH_RUN", "1")
    job_dir = tmp_path / "job dir; $(touch PWNED) 'q' \"q\""
    job_dir.mkdir()
    monkeypatch.chdir(job_dir)
    config = job_dir / "conf $(touch PWNED) `touch PWNED`.yaml"
    config.write_text("trainer:\n  max_steps: 3\n")
    job_args = ["--config", config.name, "--model", HOSTILE, "--data", f"/d/{HOSTILE}.jsonl",
                f"out={HOSTILE}", f"data.prompt_template={HOSTILE}", "--", "--out", HOSTILE]
    argv = ["slurm", "finetune", "--gpus-per-node", "2", "--mounts", f"{tmp_path}:{tmp_path}",
            "--job-name", HOSTILE, "--partition", HOSTILE, "--account", HOSTILE,
            "--log-dir", f"logs {HOSTILE}", "--env", f"MY_VAR={HOSTILE}",
            "--container", HOSTILE, *job_args]
    assert cli_main(argv) == 0
    job_id = capsys.readouterr().out.strip()
    (sb,) = records(fake_slurm, "sbatch")
    assert job_id == str(sb["id"]) and sb["argv"][0] == "--parsable"
    script = sb["argv"][1]
    assert os.path.dirname(script) == str(job_dir / f"logs {HOSTILE}")
    d = sb["directives"]
    assert d["--job-name"] == d["--partition"] == d["--account"] == HOSTILE
    assert d["--chdir"] == str(job_dir)
    (sr,) = records(fake_slurm, "srun")
    assert sr["command"] == [*JOB_PREFIX, "finetune", *[a for a in job_args if a != "--"]]
    assert f"--container-image={HOSTILE}" in sr["options"]
    assert f"--container-mounts={ROOT}:{ROOT},{tmp_path}:{tmp_path},/d:/d" in sr["options"]
    assert sr["cwd"] == str(job_dir) and sr["env"]["PYTHONPATH"] is None
    # the log of the batch shell went where --output said, named by the job
    assert os.path.isfile(os.path.join(os.path.dirname(script), f"{HOSTILE}-{job_id}.out"))
    assert not glob.glob(str(tmp_path / "**" / "PWNED"), recursive=True)
    assert not os.path.exists("PWNED")


def test_preemption_signal_requeues_the_job(tmp_path, fake_slurm, monkeypatch):
    """--signal=B:USR1 reaches the batch shell while srun runs: the trap calls scontrol requeue,
    the script waits for the step to end and exits with its status."""
    import signal
    import time

    opts = slurm.prepare(_opts(tmp_path, requeue=True), ["convert", "nemo-to-hf", "/a.nemo", "/b"])
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.render(opts, ["convert", "nemo-to-hf", "/a.nemo", "/b"]))
    monkeypatch.setenv("FAKE_SRUN_WAIT", "1")
    proc = subprocess.Popen(["bash", str(script)], env=dict(os.environ, SLURM_JOB_ID="55"),
                            stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (fake_slurm / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert records(fake_slurm, "scontrol") == []  # no requeue before the signal
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "requeueing job 55" in out
    assert records(fake_slurm, "scontrol") == [{"argv": ["requeue", "55"]}]
    assert len(records(fake_slurm, "srun")) == 1


def test_cli_reports_bad_options_in_one_line(tmp_path, fake_slurm, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["slurm", "finetune", "--time", "soon", "--mounts", f"{tmp_path}:{tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --time='soon'") and err.count("\n") == 1
    assert records(fake_slurm, "sbatch") == []


def test_pipeline_chains_stages_with_afterok(tmp_path, fake_slurm, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "run"
    assert cli_main(["pipeline", "--teacher", str(tmp_path), "--workdir", str(work), "--data", "x",
                     "--mounts", f"{tmp_path}:{tmp_path}"]) == 2
    assert "neither a .nemo nor an HF checkpoint directory" in capsys.readouterr().err
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    base = ["pipeline", "--teacher", str(tmp_path / "teacher"), "--workdir", str(work),
            "--data", "pydoc", "--prune-config", os.path.join(ROOT, "nemo_minitron/conf/prune/tiny.yaml"),
            "--distill-override", "trainer.tensor_model_parallel_size=2", "--nodes", "2",
            "--mounts", f"{tmp_path}:{tmp_path}", "--after", "77"]
    # dry run: every script, placeholder dependencies, nothing submitted or created
    assert cli_main(base + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert records(fake_slurm, "sbatch") == [] and not work.exists()
    names = ["convert", "prune", "distill", "export"]
    scripts = [s for s in out.split("# ---- ")[1:]]
    assert [s.split(" ----")[0] for s in scripts] == names
    deps = [parse_script(s.split("----\n", 1)[1])[0].get("--dependency") for s in scripts]
    assert deps == ["afterok:77", "afterok:JOBID_OF_CONVERT", "afterok:JOBID_OF_PRUNE",
                    "afterok:JOBID_OF_DISTILL"]

    assert cli_main(base) == 0
    printed = capsys.readouterr().out.split()
    sb = records(fake_slurm, "sbatch")
    ids = [str(r["id"]) for r in sb]
    assert printed == [x for n, i in zip(names, ids) for x in (f"{n}:", i)]
    assert [r["directives"].get("--dependency") for r in sb] == \
        ["afterok:77"] + [f"afterok:{i}" for i in ids[:-1]]
    parsed = [parse_script(open(r["argv"][1]).read()) for r in sb]
    assert [p[0]["--job-name"] for p in parsed] == [f"minitron-{n}" for n in names]
    assert [(p[0]["--nodes"], p[0]["--ntasks-per-node"]) for p in parsed] == \
        [("1", "1"), ("2", "8"), ("2", "8"), ("1", "1")]
    assert ["CUDA_DEVICE_MAX_CONNECTIONS" in p[1] for p in parsed] == [False, False, True, False]
    cmds = [p[3][len(JOB_PREFIX):] for p in parsed]  # after python -m nemo_minitron.cli
    w = str(work)
    assert cmds[0] == ["convert", "hf-to-nemo", str(tmp_path / "teacher"), f"{w}/teacher.nemo"]
    assert cmds[1][cmds[1].index("--model") + 1] == f"{w}/teacher.nemo"
    assert cmds[1][cmds[1].index("--out") + 1] == f"{w}/student.nemo"
    assert cmds[2][cmds[2].index("--student") + 1] == f"{w}/student.nemo"
    assert cmds[2][cmds[2].index("--teacher") + 1] == f"{w}/teacher.nemo"
    assert cmds[2][-1] == "trainer.tensor_model_parallel_size=2"
    assert cmds[3] == ["convert", "nemo-to-hf", f"{w}/distilled.nemo", f"{w}/distilled_hf"]


def test_pipeline_teacher_correction_stage_feeds_the_rest(tmp_path):
    jobs = pipeline.stages("/t", "/w", "data.jsonl", teacher_correction_config="tc.yaml")
    assert [j.name for j in jobs] == ["convert", "teacher_correction", "prune", "distill", "export"]
    assert jobs[1].command[:3] == ["finetune", "--config", "tc.yaml"]
    corrected = jobs[1].command[jobs[1].command.index("--out") + 1]
    assert jobs[2].command[jobs[2].command.index("--model") + 1] == corrected
    assert jobs[3].command[jobs[3].command.index("--teacher") + 1] == corrected


@pytest.mark.megatron
@pytest.mark.slow
def test_finetune_trains_across_two_srun_ranks(tiny_hf_dir, tmp_path, fake_slurm, monkeypatch,
                                               capsys):
    """sbatch -> bash -> srun -> 2 processes of `python -m nemo_minitron.cli finetune` (TP=2)."""
    pytest.importorskip("tokenizers", reason="needs the tokenizers library")
    import torch

    from nemo_minitron.checkpoint.hf_io import iter_tensors
    from nemo_minitron.dist import free_port

    monkeypatch.setenv("FAKE_SBATCH_RUN", "1")
    monkeypatch.setenv("FAKE_SRUN_RUN", "1")
    monkeypatch.setenv("FAKE_MASTER_PORT", str(free_port()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"input": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(4)))
    out = tmp_path / "sft"
    argv = ["slurm", "finetune", "--gpus-per-node", "2", "--requeue", "--mounts",
            f"{tmp_path}:{tmp_path},{os.path.dirname(tiny_hf_dir)}:{os.path.dirname(tiny_hf_dir)}",
            "--config", TINY_SFT, "--model", tiny_hf_dir, "--data", data.name, "--out", out.name,
            "trainer.max_steps=2", "trainer.ckpt_every_n_steps=2",
            "trainer.tensor_model_parallel_size=2"]
    stub = os.path.join(ROOT, "tests", "support", "te_stub")
    if stub in sys.path:  # megatron-core 0.7.0 on CPU: the ranks need conftest's TE stand-in too
        argv[2:2] = ["--env", f"PYTHONPATH={ROOT}{os.pathsep}{stub}"]
    assert cli_main(argv) == 0, capsys.readouterr()
    job_id = capsys.readouterr().out.strip()
    (sr,) = records(fake_slurm, "srun")
    assert sr["ranks"] == [{"rank": 0, "rc": 0}, {"rank": 1, "rc": 0}]
    assert sr["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and sr["env"]["SLURM_JOB_ID"] == job_id
    log = open(tmp_path / "slurm_logs" / f"minitron-finetune-{job_id}.out").read()
    assert "TP=2 PP=1 DP=1" in log  # rank 0 saw a world of 2 from SLURM's variables
    # both ranks wrote their half of the TP=2 checkpoint at step 2
    step = tmp_path / "sft.ckpt" / "step_000002"
    shards = [os.path.basename(p) for p in glob.glob(str(step / "**" / "*.distcp"), recursive=True)]
    assert {name.split("_")[2] for name in shards} == {"0", "1"}, shards  # __<rank>_<i>.distcp
    # the gathered output is the base model after 2 optimizer steps: every matrix moved
    base, new = dict(iter_tensors(tiny_hf_dir)), dict(iter_tensors(str(out)))
    assert sorted(new) == sorted(base)
    assert all(not torch.equal(new[k].float(), base[k].float()) for k in base if base[k].dim() == 2)


def test_task_extends_the_containers_pythonpath(tmp_path):
    """The task command keeps the image's PYTHONPATH entries after the checkout."""
    opts = slurm.prepare(_opts(tmp_path), ["convert", "nemo-to-hf", "/a.nemo", "/b"])
    argv = slurm.job_argv(opts, ["presets"])
    argv[argv.index("python")] = sys.executable
    code = "import os, nemo_minitron; print(os.environ['PYTHONPATH'])"
    argv = argv[:argv.index("-m")] + ["-c", code]
    for image, expected in (("/opt/NeMo:/opt/x", f"{ROOT}:/opt/NeMo:/opt/x"), (None, ROOT)):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if image:
            env["PYTHONPATH"] = image
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True,
                             cwd=str(tmp_path)).stdout
        assert out.strip() == expected


def test_slurm_works_from_any_directory(tmp_path, fake_slurm, capsys, monkeypatch):
    """Outside the checkout, with no --mounts: the job dir and the directories of absolute path
    arguments are resolved and mounted; a shipped config's name is passed on as it is (the job's
    package resolves it) after checking that it names one."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli_main(["slurm", "finetune", "--config", "tiny_sft", "--model",
                     "/lustre/models/base.nemo", "--data", "train.jsonl", "--out",
                     "/scratch/run/sft.nemo", "--gpus-per-node", "2", "--dry-run"]) == 0
    directives, _, srun_opts, argv = parse_script(capsys.readouterr().out)
    assert directives["--chdir"] == str(elsewhere)
    assert f"--container-mounts={ROOT}:{ROOT},{elsewhere}:{elsewhere},/lustre/models:/lustre/"\
        f"models,/scratch/run:/scratch/run" in srun_opts
    assert argv[argv.index("--config") + 1] == "tiny_sft"
    assert records(fake_slurm, "sbatch") == []
    assert cli_main(["slurm", "finetune", "--config", "tiny_stf", "--model", "/m.nemo", "--data",
                     "t.jsonl", "--out", "/o.nemo", "--dry-run"]) == 2
    assert "config tiny_stf: no such file, and no shipped config of that name (" in \
        capsys.readouterr().err


def test_pipeline_dry_run_needs_no_local_inputs(tmp_path, fake_slurm, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(["pipeline", "--teacher", "/lustre/teacher.nemo", "--workdir", "run",
                     "--data", "/lustre/data/corpus.jsonl", "--prune-config",
                     "tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    scripts = out.split("# ---- ")[1:]
    assert [s.split(" ----")[0] for s in scripts] == ["prune", "distill", "export"]  # no convert
    _, _, srun_opts, argv = parse_script(scripts[0].split("----\n", 1)[1])
    assert argv[argv.index("--model") + 1] == "/lustre/teacher.nemo"
    assert argv[argv.index("--config") + 1] == "tiny"
    assert argv[argv.index("--out") + 1] == str(tmp_path / "run" / "student.nemo")
    assert "/lustre:/lustre" in srun_opts[1]
    assert not (tmp_path / "run").exists() and records(fake_slurm, "sbatch") == []


def test_a_non_editable_install_mounts_only_its_package(tmp_path, monkeypatch):
    """site-packages is never mounted (the host's torch would shadow the image's): only the
    package directory, read-only, at a fixed place that goes on PYTHONPATH."""
    site = tmp_path / "site-packages"
    (site / "nemo_minitron").mkdir(parents=True)
    monkeypatch.setattr(slurm, "repo_root", lambda: str(site))
    command = ["convert", "nemo-to-hf", "/a.nemo", "/b"]
    opts = slurm.prepare(_opts(tmp_path), command)
    _, _, srun_opts, argv = parse_script(slurm.render(opts, command))
    code = f"{site}/nemo_minitron:{slurm.INSTALLED_CODE_DIR}/nemo_minitron:ro"
    assert srun_opts[1] == f"--container-mounts={code},{tmp_path}:{tmp_path}"
    assert argv[:5] == ["bash", "-c", slurm.EXTEND_PYTHONPATH, "nemo-minitron",
                        slurm.INSTALLED_CODE_DIR]
