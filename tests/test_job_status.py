"""The job's status hash (services/job_status.py) against a real redis-server: the field names
and values outside readers see, and the typed record every reader in the project gets."""

from __future__ import annotations

import numpy as np
import pytest
from qualiteacher.services.bank import build_entry
from qualiteacher.services.job_status import FIELD_NAMES, JobStatus, JobStatusHash

# What `redis-cli HGETALL {prefix}:meta` shows after a job: a contract with the monitor's page,
# the compose check and outside tools. Change it only together with them.
CONTRACT = {"top_k", "teacher_version", "scorer_count", "student_step", "student_steps", "student_loss",
            "student_starts", "student_resumes", "student_resumed_at_step"}


def _raw(bank) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in bank.client.hgetall(f"{bank.prefix}:meta").items()}


def test_field_names_are_the_contract():
    assert set(FIELD_NAMES) == CONTRACT


def test_a_new_job_reads_defaults(bank):
    assert bank.status.read() == JobStatus()
    assert bank.status.read().student_step == 0 and bank.status.read().teacher_version is None


def test_every_writer_and_what_redis_holds(bank):
    status = bank.status
    status.set_teacher_version(4)
    status.set_scorer_count(2)
    status.report_progress(17, 200, 0.123456)
    status.count_start()
    status.count_start()
    status.count_resume(12)
    bank.gate("img0", [build_entry("img0", "img0.v4.hflip", ensemble=6.0, image=np.zeros((2, 2, 3), np.uint8),
                                   image_format="raw", teacher_version=4)])
    assert _raw(bank) == {"top_k": "3", "teacher_version": "4", "scorer_count": "2", "student_step": "17",
                          "student_steps": "200", "student_loss": "0.12346", "student_starts": "2",
                          "student_resumes": "1", "student_resumed_at_step": "12"}
    assert status.read() == JobStatus(top_k=3, teacher_version=4, scorer_count=2, student_step=17,
                                      student_steps=200, student_loss=0.12346, student_starts=2,
                                      student_resumes=1, student_resumed_at_step=12)
    stats = bank.stats()
    assert (stats["teacher_version"], stats["scorer_count"]) == (4, 2)


def test_queued_read_in_a_pipeline(bank):
    bank.status.set_teacher_version(9)
    pipe = bank.client.pipeline(transaction=False)
    bank.status.queue_read(pipe)
    pipe.xlen(bank.keys.events)
    raw, _ = pipe.execute()
    assert JobStatus.decode(raw).teacher_version == 9


def test_decode_and_encode(redis_server, bank):
    status = JobStatus(top_k=3, teacher_version=0, student_step=5, student_steps=10, student_loss=0.5)
    assert JobStatus.decode(status.encode()) == status
    assert "scorer_count" not in status.encode()  # unset fields are not written
    # Another tool's field is ignored; a client that decodes responses reads the same record.
    bank.client.hset(f"{bank.prefix}:meta", mapping={**status.encode(), "someone_elses": "x"})
    assert bank.status.read() == status
    text_client = redis_server.client(decode_responses=True)
    try:
        assert JobStatusHash(text_client, bank.prefix).read() == status
    finally:
        text_client.close()


def test_unknown_fields_are_refused(bank):
    with pytest.raises(ValueError, match="not job status fields"):
        bank.status.update(student_stepz=1)
    assert _raw(bank) == {}


def test_the_driver_progress_line_reads_it(bank):
    from qualiteacher.pipelines.progress import progress_line

    assert progress_line(bank) == (0, 0, "version 0  bank 0 img / 0 PLs  drop 0%  loss -")
    bank.status.set_teacher_version(4)
    bank.status.report_progress(17, 200, 0.123456)
    assert progress_line(bank) == (17, 200, "version 4  bank 0 img / 0 PLs  drop 0%  loss 0.12346")
