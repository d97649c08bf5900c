"""The child side of fwm/envs/sandbox.py: jails itself, then runs one snippet of model-written code.

Run as a script, never imported by fwm (it must work under `python -I` with nothing but the stdlib):

  python -I -S sandbox_child.py jail CONFIG_JSON   # namespace mode, as root, pid 1 of fresh pid/net/mount
                                                   # namespaces: read-only mounts, then exec setpriv -> run
  python -I sandbox_child.py run CONFIG_JSON       # both modes: rlimits, audit hook, exec the snippet

CONFIG_JSON keys: workdir, snippet, mode ("namespace" | "audit"), cpu_s, memory_mb, max_processes,
max_file_mb, max_open_files, and for the jail phase: setpriv, uid, gid, grant_read_search, python.
"""
import json
import os
import re
import resource
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# Paths outside the working directory that ordinary libraries write to and that hold nothing.
_ALLOWED_WRITE_PATHS = ("/dev/null",)
# Events that change the filesystem at the path(s) given by their leading arguments.
_PATH_EVENTS = {
    "os.mkdir": 1, "os.rmdir": 1, "os.remove": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
    "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1, "os.chflags": 1, "os.lchflags": 1,
    "os.setxattr": 1, "os.removexattr": 1, "os.mkfifo": 1, "os.mknod": 1, "shutil.chown": 1,
}
_SPAWN_EVENTS = ("subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.forkpty",
                 "pty.spawn", "os.startfile")


def _jail(config: dict) -> None:
    """Namespace mode, phase 1 (root, pid 1): make every mount read-only but the workdir, drop to a uid."""
    import ctypes  # only here, before any model code exists in this process

    libc = ctypes.CDLL(None, use_errno=True)
    ms_rdonly, ms_remount, ms_bind, ms_relatime = 1, 32, 4096, 1 << 21
    keep_flags = 2 | 4 | 8 | 1024 | 2048  # nosuid, nodev, noexec, noatime, nodiratime (same bits in statvfs)
    ms_nosuid_nodev = 2 | 4

    def mount(source, target: str, flags: int, data: bytes | None = None) -> None:
        fstype = b"tmpfs" if source == b"tmpfs" else None
        if libc.mount(source, target.encode(), fstype, flags, data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sandbox jail: mount({target!r}) failed: {os.strerror(err)}")

    workdir = config["workdir"]
    mount(workdir.encode(), workdir, ms_bind)  # its own mount, so the read-only remounts skip it
    os.chdir(workdir)  # the inherited cwd still points into the old (soon read-only) mount
    writable = {workdir}
    if os.path.isdir("/dev/shm"):  # a private, bounded /dev/shm: multiprocessing's semaphores live there
        mount(b"tmpfs", "/dev/shm", ms_nosuid_nodev, f"size={config['max_file_mb']}m,mode=1777".encode())
        writable.add("/dev/shm")
    with open("/proc/self/mountinfo", "rb") as f:  # field 5 is the mount point, with octal escapes (\040)
        mount_points = [os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]),
                                           line.split()[4])) for line in f]
    for point in mount_points:
        if point in writable:
            continue
        st_flags = os.statvfs(point).f_flag  # fails closed: a mount we cannot inspect stops the jail
        flags = ms_remount | ms_bind | ms_rdonly | (st_flags & keep_flags)
        if st_flags & 4096:
            flags |= ms_relatime
        mount(None, point, flags)
    caps = "+dac_read_search" if config["grant_read_search"] else ""
    argv = [config["setpriv"], f"--reuid={config['uid']}", f"--regid={config['gid']}", "--clear-groups",
            f"--inh-caps=-all{',' + caps if caps else ''}", f"--ambient-caps=-all{',' + caps if caps else ''}",
            f"--bounding-set=-all{',' + caps if caps else ''}", "--no-new-privs", "--pdeathsig=KILL",
            "--", config["python"], "-I", os.path.abspath(__file__), "run", json.dumps(config)]
    os.execv(argv[0], argv)


def _set_limits(config: dict) -> None:
    cpu_s = int(config["cpu_s"])
    memory = int(config["memory_mb"]) << 20
    file_size = int(config["max_file_mb"]) << 20
    for limit, value in ((resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)), (resource.RLIMIT_AS, (memory, memory)),
                         (resource.RLIMIT_FSIZE, (file_size, file_size)),
                         (resource.RLIMIT_NOFILE, (config["max_open_files"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)
    if config["mode"] == "namespace":  # a fresh uid: the count is this sandbox's alone (root is exempt)
        resource.setrlimit(resource.RLIMIT_NPROC, (config["max_processes"],) * 2)


def _install_audit_hook(config: dict) -> None:
    """Python-level guard (both modes): no writes outside workdir, no sockets, no exec, no ctypes calls."""
    workdir = os.path.realpath(config["workdir"])
    allow_fork = config["mode"] == "namespace"
    own_pid = os.getpid
    realpath, isdir, fspath = os.path.realpath, os.path.isdir, os.fspath

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an already open descriptor
        resolved = realpath(fspath(path))
        return resolved == workdir or resolved.startswith(workdir + os.sep) or resolved in _ALLOWED_WRITE_PATHS

    def deny(what: str) -> None:
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if path is None:
                return
            writes = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags is not None and flags & _WRITE_FLAGS)
            if writes and not inside(path):
                deny(f"writing {path!r} (outside the working directory)")
            # os.open(dir) gives a dir_fd for relative writes that this hook cannot see.
            if mode is None and not isinstance(path, int) and not inside(path) and isdir(fspath(path)):
                deny(f"opening directory {path!r} with os.open")
        elif event in _PATH_EVENTS:
            for path in args[:_PATH_EVENTS[event]]:
                if path is not None and not inside(path):
                    deny(f"{event} on {path!r} (outside the working directory)")
        elif event.startswith("socket."):
            if event == "socket.__new__" and args[1] == 1:  # AF_UNIX: socketpair for multiprocessing
                return
            if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                         "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname"):
                deny(f"network access ({event})")
        elif event.startswith(_SPAWN_EVENTS):
            deny(f"starting programs ({event})")
        elif event == "os.fork" and not allow_fork:
            deny("forking in audit mode")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill") and not allow_fork:
            if args[0] != own_pid():
                deny(f"signalling process {args[0]}")
        elif event.startswith("ctypes."):
            if event == "ctypes.dlopen" and args[0] is None:
                return  # `import ctypes` itself (numpy imports it) opens the main program
            deny(f"native calls through ctypes ({event})")
        elif event == "import" and args[0] in ("_posixsubprocess",) and not allow_fork:
            deny("importing _posixsubprocess in audit mode")

    if not allow_fork:  # the only spawn path that raises no audit event of its own
        import _posixsubprocess

        def fork_exec_denied(*_args, **_kwargs):
            deny("starting programs (_posixsubprocess.fork_exec)")

        _posixsubprocess.fork_exec = fork_exec_denied
    sys.addaudithook(hook)


def _run(config: dict) -> None:
    """Phase 2 (both modes): limits, audit hook, then the snippet as __main__ with runner frames hidden."""
    _set_limits(config)
    with open(config["snippet"], encoding="utf-8") as f:
        source = f.read()
    _install_audit_hook(config)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        code = compile(source, "snippet.py", "exec")
        exec(code, namespace)
    except SystemExit:
        raise
    except BaseException as error:  # the snippet's own errors are its output, not the runner's
        import traceback

        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename != __file__]
        if frames:
            sys.stderr.write("Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)))
        sys.stderr.write("".join(traceback.format_exception_only(type(error), error)))
        sys.exit(1)


if __name__ == "__main__":
    phase, config_json = sys.argv[1], sys.argv[2]
    child_config = json.loads(config_json)
    if phase == "jail":
        _jail(child_config)
    else:
        _run(child_config)
