"""The program that runs *inside* the sandbox (see ``selftrain.sandbox``); standard library only,
started as ``python -I -S sandbox_inside.py SETTINGS_JSON``.

It drops to the unprivileged user, enters a user namespace of its own, gives up every
capability, and then serves: for each request (one JSON line on stdin) it forks a child that
loads the strict seccomp filter, sets the rlimits, installs the audit hook and runs the code;
the child's stdin/stdout/stderr are anonymous memory files the server alone can name. The
reply (one JSON line on stdout) carries the exit status and the captured output. Forking from a
warm interpreter costs a few milliseconds, where a fresh sandbox and interpreter cost ~50.
A child cannot touch the server: it cannot signal, trace or re-limit it (seccomp), and the
server is not dumpable, so its /proc files and memory are closed to a process of the same user.
"""

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import sys
import time

SETTINGS = json.loads(sys.argv[1])
NOBODY = SETTINGS["nobody"]
libc = ctypes.CDLL(None, use_errno=True)


def fail(what: str) -> None:
    os.write(2, f"{SETTINGS['setup_failed']} {what} (errno {ctypes.get_errno()})\n".encode())
    os._exit(125)


def read_filter(path):
    try:  # read while still root: the control files are not the sandbox user's
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e}")


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def load_filter(bpf: bytes) -> bool:
    return libc.prctl(22, 2, ctypes.byref(Prog(len(bpf) // 8, bpf)), 0, 0) == 0  # PR_SET_SECCOMP, FILTER


def become_nobody() -> None:
    """Root with only CAP_SETUID/CAP_SETGID (bwrap's doing) -> user 65534 in a user namespace of
    its own, outside the sandbox too, with no capability left anywhere."""
    try:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    except OSError as e:
        fail(f"cannot become user {NOBODY}: {e}")
    if libc.prctl(4, 1, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, so that /proc/self/uid_map is ours to write
        fail("prctl(PR_SET_DUMPABLE)")
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        fail("no user namespace")
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{NOBODY} {NOBODY} 1"),
                           ("gid_map", f"{NOBODY} {NOBODY} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError as e:
        fail(f"cannot map user {NOBODY}: {e}")
    # the new user namespace gave every capability inside it: give them all back
    if libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), (CapData * 2)()) != 0:
        fail("capset")


def setup() -> bytes | None:
    server_bpf = read_filter(SETTINGS["server_filter"]) if SETTINGS["server_filter"] else None
    child_bpf = read_filter(SETTINGS["child_filter"]) if SETTINGS["child_filter"] else None
    if SETTINGS["drop"]:
        become_nobody()
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS (bwrap set it already; be sure)
        fail("prctl(PR_SET_NO_NEW_PRIVS)")
    if server_bpf and not load_filter(server_bpf):
        fail("seccomp filter not loaded")
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # not dumpable: children (same user) can't reach our /proc or memory
        fail("prctl(PR_SET_DUMPABLE, 0)")
    return child_bpf


def install_audit_hook(roots: tuple[str, ...], allow_net: bool) -> None:
    """Second layer only (the kernel is the wall): it names the refused action in the error.
    Its state lives in this closure, not in globals the code could rewrite."""
    blocked = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                         "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "os.chroot"})
    network = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"})
    writes = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                        "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"})
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep

    def inside(path):
        try:
            p = realpath(fsdecode(path))
        except Exception:
            return False
        return any(p == r or p.startswith(r + sep) for r in roots)

    def hook(event, args):
        if event in blocked:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in network and not allow_net:
            raise PermissionError(f"sandbox: network access ({event}) is not allowed")
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            mode, flags = args[1] or "r", args[2] or 0
            if (any(c in str(mode) for c in "wax+") or flags & write_flags) and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory is not allowed")
        if event in writes and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    sys.addaudithook(hook)


def child(request: dict, run_dir: str, fds: tuple[int, int, int], child_bpf: bytes | None) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        os.setsid()
        os.chdir(run_dir)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 65536)  # the server's pipes and files are no longer reachable
        sys.stdin, sys.stdout, sys.stderr = (open(0, closefd=False), open(1, "w", closefd=False),
                                             open(2, "w", closefd=False))
        limits, mb = request["limits"], 1024 * 1024
        for res, value in ((resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1)),
                           (resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2),
                           (resource.RLIMIT_FSIZE, (int(limits["file_size_mb"] * mb),) * 2),
                           (resource.RLIMIT_NOFILE, (limits["open_files"],) * 2),
                           (resource.RLIMIT_NPROC, (limits["threads"],) * 2),
                           (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, value)
        if child_bpf and not load_filter(child_bpf):
            os.write(2, f"{SETTINGS['setup_failed']} child seccomp filter not loaded\n".encode())
            os._exit(125)
        install_audit_hook((os.path.realpath(run_dir), *SETTINGS["scratch"]), SETTINGS["allow_net"])
        source = compile(request["code"], "solution.py", "exec")
        try:
            exec(source, {"__name__": "__main__", "__builtins__": __builtins__})
            if "threading" in sys.modules:  # as at a normal interpreter exit: wait for non-daemon threads
                sys.modules["threading"]._shutdown()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException as e:
            import traceback

            traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's first frame
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as e:  # the set-up itself failed, or flushing output did
        try:
            os.write(2, f"\n{type(e).__name__}: {e}\n".encode(errors="replace"))
        except OSError:
            pass
    os._exit(code & 0xFF)


def memfile(name: str, content: bytes = b"") -> int:
    fd = os.memfd_create(name, 0)  # no path: only this server and the child hold it
    os.write(fd, content)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_capped(fd: int, chars: int) -> tuple[str, bool]:
    size = os.fstat(fd).st_size
    data = os.pread(fd, chars * 4 + 1, 0)
    text = data.decode("utf-8", errors="replace")
    return text[:chars], len(text) > chars or size > len(data)


def clean(folder: str) -> None:
    """Empty a folder the child wrote into, whatever modes it left (it owns its files)."""
    for entry in os.listdir(folder):
        path = os.path.join(folder, entry)
        for base, dirs, _ in os.walk(path):
            for d in dirs:
                try:
                    os.chmod(os.path.join(base, d), 0o700)
                except OSError:
                    pass
        try:
            os.chmod(path, 0o700)
        except OSError:
            pass
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) and not os.path.islink(path) else \
            _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def serve(child_bpf: bytes | None) -> None:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(os.open("/dev/null", os.O_WRONLY), 1)  # nothing but replies on the protocol pipe
    print(json.dumps({"ready": True, "uid": os.getuid()}), file=reply, flush=True)
    for n, line in enumerate(sys.stdin):
        request = json.loads(line)
        run_dir = os.path.join(SETTINGS["work"], f"run-{n}")
        os.mkdir(run_dir, 0o700)
        fds = (memfile("stdin", request["stdin"].encode()), memfile("stdout"), memfile("stderr"))
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            child(request, run_dir, fds, child_bpf)
        pidfd = os.pidfd_open(pid)
        timed_out = not select.select([pidfd], [], [], request["limits"]["wall_seconds"])[0]
        if timed_out:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        seconds = time.perf_counter() - start
        os.close(pidfd)
        chars = request["limits"]["output_chars"]
        (stdout, cut_out), (stderr, cut_err) = read_capped(fds[1], chars), read_capped(fds[2], chars)
        for fd in fds:
            os.close(fd)
        for folder in (run_dir, *SETTINGS["scratch"]):  # nothing a program leaves reaches the next one
            clean(folder)
        os.rmdir(run_dir)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": rc, "timed_out": timed_out, "seconds": round(seconds, 4),
                          "stdout": stdout, "stderr": stderr, "truncated": cut_out or cut_err}),
              file=reply, flush=True)


if __name__ == "__main__":
    serve(setup())
