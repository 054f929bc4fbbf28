"""Run model-written Python in a subprocess that cannot hurt the machine or the run.

Kernel-enforced limits (``setrlimit``): CPU seconds, address space, size of any file written
(stdout and stderr go to files, so output is capped too), open files, processes, no core dumps. A wall-clock
timeout kills the whole process group. The working directory is a fresh temporary folder that is
removed afterwards. Where the kernel allows (Linux, root or unprivileged user namespaces) the
child gets its own empty network namespace: no interface but a down loopback. On top of that the
child runs under a Python audit hook, installed before the code and impossible to remove, which
refuses sockets, new processes (fork, exec, subprocess, os.system) and writes outside its folder.

    result = run_python("print(sum(range(10)))", limits=SandboxLimits(cpu_seconds=1))
    result.ok, result.stdout  # (True, "45\\n")
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 2  # RLIMIT_CPU: SIGXCPU, then SIGKILL
    wall_seconds: float = 5.0  # the process group is killed after this
    memory_mb: int = 512  # RLIMIT_AS: allocations beyond it raise MemoryError
    file_size_mb: float = 1.0  # RLIMIT_FSIZE: no file (stdout/stderr included) grows past it
    open_files: int = 64  # RLIMIT_NOFILE
    output_chars: int = 20_000  # stdout/stderr returned at most
    network: bool = False  # False: own network namespace where possible, and sockets refused


@dataclass
class SandboxResult:
    ok: bool  # exited 0 within every limit
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    seconds: float
    output_truncated: bool
    network_isolated: bool  # whether a separate network namespace was obtained

    @property
    def error(self) -> str:
        """A one-line reason for failure (empty when ok)."""
        if self.ok:
            return ""
        if self.timed_out:
            return "timed out"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        last = self.stderr.strip().splitlines()
        return last[-1] if last else f"exit code {self.returncode}"


# Runs first in the child: the audit hook sees every open, socket, fork and exec from then on.
BOOTSTRAP = r'''
import os, sys
_root = os.path.realpath(os.getcwd())
_allow_net = {allow_net}
_BLOCKED = {{"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "ctypes.cdata", "os.chdir", "os.chroot"}}
_NET = {{"socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo", "socket.__new__"}}
_WRITE = {{"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
          "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}}
def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except Exception:
        return False
    return p == _root or p.startswith(_root + os.sep)
def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError(f"sandbox: {{event}} is not allowed")
    if event in _NET and not _allow_net:
        raise PermissionError(f"sandbox: network access ({{event}}) is not allowed")
    if event == "open" and args and not isinstance(args[0], int):
        mode, flags = args[1] or "r", args[2] or 0
        writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        if writes and not _inside(args[0]):
            raise PermissionError(f"sandbox: writing {{args[0]!r}} outside the working directory is not allowed")
    if event in _WRITE and args and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"sandbox: {{event}} outside the working directory is not allowed")
sys.addaudithook(_hook)
del _hook
_src = open("solution.py", encoding="utf-8").read()
exec(compile(_src, "solution.py", "exec"), {{"__name__": "__main__"}})
'''


def _limit(limits: SandboxLimits, isolate_net: list[bool]):
    def apply() -> None:  # runs in the child between fork and exec
        os.setsid()  # its own process group, so a timeout kills everything it started
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        size = int(limits.file_size_mb * mb)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # no new processes or threads (the kernel ignores this for root: the audit hook covers that case)
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        if isolate_net[0]:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0 and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
                os.write(2, b"sandbox-note: no network namespace; relying on the audit hook\n")
    return apply


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Execute ``code`` as a script under ``limits``; never raises for anything the code does."""
    limits = limits or SandboxLimits()
    isolate = [not limits.network and sys.platform.startswith("linux")]
    with tempfile.TemporaryDirectory(prefix="selftrain-sandbox-") as work:
        work_dir = Path(work)
        (work_dir / "solution.py").write_text(code, encoding="utf-8")
        (work_dir / "stdin.txt").write_text(stdin, encoding="utf-8")
        bootstrap = BOOTSTRAP.format(allow_net=limits.network)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0"}
        start = time.perf_counter()
        with open(work_dir / "stdin.txt", "rb") as fin, open(work_dir / ".stdout", "wb") as fout, \
                open(work_dir / ".stderr", "wb") as ferr:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", bootstrap], cwd=work, env=env, stdin=fin,
                                    stdout=fout, stderr=ferr, preexec_fn=_limit(limits, isolate), close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the group: anything it left running too
                except ProcessLookupError:
                    pass
                proc.wait()
        seconds = time.perf_counter() - start
        stdout, cut_out = _read_capped(work_dir / ".stdout", limits.output_chars)
        stderr, cut_err = _read_capped(work_dir / ".stderr", limits.output_chars)
    isolated = isolate[0] and "sandbox-note: no network namespace" not in stderr
    stderr = "\n".join(line for line in stderr.splitlines() if not line.startswith("sandbox-note:"))
    code_rc = proc.returncode
    return SandboxResult(ok=code_rc == 0 and not timed_out, stdout=stdout, stderr=stderr, returncode=code_rc,
                         timed_out=timed_out, seconds=round(seconds, 3), output_truncated=cut_out or cut_err,
                         network_isolated=isolated)


def _read_capped(path: Path, chars: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(chars * 4 + 1)
    text = data.decode("utf-8", errors="replace")
    return text[:chars], len(text) > chars or path.stat().st_size > len(data)
