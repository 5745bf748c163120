"""The same job under python, torchrun and srun: rank discovery through Lightning's environments."""
import os

import pytest

from nemo_minitron.errors import MinitronError
from tests.helpers import LAUNCHER_VARS, run_ranks


def _who(rank):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from nemo_minitron.dist import cluster_environment, is_rank0

    return dict(rank=dist.get_rank(), world=dist.get_world_size(), env=type(cluster_environment()).__name__,
                tp_rank=ps.get_tensor_model_parallel_rank(), rank0=is_rank0(),
                master=os.environ["MASTER_ADDR"], local=int(os.environ["LOCAL_RANK"]))


@pytest.mark.megatron
@pytest.mark.parametrize("launcher, env", [("torchrun", "TorchElasticEnvironment"),
                                           ("srun", "SLURMEnvironment")])
def test_two_ranks_under_each_launcher(launcher, env):
    ranks = run_ranks(_who, 2, tp=2, launcher=launcher)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert [r["tp_rank"] for r in ranks] == [0, 1] and [r["local"] for r in ranks] == [0, 1]
    assert all(r["env"] == env and r["master"] == "127.0.0.1" for r in ranks)
    assert [r["rank0"] for r in ranks] == [True, False]


def _plain_python():
    from nemo_minitron.dist import cluster_environment

    env = cluster_environment()
    return type(env).__name__, env.world_size(), env.global_rank()


def test_plain_python_is_a_world_of_one(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert _plain_python() == ("LightningEnvironment", 1, 0)


def test_torchrun_inside_an_sbatch_allocation_is_torchrun(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # the batch step of an sbatch job
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    for k, v in dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8",
                     GROUP_RANK="0", TORCHELASTIC_RUN_ID="x").items():
        monkeypatch.setenv(k, v)
    assert _plain_python() == ("TorchElasticEnvironment", 8, 3)


def test_missing_lightning_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lightning(name, *args, **kwargs):
        if name.startswith("lightning_fabric"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lightning)
    with pytest.raises(MinitronError, match="pip install lightning-fabric"):
        _plain_python()


def test_a_second_job_in_a_plain_process_needs_no_lightning(monkeypatch):
    """A plain process exports its own world-of-one RANK/WORLD_SIZE for torch.distributed; a
    second job in it (the demo's perplexity of teacher and student) is still alone, and does not
    need the optional lightning-fabric (found by `pip install .[hf]` in a fresh venv)."""
    import builtins

    from nemo_minitron import dist

    for var in (*LAUNCHER_VARS, "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "-")  # recorded: what the job exports is undone after the test
        monkeypatch.delenv(var)
    monkeypatch.setattr(dist, "_own_rendezvous", False)
    real_import = builtins.__import__

    def no_lightning(name, *args, **kwargs):
        if name.startswith("lightning_fabric"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lightning)
    for _ in range(2):  # what init_megatron does for each job
        dist._export_rendezvous()
        assert os.environ["RANK"] == "0" and os.environ["WORLD_SIZE"] == "1"
        assert dist.launched_world_size() == 1
    monkeypatch.setattr(dist, "_own_rendezvous", False)  # a launcher's RANK: Lightning decides
    with pytest.raises(MinitronError, match="pip install lightning-fabric"):
        dist.launched_world_size()


def _many_short_worlds(iterations):
    import tempfile

    import torch
    import torch.distributed as dist

    from nemo_minitron.dist import destroy_process_groups, free_retired_groups

    # the group is made here, not through one_rank_world: its other exit steps give gloo's
    # workers time, and the test then passed without the fix (measured)
    for _ in range(iterations):
        with tempfile.TemporaryDirectory() as tmp:
            free_retired_groups()
            dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1),
                                    rank=0, world_size=1)
            for _ in range(3):  # Python drops each tensor while gloo's worker may still hold it
                dist.all_reduce(torch.ones(1000))
            destroy_process_groups()


def test_a_jobs_end_does_not_hang_in_the_group_destructor():
    """A job's end right after a collective: on torch 2.3, plain dist.destroy_process_group()
    deadlocks here (the gloo destructor joins a worker that waits for the GIL; measured: hung at
    the 8th of these worlds, every run). destroy_process_groups frees the groups later."""
    import multiprocessing
    import signal

    proc = multiprocessing.get_context("fork").Process(target=_many_short_worlds, args=(40,))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        pytest.fail("a world's teardown hung (the gloo destructor / GIL deadlock)")
    assert proc.exitcode == 0
