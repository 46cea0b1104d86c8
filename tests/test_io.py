import json
import os

import pytest

from hmcl_cli.errors import RunLockedError
from hmcl_cli.io_utils import RunLock, atomic_path, write_jsonl_atomic


def test_interrupted_write_leaves_previous_output_intact(tmp_path):
    target = tmp_path / "train.jsonl"
    write_jsonl_atomic(target, [{"a": 1}])
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]  # no temp left behind


def test_interrupted_directory_write(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "w").write_text("v2-partial")
            raise RuntimeError("disk full")
    assert (target / "w").read_text() == "v1" and len(list(tmp_path.iterdir())) == 1


def test_second_writer_is_refused_and_a_killed_owners_lock_is_not(tmp_path):
    """A live owner (another process) makes a second run refuse, naming it; killed with SIGKILL it
    leaves its lock file, which blocks nothing. Nor does a left lock file naming some live process
    that is not a run (a container reuses pids)."""
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hmcl_cli.io_utils import RunLock\n"
        f"with RunLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid}"):
            with RunLock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").read_text() == str(holder.pid)  # left behind by the killed owner
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
        with RunLock(tmp_path):  # re-entrant in one process
            pass
        assert (tmp_path / ".lock").exists()
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(str(os.getppid()))  # a live process, but not a run holding it
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_without_os_locks_the_pid_named_is_checked(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "fcntl" else real_import(name, *a, **k))
    (tmp_path / ".lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(RunLockedError, match="in use by process"):
        with RunLock(tmp_path):
            pass
    (tmp_path / ".lock").write_text("999999999")  # stale lock of a dead process is taken over
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()


def test_cache_keeps_the_two_most_recently_used_entries_of_a_kind(tmp_path):
    """A kept run directory gathered one cache entry per data or model change (corpus embeddings
    are gigabytes); each write or reuse now keeps the two most recently used of its kind."""
    import os
    import time

    from hmcl_cli.io_utils import use_cache_entry

    cache = tmp_path / "cache"
    cache.mkdir()
    now = time.time()
    for i, name in enumerate(["tokens-a.pt", "tokens-b.pt", "tokens-c.pt", "corpus-emb-x.npy"]):
        (cache / name).write_text(name)
        os.utime(cache / name, (now - 100 + i, now - 100 + i))
    use_cache_entry(cache / "tokens-a.pt")  # the oldest, reused now: it stays, with the newest other one
    assert sorted(p.name for p in cache.iterdir()) == ["corpus-emb-x.npy", "tokens-a.pt", "tokens-c.pt"]
    (cache / "tokens-d.pt").write_text("d")
    use_cache_entry(cache / "tokens-d.pt")
    assert sorted(p.name for p in cache.iterdir()) == ["corpus-emb-x.npy", "tokens-a.pt", "tokens-d.pt"]


def test_gc_paused_turns_the_collector_off_and_back_as_it_was():
    import gc

    from hmcl_cli.io_utils import gc_paused

    assert gc.isenabled()
    with pytest.raises(ValueError):
        with gc_paused():
            assert not gc.isenabled()
            raise ValueError  # an error inside still turns it back on
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()


def test_json_outputs_are_standard_json_without_nan(tmp_path):
    """mteb reports NaN for some scores of small or one-sided tasks; Python wrote them as `NaN`,
    which JavaScript's JSON.parse, Go and jq 1.6 reject: the results a CI job reads were
    unreadable there. They are null now, in results/stats files and in metrics.jsonl."""
    import json
    import math

    from hmcl_cli.io_utils import write_json_atomic
    from hmcl_cli.training.trainer import MetricsLog

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))

    report = {"results": {"t": {"m": {"map": 0.5, "mteb": {"nauc_recall_at_3_max": math.nan, "x": [math.inf, 1.0]}}}}}
    write_json_atomic(tmp_path / "r.json", report)
    assert strict((tmp_path / "r.json").read_text())["results"]["t"]["m"] == {
        "map": 0.5, "mteb": {"nauc_recall_at_3_max": None, "x": [None, 1.0]}}
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 3, "loss": math.nan, "dev_map": 0.25})
    line = strict((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert line["loss"] is None and line["dev_map"] == 0.25 and line["step"] == 3


def test_a_written_link_keeps_its_link_and_a_stream_is_written_through(tmp_path):
    """`hmcl eval --json /dev/stdout` renamed its temporary file onto /dev/stdout: as root it
    replaced the device's link with a regular file for every later process of the machine (the
    JSON never reached the pipe). A path that is a link is now written where it points (the link
    stays), and a stream (a pipe, a device) is written to as it is."""
    import stat
    import threading

    from hmcl_cli.io_utils import is_stream, write_json_atomic, write_text_atomic

    real = tmp_path / "shared" / "latest.json"
    real.parent.mkdir()
    real.write_text("{}")
    link = tmp_path / "results.json"
    link.symlink_to(real)
    write_json_atomic(link, {"a": 1})
    assert link.is_symlink() and json.loads(real.read_text()) == {"a": 1}
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    write_text_atomic(fifo, "through the pipe\n")
    reader.join(timeout=10)
    assert got == ["through the pipe\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "results.json", "shared"]  # no temp left
    assert is_stream(fifo) and not is_stream(real) and not is_stream(tmp_path) and not is_stream(tmp_path / "none")


def test_folder_stamp_follows_content_not_file_times(tmp_path):
    """What the model card's eval results are matched with: the same files copied without their
    times keep the stamp (a CI artifact); a changed byte of a small file, or in the blocks read
    of a big one (a training rewrites every weight), changes it; a big file is not read whole."""
    import os

    from hmcl_cli.io_utils import folder_stamp

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"a": 1}')
    weights = bytearray(os.urandom(3 << 20))
    (tmp_path / "m" / "model.bin").write_bytes(weights)
    small = dict(whole_below=1 << 20, blocks=8, block=4096)
    before = folder_stamp(tmp_path / "m", **small)
    for f in (tmp_path / "m").iterdir():
        f.write_bytes(f.read_bytes())
        os.utime(f, ns=(10**18, 10**18))
    assert folder_stamp(tmp_path / "m", **small) == before
    (tmp_path / "m" / "config.json").write_text('{"a": 2}')
    assert folder_stamp(tmp_path / "m", **small) != before
    (tmp_path / "m" / "config.json").write_text('{"a": 1}')
    weights[-1] ^= 1  # the last block is read
    (tmp_path / "m" / "model.bin").write_bytes(weights)
    assert folder_stamp(tmp_path / "m", **small) != before
    weights[-1] ^= 1
    weights[len(weights) // 2 + 1000] ^= 1  # between two blocks read: not seen (nor read)
    (tmp_path / "m" / "model.bin").write_bytes(weights)
    assert folder_stamp(tmp_path / "m", **small) == before
