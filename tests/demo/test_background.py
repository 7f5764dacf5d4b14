import os

import pytest
import torch

from unimoe.demo.background import Background, BackgroundJobError


def _job(x, log_line):
    print(log_line)
    return {"pid": os.getpid(), "threads": torch.get_num_threads(), "double": 2 * x}


def _failing_job():
    raise ValueError("bad record in the job")


def _dying_job():
    os._exit(3)


def test_background_runs_beside_the_caller_on_one_thread_each(tmp_path):
    torch.set_num_threads(2)
    try:
        job = Background(_job, 21, "hello from the job", log=tmp_path / "job.log")
        assert torch.get_num_threads() == 1  # the caller gives up a thread while the job runs
        out = job.result()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(2)
    assert out["double"] == 42
    assert out["pid"] != os.getpid()  # it ran in another process
    assert out["threads"] == 1
    assert "hello from the job" in (tmp_path / "job.log").read_text()  # its output went to the log


def test_background_errors_name_the_job_and_carry_its_traceback(tmp_path):
    job = Background(_failing_job, log=tmp_path / "job.log", name="the other core")
    with pytest.raises(BackgroundJobError, match="the other core failed") as err:
        job.result()
    assert "ValueError: bad record in the job" in str(err.value)
    assert str(tmp_path / "job.log") in str(err.value)


def test_background_reports_a_job_that_died(tmp_path):
    job = Background(_dying_job, log=tmp_path / "job.log")
    with pytest.raises(BackgroundJobError, match="exit code 3"):
        job.result()


def test_background_splits_the_threads_and_runs_inline_on_one(tmp_path):
    try:
        torch.set_num_threads(4)
        job = Background(_job, 1, "x", log=tmp_path / "job.log")
        assert torch.get_num_threads() == 2
        assert job.result()["threads"] == 2 and torch.get_num_threads() == 4
        torch.set_num_threads(1)  # nothing to share: the job runs here, when its result is asked for
        job = Background(_job, 1, "x", log=tmp_path / "job.log")
        assert job.result()["pid"] == os.getpid()
    finally:
        torch.set_num_threads(2)
