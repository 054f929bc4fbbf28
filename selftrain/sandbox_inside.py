"""The program that runs *inside* the sandbox (see ``selftrain.sandbox``); standard library only,
started as ``python -I -S sandbox_inside.py SETTINGS_JSON``.

It is a zygote: after set-up it waits on a socket for requests, and for each one forks a child
that runs one program. A request is only limits plus four open files made by the caller (code,
stdin, stdout, stderr): the zygote never reads a program's code, input or output, so a child,
which can read its whole memory, inherits nothing of any other program.

Each child becomes user 65534 (the zygote stays root with only CAP_SETUID, CAP_SETGID and CAP_KILL
when the caller is root, so no child can signal, trace or re-limit it), enters its own user, mount and
IPC namespaces, mounts a fresh size- and inode-capped tmpfs on /work and /tmp (gone when it
exits: nothing reaches the next program), drops every capability, sets the rlimits, loads the
strict seccomp filter and the audit hook, and runs the code.
"""

import ctypes
import json
import os
import resource
import select
import shutil
import signal
import socket
import sys
import time
import traceback  # imported here: a child may no longer read the standard library's folder

SETTINGS = json.loads(sys.argv[1])
NOBODY = SETTINGS["nobody"]
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x10000000, 0x00020000, 0x08000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
KEPT_FLAGS = 2 | 4 | 8 | 1024 | 2048 | 4096  # nosuid nodev noexec noatime nodiratime relatime: locked, so kept


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def fail(what: str) -> None:
    os.write(2, f"{SETTINGS['setup_failed']} {what} (errno {ctypes.get_errno()})\n".encode())
    os._exit(125)


def check(ok: bool, what: str) -> None:
    if not ok:
        fail(what)


def load_filter(bpf: bytes) -> bool:
    return libc.prctl(22, 2, ctypes.byref(Prog(len(bpf) // 8, bpf)), 0, 0) == 0  # PR_SET_SECCOMP, FILTER


def read_filter(path):
    try:  # read while still root: the control files are not the sandbox user's
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        fail(f"cannot read {path}: {e}")


# ---------------------------------------------------------------------------- the child


def become_nobody() -> None:
    """The real user 65534, outside the sandbox too (when the caller is root; else it is the caller)."""
    if SETTINGS["drop"]:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)


def isolate(limits: dict) -> None:
    """User 65534 in user, mount, IPC and network namespaces of its own; the sandbox's root and
    /dev read-only; fresh tmpfs on /work, /tmp, /dev/shm and /dev/pts; no capability left."""
    become_nobody()
    check(libc.prctl(4, 1, 0, 0, 0) == 0, "prctl(PR_SET_DUMPABLE)")  # so that uid_map is ours to write
    net = 0 if SETTINGS["allow_net"] else CLONE_NEWNET  # its own: no socket name outlives it for the next
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWIPC | net) == 0, "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{NOBODY} {NOBODY} 1"),
                       ("gid_map", f"{NOBODY} {NOBODY} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0, "mount --make-rprivate /")
    for target in ("/", "/dev"):  # bwrap made them; when the caller is not root they are the zygote's user's
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | (os.statvfs(target).f_flag & KEPT_FLAGS)
        check(libc.mount(None, target.encode(), None, flags, None) == 0, f"remount {target} read-only")
    options = f"size={limits['disk_mb']}m,nr_inodes={limits['disk_inodes']},mode=0700".encode()
    for target, opts in ((b"/work", options), (b"/tmp", options), (b"/dev/shm", b"size=1m,nr_inodes=16,mode=0700"),
                         (b"/dev/pts", b"size=0,nr_inodes=1,mode=0500")):  # no terminal to leave data in
        check(libc.mount(b"tmpfs", target, b"tmpfs", MS_NOSUID | MS_NODEV, opts) == 0, f"mount tmpfs {target}")
    # the new user namespace gave every capability inside it: give them all back
    check(libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), (CapData * 2)()) == 0, "capset")
    # not dumpable: no other process of user 65534 on the host may read its memory (its own /proc stays its)
    check(libc.prctl(4, 0, 0, 0, 0) == 0, "prctl(PR_SET_DUMPABLE, 0)")


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


def child(limits: dict, fds: list[int], run_dir: str | None, child_bpf: bytes | None) -> None:
    """In the forked child: never returns."""
    code = 1
    try:
        os.setsid()
        code_fd, *stdio = fds
        source = b""
        while chunk := os.read(code_fd, 1 << 16):
            source += chunk
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[1])  # the zygote's socket: out of reach
        if run_dir is None:
            isolate(limits)
            run_dir, roots = "/work", ("/work", "/tmp")
        else:  # isolation "none": a host folder made for this program alone, and never root
            become_nobody()
            roots = (os.path.realpath(run_dir),)
        os.chdir(run_dir)
        mb = 1024 * 1024
        for res, value in ((resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1)),
                           (resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2),
                           (resource.RLIMIT_FSIZE, (int(limits["file_size_mb"] * mb),) * 2),
                           (resource.RLIMIT_NOFILE, (limits["open_files"],) * 2),
                           (resource.RLIMIT_NPROC, (limits["threads"],) * 2),
                           (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, value)
        check(child_bpf is None or load_filter(child_bpf), "seccomp filter not loaded")
        sys.stdin, sys.stdout, sys.stderr = (open(0, closefd=False), open(1, "w", closefd=False),
                                             open(2, "w", closefd=False))
        install_audit_hook(roots, SETTINGS["allow_net"])
        compiled = compile(source.decode("utf-8", errors="replace"), "solution.py", "exec")
        del source
        try:
            exec(compiled, {"__name__": "__main__", "__builtins__": __builtins__})
            if "threading" in sys.modules:  # as at a normal interpreter exit: wait for non-daemon threads
                sys.modules["threading"]._shutdown()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException as e:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's first frame
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as e:  # the set-up failed, or flushing the output did
        try:
            os.write(2, f"\n{type(e).__name__}: {e}\n".encode(errors="replace"))
        except OSError:
            pass
    os._exit(code & 0xFF)


# ---------------------------------------------------------------------------- the zygote


def setup() -> bytes | None:
    zygote_bpf = read_filter(SETTINGS["zygote_filter"]) if SETTINGS["zygote_filter"] else None
    child_bpf = read_filter(SETTINGS["child_filter"]) if SETTINGS["child_filter"] else None
    check(libc.prctl(38, 1, 0, 0, 0) == 0, "prctl(PR_SET_NO_NEW_PRIVS)")  # bwrap set it already; be sure
    check(zygote_bpf is None or load_filter(zygote_bpf), "seccomp filter not loaded")
    check(libc.prctl(4, 0, 0, 0, 0) == 0, "prctl(PR_SET_DUMPABLE, 0)")  # no child reaches our /proc or memory
    if not SETTINGS["isolate"]:  # no PID namespace: orphans of a program come to us, to be ended
        check(libc.prctl(36, 1, 0, 0, 0) == 0, "prctl(PR_SET_CHILD_SUBREAPER)")
    return child_bpf


def end_leftovers() -> None:
    """Without a PID namespace: kill whatever a program left running (our children, as subreaper)."""
    for _ in range(100):
        try:
            pids = [int(p) for task in os.listdir("/proc/self/task")
                    for p in open(f"/proc/self/task/{task}/children").read().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def serve(child_bpf: bytes | None) -> None:
    sock = socket.socket(fileno=SETTINGS["socket"])
    sock.send(json.dumps({"ready": True, "uid": NOBODY if SETTINGS["drop"] else os.getuid()}).encode())
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 4)
        except OSError:
            return
        if not message:  # the caller is gone
            return
        limits = json.loads(message)
        run_dir = None if SETTINGS["isolate"] else os.path.join(SETTINGS["work"], f"run-{time.monotonic_ns()}")
        if run_dir:
            os.mkdir(run_dir, 0o700)
            if SETTINGS["drop"]:
                os.chown(run_dir, NOBODY, NOBODY)
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            child(limits, fds, run_dir, child_bpf)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        timed_out = not select.select([pidfd], [], [], limits["wall_seconds"])[0]
        if timed_out:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended just now
                pass
        _, status = os.waitpid(pid, 0)
        os.close(pidfd)
        seconds = time.perf_counter() - start
        if run_dir:
            end_leftovers()
            shutil.rmtree(run_dir, ignore_errors=True)
        elif os.getpid() == 2:  # in bwrap's PID namespace (1 is its init): end anything the program left
            try:  # running (only possible without seccomp); -1 spares us and init
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        sock.send(json.dumps({"returncode": rc, "timed_out": timed_out, "seconds": round(seconds, 4)}).encode())


if __name__ == "__main__":
    serve(setup())
