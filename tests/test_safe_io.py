"""Writes that fail cleanly: records appended whole or not at all, atomic text files, torn-line tolerant
reading."""

from __future__ import annotations

import errno
import json
import os

import pytest

from moegpt import safe_io
from moegpt.errors import MoegptError, WriteFailed


def failing_writer(fail_when, real=os.write):
    """An os.write that, for the write whose bytes match `fail_when`, writes half and then fails ENOSPC."""
    state = {"torn": False}

    def write(fd, data):
        if state["torn"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if fail_when(bytes(data)):
            state["torn"] = True
            return real(fd, bytes(data)[: len(data) // 2])
        return real(fd, data)

    return write


def test_failed_append_leaves_earlier_records_whole(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    safe_io.append_line(path, json.dumps({"step": 1}))
    monkeypatch.setattr(safe_io, "_write", failing_writer(lambda b: b'"step": 2' in b))
    with pytest.raises(WriteFailed, match=r"No space left on device \(errno 28\).*earlier records are intact"):
        safe_io.append_line(path, json.dumps({"step": 2}))
    assert path.read_text() == '{"step": 1}\n'


def test_failed_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    safe_io.write_text_atomic(path, "old = 1\n")
    monkeypatch.setattr(safe_io, "_write", failing_writer(lambda b: True))
    with pytest.raises(WriteFailed, match="previous version is intact"):
        safe_io.write_text_atomic(path, "new = 2\n" * 100)
    assert path.read_text() == "old = 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_other_os_errors_pass_through():
    with pytest.raises(FileNotFoundError), safe_io.write_failures_as_errors("x"):
        raise FileNotFoundError(errno.ENOENT, "gone")


@pytest.mark.parametrize("tail", ['{"step": 3, "lo', '{"step": 3, "lo\n'])
def test_read_jsonl_drops_a_torn_last_line(tmp_path, tail):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n' + tail)
    assert safe_io.read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_read_jsonl_refuses_a_damaged_middle_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(MoegptError, match="line 2"):
        safe_io.read_jsonl(path)
