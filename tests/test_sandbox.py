"""The sandbox for model-written code: each escape attempt is stopped, each limit holds."""

from __future__ import annotations

import socket
import threading
import uuid
from pathlib import Path

import pytest

from selftrain.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(cpu_seconds=1, wall_seconds=4)


def test_ordinary_code_runs_and_reads_stdin():
    r = run_python("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 39")
    assert r.ok and r.stdout == "42\n" and r.error == ""


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    r = run_python("while True:\n    pass", limits=FAST)
    assert not r.ok and r.seconds < 3 and ("SIGXCPU" in r.error or "SIGKILL" in r.error or r.timed_out)


def test_sleeping_forever_is_stopped_by_the_wall_clock():
    r = run_python("import time\ntime.sleep(60)", limits=SandboxLimits(wall_seconds=1))
    assert r.timed_out and not r.ok and r.seconds < 3


def test_fork_bomb_is_refused():
    r = run_python("import os\nwhile True:\n    os.fork()", limits=FAST)
    assert not r.ok and "os.fork is not allowed" in r.error
    r = run_python("import subprocess\nsubprocess.run(['sleep', '30'])", limits=FAST)
    assert not r.ok and "not allowed" in r.error


def test_huge_allocation_fails_inside_the_child():
    r = run_python("x = bytearray(8 * 1024**3)", limits=SandboxLimits(memory_mb=256))
    assert not r.ok and "MemoryError" in r.error


def test_writes_stay_inside_the_working_directory(tmp_path):
    target = tmp_path / f"escape-{uuid.uuid4().hex}.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')", limits=FAST)
    assert not r.ok and "outside the working directory" in r.error and not target.exists()
    r = run_python("import os\nos.remove('/etc/hostname')", limits=FAST)
    assert not r.ok and "not allowed" in r.error and Path("/etc/hostname").exists()
    r = run_python("open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())", limits=FAST)
    assert r.ok and r.stdout == "kept\n"  # its own folder is writable


def test_network_connection_is_refused():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: _accept(server, accepted))
    thread.start()
    r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'hi')",
                   limits=FAST)
    thread.join()
    server.close()
    assert not r.ok and "network" in r.error and not accepted


def _accept(server, accepted):
    try:
        accepted.append(server.accept())
    except OSError:
        pass


def test_network_namespace_has_no_interfaces_where_the_kernel_allows():
    r = run_python("print(open('/proc/self/net/dev').read())", limits=FAST)
    if not r.network_isolated:
        pytest.skip("no network namespace on this machine; the audit hook alone refuses sockets")
    interfaces = {line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if ":" in line}
    assert interfaces == {"lo"}


def test_output_and_file_size_are_capped():
    r = run_python("print('x' * 10**7)", limits=SandboxLimits(file_size_mb=1, output_chars=1000))
    assert not r.ok and r.output_truncated and len(r.stdout) == 1000
