"""The sandbox for model-written code, attacked as a hostile program would, and checked from outside.

Each attack first switches the Python audit hook off (``HOOK_OFF``: the hook is only a second
layer, and a program can reach it through the garbage collector), so what stops it is the kernel:
namespaces, user 65534, a read-only view, seccomp, rlimits. Success is judged outside the
sandbox: marker files that must not appear, a victim file that must survive, a secret planted in
this process's environment that must not be printed, a victim process that must stay alive.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from selftrain.sandbox import (
    SandboxLimits,
    SandboxUnavailable,
    isolation_available,
    require_isolation,
    run_python,
)

FAST = SandboxLimits(cpu_seconds=1, wall_seconds=4)
FULL = isolation_available() == "full"
needs_full = pytest.mark.skipif(not FULL, reason="this machine gives no full isolation (bwrap/userns/seccomp)")

# Turn the audit hook off from inside: rewrite its closure cells (found through gc) and the
# bootstrap's globals in __main__. What is still refused after this is refused by the kernel.
HOOK_OFF = """
import gc, sys
for _f in gc.get_objects():
    if getattr(_f, "__name__", "") in ("hook", "inside") and getattr(_f, "__closure__", None):
        for _c in _f.__closure__:
            if isinstance(_c.cell_contents, frozenset):
                _c.cell_contents = frozenset()
            elif callable(_c.cell_contents) and getattr(_c.cell_contents, "__name__", "") == "inside":
                _c.cell_contents = lambda p: True
"""


def hostile(code: str, **kw):
    return run_python(HOOK_OFF + code, limits=kw.pop("limits", FAST), **kw)


def run(code: str, **kw):
    """At the best level this machine gives (the limits below hold at every level)."""
    return run_python(code, min_isolation="none", **kw)


def test_ordinary_code_runs_and_reads_stdin():
    r = run("import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 39")
    assert r.ok and r.stdout == "42\n" and r.error == "" and r.isolation == isolation_available()


def test_hook_off_really_switches_the_hook_off():
    """The premise of every attack below: without the kernel's walls nothing would stop them."""
    r = run_python(HOOK_OFF + "import os\nos.mkdir('/proc/nope')", limits=FAST, min_isolation="none")
    assert "sandbox:" not in r.stderr  # the hook said nothing; the kernel answered
    assert "Errno" in r.stderr


@needs_full
def test_runs_as_user_65534_with_no_new_privs_and_seccomp_seen_from_outside():
    """The host's /proc, read while the program sleeps, shows who it really is."""
    seen = {}

    def watch():
        time.sleep(0.8)  # past the bootstrap, which starts as root and drops to 65534 before the code
        deadline = time.time() + 5
        while time.time() < deadline and not seen:
            for status in Path("/proc").glob("[0-9]*/status"):
                argv = _reads(status.parent / "cmdline").split(b"\0")
                if b"/sandbox/inside.py" in argv and not argv[0].endswith(b"bwrap"):
                    text = _reads(status).decode()
                    seen.update(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
            time.sleep(0.05)

    thread = threading.Thread(target=watch)
    thread.start()
    r = run_python("import time\ntime.sleep(2)", limits=SandboxLimits(wall_seconds=5))
    thread.join()
    assert r.ok and seen, "the sandboxed interpreter was not found in the host's /proc"
    assert seen["Uid"].split()[:2] == ["65534", "65534"] and seen["Gid"].split()[0] == "65534"
    assert seen["NoNewPrivs"] == "1" and seen["Seccomp"] == "2" and int(seen["CapEff"], 16) == 0


@needs_full
def test_fork_exec_without_audit_event_cannot_start_a_shell(tmp_path):
    """With the hook off, subprocess reaches _posixsubprocess.fork_exec, which raises no audit event."""
    marker = tmp_path / "shell-ran"
    for attack in ("import os\nos.fork()", "import os\nassert os.system('touch {m}') == 0",
                   "import os\nos.execv('/bin/sh', ['sh', '-c', 'touch {m}'])",
                   "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch {m}'])", "import pty\npty.fork()"):
        r = hostile(attack.format(m=marker))
        assert not r.ok and not marker.exists(), attack
        assert "sandbox:" not in r.stderr, r.stderr  # the hook is off: the kernel refused


@needs_full
def test_rewriting_the_bootstrap_globals_gives_nothing(tmp_path):
    marker = tmp_path / "globals"
    r = hostile(f"import sys, os\nsys.modules['__main__'].__dict__.clear()\nprint(os.system('touch {marker}'))")
    assert r.stdout.strip() != "0" and not marker.exists()


@needs_full
def test_writes_deletes_and_fifos_outside_its_folder_fail_even_through_dir_fd(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    made = tmp_path / "made-by-sandbox"
    fifo = tmp_path / "fifo"
    for attack in (
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.remove('victim.txt', dir_fd=fd)",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.open('made-by-sandbox', os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        f"import os\nos.mkfifo({str(fifo)!r})",
        f"open({str(victim)!r}, 'w').write('gone')",
        f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('gone')",
        "import os\nos.remove('/usr/bin/env')",
        "open('/usr/lib/os-release', 'a').write('x')",
        "import shutil\nshutil.rmtree('/usr/share', ignore_errors=False)",
    ):
        r = hostile(attack)
        assert not r.ok, attack
    assert victim.read_text() == "keep me" and not made.exists() and not fifo.exists()
    assert Path("/usr/bin/env").exists() and Path("/usr/share").is_dir()
    r = run_python("open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())", limits=FAST)
    assert r.ok and r.stdout == "kept\n"  # its own folder is writable


@needs_full
def test_secrets_of_the_host_are_not_readable(monkeypatch):
    secret = f"SECRET-{uuid.uuid4().hex}"
    monkeypatch.setenv("SELFTRAIN_TEST_TOKEN", secret)  # the parent's environment, e.g. an API token
    r = hostile(f"""
import os, glob
found = []
for path in ["/etc/passwd", "/etc/shadow", "/proc/{os.getpid()}/environ", "/proc/{os.getppid()}/environ",
             "/proc/1/environ", *glob.glob("/proc/*/environ"), os.path.expanduser("~root/.bash_history")]:
    try:
        found.append(open(path, "rb").read().decode(errors="replace"))
    except OSError as e:
        print("refused", path, e.errno)
print("ENV", dict(os.environ))
print("\\n".join(found))
""")
    assert secret not in r.stdout and secret not in r.stderr
    assert "root:x:0:0" not in r.stdout  # no /etc at all


@needs_full
def test_no_other_process_can_be_seen_or_killed():
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        r = hostile(f"""
import os, signal
for pid in ({victim.pid}, {os.getpid()}, os.getppid(), 1, -1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as e:
        print(pid, e.errno)
print(sorted(p for p in os.listdir('/proc') if p.isdigit()))
""")
        time.sleep(0.3)
        assert victim.poll() is None  # still alive; and so are we
        pids = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        assert str(victim.pid) not in pids.split(", ")
    finally:
        victim.kill()
        victim.wait()


@needs_full
def test_a_program_cannot_touch_the_server_or_the_next_program():
    """Programs are forked by one server per sandbox: none may signal, trace, re-limit or write into
    it, and nothing one leaves (files, threads) reaches the next."""
    r = hostile("""
import os, resource, signal, threading, time
server = os.getppid()
results = {}
for name, attack in [
    ("kill", lambda: os.kill(server, signal.SIGKILL)),
    ("kill_all", lambda: os.kill(-1, signal.SIGKILL)),
    ("stop", lambda: os.kill(server, signal.SIGSTOP)),
    ("prlimit", lambda: resource.prlimit(server, resource.RLIMIT_CPU, (0, 0))),
    ("mem", lambda: open(f"/proc/{server}/mem", "r+b").write(b"x")),
    ("fds", lambda: os.listdir(f"/proc/{server}/fd")),
]:
    try:
        attack()
        results[name] = "done"
    except OSError as e:
        results[name] = e.errno
print(results)
open("left-behind", "w").write("x")
open("/tmp/left-behind", "w").write("x")
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
assert "done" not in results.values(), results
""")
    assert r.ok, (r.stdout, r.stderr)
    after = run_python("import os\nprint(os.path.exists('left-behind'), os.path.exists('/tmp/left-behind'))",
                       limits=FAST)
    assert after.ok and after.stdout == "False False\n"  # the server lives, and starts each program clean


@needs_full
def test_a_program_finds_nothing_of_the_one_before_in_its_memory():
    """Every program is forked from a zygote that never held another program's code, input or
    output: a scan of the whole readable memory of the next one finds none of them."""
    token = uuid.uuid4().hex
    first = run_python(f"import sys\nprint('OUT-{token}', sys.stdin.read())\nx = 'CODE-{token}'",
                       stdin=f"IN-{token}")
    assert first.ok and f"OUT-{token}" in first.stdout
    scan = hostile(f"""
import re, sys
token = {token[::-1]!r}[::-1]  # built here, so this program's own text does not contain it
own = sys.stdin.read()  # its own input: proof that the scan sees what is in memory
found = set()
f = sys._getframe().f_back  # the frames below this program's own
while f:
    found.update(k for k, v in f.f_locals.items() if token in repr(v))
    f = f.f_back
import ctypes
with open("/proc/self/maps") as maps:  # every readable mapping, read in place
    for line in maps:
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if "r" not in fields[1] or end - start > 1 << 30 or fields[-1] in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
            continue
        data = ctypes.string_at(start, end - start)
        found.update(m.decode() for m in re.findall(rb"(OUT|IN|CODE|SELF)-" + token.encode(), data))
print(sorted(found))
""", stdin=f"SELF-{token}", limits=SandboxLimits(cpu_seconds=5, wall_seconds=10, memory_mb=1024))
    assert scan.ok, scan.stderr
    assert scan.stdout.strip() == "['SELF']"  # its own input, and nothing of the program before


@needs_full
def test_a_program_cannot_slow_stop_or_share_state_with_the_next():
    """The attacks of a red-team read, each followed by a program that must be unaffected."""
    r = hostile("""
import ctypes, fcntl, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
zygote, results = os.getppid(), {}
r, w = os.pipe()
for name, call in [
    ("setown", lambda: fcntl.fcntl(r, fcntl.F_SETOWN, zygote)),           # SIGIO aimed at the zygote
    ("setsig", lambda: fcntl.fcntl(r, 10, signal.SIGSTOP)),               # F_SETSIG
    ("sched_setattr", lambda: libc.syscall(314, zygote, (ctypes.c_uint32 * 14)(56, 5), 0) == 0 or 1 / 0),
    ("shmget", lambda: libc.shmget(0, 1 << 20, 0o1666) >= 0 or 1 / 0),   # System V memory outlives a process
    ("msgget", lambda: libc.msgget(0, 0o1666) >= 0 or 1 / 0),
    ("mq_open", lambda: libc.mq_open(b"/q", 0o102, 0o666, None) >= 0 or 1 / 0),
    ("memfd", lambda: os.memfd_create("x")),
]:
    try:
        call()
        results[name] = "done"
    except (OSError, ZeroDivisionError):
        results[name] = "refused"
print(results)
os.makedirs("/tmp/a/b")
open("/tmp/a/b/left", "w").write("x")
os.chmod("/tmp/a/b", 0)
os.chmod("/tmp/a", 0)
open("/work/left", "w").write("x")
made = 0
try:
    while True:
        open(f"/work/f{made}", "w").close()
        made += 1
except OSError as e:
    print("files stopped at", made, e.errno)
assert set(results.values()) == {"refused"}, results
""", limits=SandboxLimits(cpu_seconds=3, wall_seconds=6))
    assert r.ok, (r.stdout, r.stderr)
    assert int(r.stdout.split("files stopped at ")[1].split()[0]) <= 2048  # inodes, not only bytes, are capped
    after = run_python("""
import os, time
print(os.sched_getscheduler(0), os.listdir("/work"), os.listdir("/tmp"), flush=True)
open("mine", "w").write("x" * 1000)
time.sleep(2)
""", limits=SandboxLimits(wall_seconds=1))
    assert after.timed_out and after.seconds < 2.5  # the wall clock still holds
    assert after.stdout.strip() == "0 [] []"  # normal scheduling, an empty folder and /tmp


@needs_full
def test_nothing_outlives_a_program_and_no_host_disk_is_taken():
    """A second red-team read: disk through the output files, objects kept alive by descriptor
    loops, terminals, record locks, high bits in fcntl commands."""
    r = hostile("""
import ctypes, fcntl, os, socket
libc = ctypes.CDLL(None, use_errno=True)
results = {}
for name, call in [
    ("fallocate_stdout", lambda: libc.fallocate(1, 1, ctypes.c_long(0), ctypes.c_long(1 << 30)) == 0 or 1 / 0),
    ("write_stdin", lambda: os.write(0, b"x")),
    ("socketpair", lambda: socket.socketpair()),
    ("unix_socket", lambda: socket.socket(socket.AF_UNIX)),
    ("pty", lambda: os.openpty()),
    ("setown_high_bits", lambda: libc.syscall(72, 1, ctypes.c_long(8 | 1 << 32), os.getppid()) == 0 or 1 / 0),
    ("flock", lambda: fcntl.flock(os.open("/usr/bin/env", os.O_RDONLY), fcntl.LOCK_SH)),
    ("record_lock", lambda: fcntl.lockf(os.open("/work/f", os.O_CREAT | os.O_RDWR), fcntl.LOCK_EX)),
    ("memfd_secret", lambda: libc.syscall(447, 0) >= 0 or 1 / 0),
    ("write_root", lambda: open("/left", "w")),
    ("write_dev", lambda: open("/dev/left", "w")),
]:
    try:
        call()
        results[name] = "done"
    except (OSError, ZeroDivisionError):
        results[name] = "refused"
print(results)
assert set(results.values()) == {"refused"}, results
""")
    assert r.ok, (r.stdout, r.stderr)


def test_a_caller_with_many_open_files_is_served(tmp_path):
    files = [open(tmp_path / f"f{i}", "w") for i in range(1100)]  # descriptors above select()'s 1024
    try:
        r = run("print(6 * 7)")
        assert r.ok and r.stdout == "42\n"
    finally:
        for f in files:
            f.close()


def test_a_signal_without_a_name_is_still_a_reason():
    from selftrain.sandbox import SandboxResult

    r = SandboxResult(ok=False, stdout="", stderr="", returncode=-40, timed_out=False, seconds=0.0,
                      output_truncated=False, isolation="full")
    assert r.error == "killed by signal 40"


@needs_full
def test_ctypes_syscalls_and_namespace_tricks_are_refused(tmp_path):
    marker = tmp_path / "ctypes"
    r = hostile(f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
results = {{
    "fork": libc.syscall(57),                      # SYS_fork
    "unshare_user": libc.unshare(0x10000000),      # a fresh user namespace = capabilities
    "setuid0": libc.setuid(0),
    "ptrace": libc.syscall(101, 16, 1, 0, 0),      # PTRACE_ATTACH to pid 1
    "mount": libc.mount(b"none", b"/work", b"tmpfs", 0, None),
    "execve": libc.execve(b"/bin/sh", (ctypes.c_char_p * 4)(b"sh", b"-c", b"touch {marker}", None), None),
}}
print(results)
assert all(v == -1 for v in results.values()), results
""")
    assert r.ok, r.stderr  # every call returned -1 (refused), and the program said so itself
    assert not marker.exists()


@needs_full
def test_network_connection_is_refused_even_without_the_hook():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: _accept(server, accepted))
    thread.start()
    r = hostile(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'hi')")
    thread.join()
    server.close()
    assert not r.ok and not accepted
    r = hostile("print(open('/proc/self/net/dev').read())")
    interfaces = {line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if ":" in line}
    assert interfaces == {"lo"}


def _accept(server, accepted):
    try:
        accepted.append(server.accept())
    except OSError:
        pass


@needs_full
def test_dev_shm_and_tmp_are_private_and_capped():
    name = f"selftrain-{uuid.uuid4().hex}"
    r = hostile(f"""
for d in ("/dev/shm", "/tmp"):
    try:
        open(d + "/{name}", "w").write("x")
    except OSError as e:
        print(d, e.errno)
try:
    with open("/tmp/fill", "wb") as f:
        for _ in range(64):
            f.write(b"x" * (1 << 20))
except OSError as e:
    print("fill", e.errno)
""", limits=SandboxLimits(cpu_seconds=2, wall_seconds=6, file_size_mb=128, disk_mb=8))
    assert not Path(f"/dev/shm/{name}").exists() and not Path(f"/tmp/{name}").exists()
    assert "fill 28" in r.stdout  # ENOSPC: its /tmp is an 8 MB tmpfs, not the host's disk


@needs_full
def test_threads_are_capped_and_the_host_is_unharmed():
    r = hostile("""
import threading, time
started = 0
try:
    for _ in range(10_000):
        threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
        started += 1
except (RuntimeError, OSError) as e:
    print("stopped at", started, type(e).__name__)
""", limits=SandboxLimits(cpu_seconds=2, wall_seconds=5, threads=16))
    assert "stopped at" in r.stdout and int(r.stdout.split()[2]) < 16


SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}")
SITE = next(p for p in sys.path if p.endswith("site-packages"))


def readable_by_others(*paths) -> bool:
    """Whether another user can reach ``paths``: every folder on the way open to others (a checkout
    in a ``mktemp -d`` folder, mode 700, is not)."""
    for path in paths:
        for folder in [Path(path).resolve(), *Path(path).resolve().parents]:
            if folder.is_dir() and not folder.stat().st_mode & 0o001:  # others may not pass through
                return False
    return True


@needs_full
@pytest.mark.skipif(os.geteuid() != 0 or not SYSTEM_PYTHON.exists() or not Path("/usr/bin/setpriv").exists(),
                    reason="needs root (to become another user), setpriv and a system Python of this version")
@pytest.mark.skipif(not readable_by_others(Path(__file__).parents[1], SITE),
                    reason="the checkout or its site-packages is not readable by other users, so user 65534 "
                    "cannot import selftrain from it")
def test_an_unprivileged_caller_gets_full_isolation_too():
    """Not every user runs selftrain as root: then bwrap makes the user namespace itself, and the
    zygote shares the program's user, so the read-only root and /dev matter."""
    program = HOOK_OFF + """
import os
print(os.getuid())
for path in ("/x", "/dev/x", "/sandbox/x", "/usr/x"):
    try:
        open(path, "w")
        print("wrote", path)
    except OSError:
        pass
os.fork()
"""
    code = ("import sys\nfrom selftrain.sandbox import run_python\n"
            "r = run_python(sys.stdin.read())\n"
            "print(r.isolation, r.stdout.strip(), r.ok)")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": f"{Path(__file__).resolve().parents[1]}:{SITE}"}
    out = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          str(SYSTEM_PYTHON), "-c", code], env=env, input=program, capture_output=True, text=True,
                         timeout=60, cwd="/tmp")
    assert out.stdout.split() == ["full", "65534", "False"], (out.stdout, out.stderr)


def test_infinite_loop_is_stopped_by_the_cpu_limit():
    r = run("while True:\n    pass", limits=FAST)
    assert not r.ok and r.seconds < 3 and ("SIGXCPU" in r.error or "SIGKILL" in r.error or r.timed_out)


def test_sleeping_forever_is_stopped_by_the_wall_clock():
    r = run("import time\ntime.sleep(60)", limits=SandboxLimits(wall_seconds=1))
    assert r.timed_out and not r.ok and r.seconds < 3


def test_huge_allocation_fails_inside_the_child():
    r = run("x = bytearray(8 * 1024**3)", limits=SandboxLimits(memory_mb=256))
    assert not r.ok and "MemoryError" in r.error


def test_huge_output_is_capped():
    r = run(HOOK_OFF + "import sys\nfor _ in range(200):\n    sys.stdout.write('x' * (1 << 20))",
            limits=SandboxLimits(file_size_mb=1, output_chars=1000))
    assert not r.ok and r.output_truncated and len(r.stdout) == 1000


def test_fork_bomb_and_subprocess_are_refused():
    r = run("import os\nwhile True:\n    os.fork()", limits=FAST)
    assert not r.ok and ("not allowed" in r.error or "not permitted" in r.error)
    r = run("import subprocess\nsubprocess.run(['sleep', '30'])", limits=FAST)
    assert not r.ok and r.seconds < 3


def test_without_namespaces_rlimits_and_the_hook_still_apply(monkeypatch, tmp_path):
    """The fallback level (no bwrap): weaker, reported as such, and refused unless allowed."""
    import selftrain.sandbox as sb

    monkeypatch.setattr(sb, "isolation_available", lambda: "none")
    r = run_python("import os\nopen('mine.txt', 'w').write('x')\nprint(os.listdir('.'))", min_isolation="none")
    assert r.ok and r.isolation == "none" and "mine.txt" in r.stdout
    victim = tmp_path / "victim"
    r = run_python(f"open({str(victim)!r}, 'w').write('x')", min_isolation="none")
    assert not r.ok and "outside the working directory" in r.error and not victim.exists()
    r = run_python("while True:\n    pass", limits=FAST, min_isolation="none")
    assert not r.ok and r.seconds < 3
    # the hook is no wall (it can be switched off), but a root caller's program is still not root,
    # and what it leaves running is ended when it returns
    r = run_python(HOOK_OFF + "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n"
                   "    time.sleep(30)\n    os._exit(0)\nprint(os.getuid(), pid)", limits=FAST, min_isolation="none")
    uid, orphan = map(int, r.stdout.split())
    assert uid == (65534 if os.geteuid() == 0 and sb._others_can_run_python() else os.geteuid())
    time.sleep(0.2)
    assert not Path(f"/proc/{orphan}").exists() or b"State:\tZ" in _reads(Path(f"/proc/{orphan}/status"))


def test_below_min_isolation_is_refused_with_how_to_allow(monkeypatch):
    import selftrain.sandbox as sb

    monkeypatch.setattr(sb, "isolation_available", lambda: "none")
    with pytest.raises(SandboxUnavailable, match="min_isolation"):
        run_python("print(1)")
    assert require_isolation("none") == "none"


@needs_full
def test_killing_the_parent_kills_the_sandbox():
    """A run killed mid-execution leaves no sandboxed process behind (bwrap --die-with-parent)."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
              "from selftrain.sandbox import run_python, SandboxLimits\n"
              "print('started', flush=True)\n"
              "run_python('import time\\ntime.sleep(30)', limits=SandboxLimits(wall_seconds=60))\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    parent.stdout.readline()
    deadline = time.time() + 10
    sandboxed = set()
    while time.time() < deadline and len(sandboxed) < 2:  # the server and the program it forked
        time.sleep(0.1)
        sandboxed = {pid for pid in _descendants(parent.pid)
                     if b"/sandbox/inside.py" in _reads(Path(f"/proc/{pid}/cmdline"))}
    assert len(sandboxed) >= 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    time.sleep(1)
    alive = [pid for pid in sandboxed if b"State:\tZ" not in _reads(Path(f"/proc/{pid}/status"))
             and Path(f"/proc/{pid}").exists()]  # a zombie is dead, only not yet reaped by init
    assert not alive


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _reads(stat).rsplit(b")", 1)[-1].split()
        if fields:
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _reads(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_a_run_that_executes_model_code_refuses_to_start_below_min_isolation(monkeypatch, tmp_path):
    """The python task family runs model-written programs: without the isolation the config asks
    for, the run stops before anything is written, and says how to allow less."""
    import selftrain.sandbox as sb
    from selftrain.config import config_from_dict
    from selftrain.runner import Runner
    from tests.conftest import make_corpus, micro_config

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus())
    stages = [{"selfplay": {"env": "tasks", "family": "python", "max_steps": 1}}]
    monkeypatch.setattr(sb, "isolation_available", lambda: "namespaces")
    cfg = config_from_dict(micro_config(tmp_path / "run", corpus, stages))
    with pytest.raises(SandboxUnavailable, match="min_isolation: namespaces"):
        Runner(cfg).run()
    assert not (tmp_path / "run").exists()
