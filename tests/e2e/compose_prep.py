"""What the compose test (tests/e2e/test_compose.py) needs before it can start a cluster, made in
a process of its own so that it overlaps the rest of the suite (tests/e2e/conftest.py starts it
when the session collects the compose test):

1. Docker: the ``docker`` CLI, Compose (``docker compose`` or ``docker-compose``) and a daemon
   that answers. Where they are missing and this is root with ``apt-get``, it installs
   ``docker.io docker-compose debootstrap`` (Debian's packages; ``DML_COMPOSE_INSTALL=0`` says
   never), and where no daemon answers it starts ``dockerd`` (log: CACHE/dockerd.log);
2. the base image and the wheelhouse, through ``scripts/docker_base.sh --no-link``: both are
   kept between runs, the image in Docker, the wheelhouse in ``~/.cache/dml/wheels`` (outside the
   clone, keyed by the dependencies and the Python version), so a fresh clone reuses them;
3. the dml image, ``dml-test:<key>``: built from a context made of exactly the tree's files (git's
   tracked and untracked-but-not-ignored ones, less what .dockerignore leaves out) and that
   wheelhouse, sent as a tar on stdin, so nothing is written into the clone; the key hashes that
   context and the base image's id, so an unchanged tree reuses its image outright.

It writes one JSON object to the result file: ``{"ok": true, "image", "base_image", "compose",
"started_dockerd", "seconds": {step: s}}``, or ``{"ok": false, "skip": reason}`` when this machine
cannot run the test (no Docker and no way to install it, not root, a daemon that will not
start, no mirror or package index), or ``{"ok": false, "error": message}`` when something of ours
is broken (the image does not build). Standard library only; every command has a deadline and
the whole run one too (``--deadline-s``). It runs at the lowest CPU and I/O priority, so that the
tests it overlaps keep the machine. ``DML_COMPOSE_TEST=0`` turns the compose test off.

Usage: python tests/e2e/compose_prep.py --result FILE [--deadline-s S]
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import IO, Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = pathlib.Path(os.environ.get("DML_CACHE_DIR") or pathlib.Path(os.environ.get("XDG_CACHE_HOME") or
                                                                      pathlib.Path.home() / ".cache") / "dml")
BASE_IMAGE = os.environ.get("DML_BASE_IMAGE", "dml-base:bookworm")
IMAGE_REPO = "dml-test"
KEEP_IMAGES = 3  # dml-test images kept (newest first); older ones are removed when unused
APT_PACKAGES = ["docker.io", "docker-compose", "debootstrap"]
MTIME = 1577836800  # every file of the build context: 2020-01-01 (zip, and so wheels, need >= 1980)
DEFAULT_DEADLINE_S = 1800.0
PID_FILE: pathlib.Path | None = None  # where main() records the pid of a dockerd it starts


class Unavailable(Exception):
    """This machine cannot run the compose test: the test skips, saying why."""


class Broken(Exception):
    """Something of ours does not work (the image does not build): the test fails."""


def log(msg: str) -> None:
    """A progress line on stderr (the prep log), with the time."""
    print(f"{time.strftime('%H:%M:%S')} compose-prep: {msg}", file=sys.stderr, flush=True)


class Prep:
    """One run: the deadline, what it did and how long each step took."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline = time.monotonic() + deadline_s
        self.seconds: dict[str, float] = {}
        self.started_dockerd: int | None = None

    def left(self, cap: float) -> float:
        """Seconds a command may take: ``cap``, or what is left of the run's deadline."""
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise Unavailable("the preparation ran out of time (its --deadline-s)")
        return min(cap, left)

    def run(self, cmd: list[str], cap: float, stdin: Any = None, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Runs ``cmd`` with a deadline, capturing its output as text."""
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=self.left(cap), stdin=stdin, **kw)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`{' '.join(cmd[:3])}` took longer than {cap:.0f} s") from None

    def timed(self, step: str, t0: float) -> None:
        self.seconds[step] = round(time.monotonic() - t0, 1)
        log(f"{step}: {self.seconds[step]} s")


# -- Docker ---------------------------------------------------------------------------------------
def compose_command(p: Prep) -> list[str] | None:
    """``docker compose`` (v2) when the CLI has the plugin, else ``docker-compose``, else None."""
    if shutil.which("docker") and p.run(["docker", "compose", "version"], 30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def daemon_answers(p: Prep) -> bool:
    return p.run(["docker", "info", "--format", "{{.ServerVersion}}"], 30).returncode == 0


def install_docker(p: Prep, missing: list[str]) -> None:
    """apt-get install of Docker, Compose and debootstrap, or Unavailable saying why not."""
    if os.environ.get("DML_COMPOSE_INSTALL", "1") == "0":
        raise Unavailable(f"{' and '.join(missing)} not found on PATH (and DML_COMPOSE_INSTALL=0: not installing)")
    if os.geteuid() != 0:
        raise Unavailable(f"{' and '.join(missing)} not found on PATH, and installing needs root")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{' and '.join(missing)} not found on PATH, and no apt-get to install them with")
    t0 = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    log(f"installing {' '.join(APT_PACKAGES)} (apt-get)")
    res = p.run(cmd, 900, env=env)
    if res.returncode != 0:  # stale package lists on a fresh machine: refresh them once
        log("apt-get install failed; apt-get update, then again")
        p.run(["apt-get", "update", "-q"], 600, env=env)
        res = p.run(cmd, 900, env=env)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise Unavailable(f"cannot install {' '.join(APT_PACKAGES)} with apt-get: {' / '.join(tail)}")
    p.timed("apt-get install", t0)


def start_dockerd(p: Prep) -> None:
    """Starts dockerd in a session of its own (it outlives this process; the conftest stops the one
    it started), at normal priority, logging to CACHE/dockerd.log; waits until it answers."""
    if os.geteuid() != 0:
        raise Unavailable("no Docker daemon answers, and starting dockerd needs root")
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise Unavailable("no Docker daemon answers, and there is no dockerd to start")
    t0 = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    logfile = CACHE / "dockerd.log"
    log(f"starting dockerd (log: {logfile})")
    with open(logfile, "ab") as out:
        # Back to priority 0: this process runs at 19, and the containers would inherit it.
        proc = subprocess.Popen(["nice", "-n", str(-os.nice(0)), dockerd], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    while time.monotonic() < t0 + 60:
        if proc.poll() is not None:
            raise Unavailable(f"dockerd exited ({proc.returncode}): {_tail(logfile)}")
        if daemon_answers(p):
            p.started_dockerd = proc.pid
            if PID_FILE is not None:  # known to the session even if this process is killed before its result
                PID_FILE.write_text(str(proc.pid))
            p.timed("dockerd start", t0)
            return
        time.sleep(0.5)
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    raise Unavailable(f"dockerd did not answer within 60 s: {_tail(logfile)}")


def _tail(path: pathlib.Path, n: int = 3) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-n:])
    except OSError:
        return "(no log)"


def ensure_docker(p: Prep) -> list[str]:
    """Docker, Compose and a daemon, installed and started where needed; returns the compose argv."""
    if os.environ.get("DML_COMPOSE_TEST", "1") == "0":
        raise Unavailable("DML_COMPOSE_TEST=0: the compose test is off")
    if not sys.platform.startswith("linux"):
        raise Unavailable(f"needs Linux (Docker's bridge networks), this is {sys.platform}")
    compose = compose_command(p) if shutil.which("docker") else None
    if compose is not None and daemon_answers(p):
        return compose  # a daemon (perhaps DOCKER_HOST's) and Compose: nothing to install or start
    missing = [n for n in ("docker", "dockerd") if shutil.which(n) is None]
    if compose is None:
        missing.append("docker compose (or docker-compose)")
    if missing:
        install_docker(p, missing)
        compose = compose_command(p)
        if compose is None or shutil.which("docker") is None:
            raise Unavailable("Docker was installed but docker or docker-compose is still not on PATH")
    if not daemon_answers(p):
        start_dockerd(p)
    return compose


# -- the images -----------------------------------------------------------------------------------
def base_and_wheels(p: Prep) -> pathlib.Path:
    """The base image and the wheelhouse (scripts/docker_base.sh, which reuses both); returns the
    wheelhouse's folder."""
    t0 = time.monotonic()
    if shutil.which("debootstrap") is None and p.run(["docker", "image", "inspect", BASE_IMAGE], 30).returncode != 0:
        install_docker(p, ["debootstrap"])
    env = {**os.environ, "DML_BASE_IMAGE": BASE_IMAGE, "DML_WHEEL_CACHE": str(CACHE / "wheels"),
           "PYTHON": os.environ.get("PYTHON", "python3")}
    res = p.run(["bash", str(ROOT / "scripts" / "docker_base.sh"), "--no-link"], 1500, env=env, cwd=ROOT)
    sys.stderr.write(res.stderr)
    if res.returncode != 0:
        last = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("docker_base:")][-1:] or ["(no message)"]
        raise Unavailable(f"scripts/docker_base.sh failed: {last[0]}")
    wheels = pathlib.Path(res.stdout.strip().splitlines()[-1])
    if not (wheels / ".complete").is_file():
        raise Broken(f"scripts/docker_base.sh named {wheels}, which is no complete wheelhouse")
    p.timed("base image + wheelhouse", t0)
    return wheels


def dockerignore(root: pathlib.Path) -> list[str]:
    path = root / ".dockerignore"
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _glob_re(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: ``*`` and ``?`` stay within one path element,
    ``**`` spans any number of them (``**/`` none too)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's ``patterns`` leave ``rel`` (a path inside the context) out: the last
    pattern matching the path or one of its parent folders wins; ``!`` re-includes."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for pat in patterns:
        neg = pat.startswith("!")
        rx = _glob_re(pat.lstrip("!").strip("/"))
        if any(rx.match(pre) for pre in prefixes):
            out = not neg
    return out


def context_files(root: pathlib.Path) -> list[str]:
    """The tree's files that go into the image, sorted: git's tracked and untracked-but-not-ignored
    files (or, outside a git checkout, every file), less what .dockerignore leaves out, less
    ./wheels (the wheelhouse comes from the cache)."""
    if (root / ".git").exists() and shutil.which("git"):
        res = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, timeout=60, check=True)
        names = [n for n in res.stdout.decode().split("\0") if n]
    else:
        names = [str(f.relative_to(root)) for f in root.rglob("*") if f.is_file() or f.is_symlink()]
    patterns = dockerignore(root) + ["wheels", ".git"]
    return sorted(n for n in names if (root / n).is_file() and not ignored(n, patterns))


def context_key(root: pathlib.Path, files: list[str], wheels: pathlib.Path, base_id: str) -> str:
    """What the image is built from, hashed: each file's path, mode and bytes, the wheelhouse's
    name (its own key) and the base image's id."""
    h = hashlib.sha256(f"{base_id}\0{wheels.name}\0".encode())
    for name in files:
        path = root / name
        h.update(f"{name}\0{os.access(path, os.X_OK)}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _add(tar: tarfile.TarFile, path: pathlib.Path, arcname: str) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = path.stat().st_size
    info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
    info.mtime = MTIME
    with open(path, "rb") as f:
        tar.addfile(info, f)


def write_context(out: IO[bytes], root: pathlib.Path, files: list[str], wheels: pathlib.Path) -> None:
    """The build context as a tar stream: ``files`` of ``root`` and the wheelhouse as ./wheels."""
    with tarfile.open(fileobj=out, mode="w|") as tar:
        for name in files:
            _add(tar, root / name, name)
        for whl in sorted(wheels.glob("*.whl")):
            _add(tar, whl, f"wheels/{whl.name}")


def image_exists(p: Prep, ref: str) -> bool:
    return p.run(["docker", "image", "inspect", ref], 30).returncode == 0


def build_image(p: Prep, wheels: pathlib.Path) -> str:
    """The dml image of this tree on the base image, built unless one of the same key exists."""
    t0 = time.monotonic()
    base_id = p.run(["docker", "image", "inspect", "-f", "{{.Id}}", BASE_IMAGE], 30).stdout.strip()
    files = context_files(ROOT)
    tag = f"{IMAGE_REPO}:{context_key(ROOT, files, wheels, base_id)}"
    if image_exists(p, tag):
        log(f"reusing {tag}")
        p.timed("dml image", t0)
        return tag
    log(f"building {tag} ({len(files)} files + {wheels})")
    cmd = ["docker", "build", "--force-rm", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", tag, "-"]
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        out = io.BytesIO()
        reader = threading.Thread(target=lambda: out.write(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            try:
                write_context(proc.stdin, ROOT, files, wheels)  # type: ignore[arg-type]
            except BrokenPipeError:
                pass  # docker build stopped reading: its output says why
            finally:
                proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(p.left(1200))
        except (subprocess.TimeoutExpired, Unavailable):
            proc.kill()
            proc.wait(30)
            raise Unavailable("docker build took longer than its deadline") from None
        reader.join(30)
    text = out.getvalue().decode(errors="replace")
    sys.stderr.write(text)
    if proc.returncode != 0:
        raise Broken(f"docker build of the Dockerfile on {BASE_IMAGE} failed: {' / '.join(text.strip().splitlines()[-4:])}")
    p.timed("dml image", t0)
    return tag


def prune_images(p: Prep, keep: str) -> None:
    """Removes all but the newest KEEP_IMAGES dml-test images (never ``keep``; an image a container
    still uses is refused by docker and stays)."""
    res = p.run(["docker", "images", IMAGE_REPO, "--format", "{{.Repository}}:{{.Tag}}"], 30)
    tags = [t for t in res.stdout.split() if t != keep]  # newest first
    for tag in tags[KEEP_IMAGES - 1:]:
        p.run(["docker", "rmi", tag], 60)


def prepare(deadline_s: float) -> dict[str, Any]:
    """Everything, as the result object (see the module's docstring)."""
    try:
        os.nice(19 - os.nice(0))
        if shutil.which("ionice"):
            subprocess.run(["ionice", "-c", "3", "-p", str(os.getpid())], capture_output=True, timeout=10)
    except OSError:
        pass
    p = Prep(deadline_s)
    t0 = time.monotonic()
    try:
        compose = ensure_docker(p)
        wheels = base_and_wheels(p)
        image = build_image(p, wheels)
    except Unavailable as e:
        log(f"unavailable: {e}")
        return {"ok": False, "skip": str(e), "started_dockerd": p.started_dockerd, "seconds": p.seconds}
    except Broken as e:
        log(f"broken: {e}")
        return {"ok": False, "error": str(e), "started_dockerd": p.started_dockerd, "seconds": p.seconds}
    p.timed("total", t0)
    return {"ok": True, "image": image, "base_image": BASE_IMAGE, "compose": compose,
            "started_dockerd": p.started_dockerd, "seconds": p.seconds}


# -- from the test session -------------------------------------------------------------------------
class Background:
    """The preparation as a child process of the test session: started once, waited for with a
    deadline, stopped at the session's end (its whole process group), and, when it was the one
    to start dockerd, that dockerd stopped too unless another session still uses Docker.

    Each session holds a shared lock on CACHE/docker.lock from the start of its preparation to
    its end; the dockerd a session started is stopped only if that session can then take the lock
    exclusively (no other session is between its start and end)."""

    def __init__(self, deadline_s: float = DEFAULT_DEADLINE_S) -> None:
        self.deadline_s = deadline_s
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="dml-compose-prep-"))
        self.result_path = self.dir / "result.json"
        self.log_path = self.dir / "prep.log"
        self.started = time.monotonic()
        self.result: dict[str, Any] | None = None
        CACHE.mkdir(parents=True, exist_ok=True)
        self._lock = open(CACHE / "docker.lock", "a+")
        fcntl.flock(self._lock, fcntl.LOCK_SH)  # released at close(); nobody holds it exclusively long
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(pathlib.Path(__file__).resolve()), "--result", str(self.result_path),
                 "--deadline-s", str(deadline_s)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=ROOT, start_new_session=True)

    def wait(self) -> dict[str, Any]:
        """The result object, waiting for the preparation until its deadline (plus a margin for
        it to write the result): a timeout is a skip (the machine is too slow), an exit without a
        result an error (the preparation crashed)."""
        if self.result is None:
            end = self.started + self.deadline_s + 60
            while not self.result_path.exists() and self.proc.poll() is None and time.monotonic() < end:
                time.sleep(0.5)
            timed_out = not self.result_path.exists() and self.proc.poll() is None
            if timed_out:
                self._kill()
            try:
                self.result = json.loads(self.result_path.read_text())
            except (OSError, ValueError):
                self.result = ({"ok": False, "skip": f"the preparation took longer than {self.deadline_s:.0f} s"}
                               if timed_out else  # a crash of ours, not the machine's fault
                               {"ok": False, "error": f"the preparation exited ({self.proc.returncode}) with no result"})
            self.result["waited_s"] = round(time.monotonic() - self.started, 1)
        return self.result

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:]) if self.log_path.exists() else ""

    def env(self) -> dict[str, str]:
        """What a test session started meanwhile needs to take this preparation over
        (:class:`Adopted`) instead of starting its own: ``scripts/run_suite.py`` starts one before
        the unit tests, so that its minutes on a fresh machine overlap those too."""
        return {ADOPT_DIR: str(self.dir), ADOPT_PID: str(self.proc.pid), ADOPT_DEADLINE: str(self.deadline_s),
                ADOPT_STARTED: repr(time.time() - (time.monotonic() - self.started))}

    def _kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)

    def close(self) -> str | None:
        """Stops the preparation if it still runs, and the dockerd it started if no other session
        uses Docker; returns a line saying what became of that dockerd (None: it started none)."""
        self._kill()
        note = None
        pid = None
        try:
            pid = int((self.dir / "dockerd.pid").read_text())
        except (OSError, ValueError):
            pass
        if pid:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                note = f"left dockerd (pid {pid}, started for the compose test) running: another session uses Docker"
            else:
                note = _stop_dockerd(pid)
        self._lock.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return note


ADOPT_DIR, ADOPT_PID = "DML_COMPOSE_PREP_DIR", "DML_COMPOSE_PREP_PID"  # set by Background.env()
ADOPT_DEADLINE, ADOPT_STARTED = "DML_COMPOSE_PREP_DEADLINE_S", "DML_COMPOSE_PREP_STARTED"


class Adopted:
    """A preparation another process started and owns (:meth:`Background.env`, from the
    environment): waited for like :class:`Background`, but never stopped here. Its owner stops it
    and the dockerd it started, after this session has ended."""

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = pathlib.Path(env[ADOPT_DIR])
        self.pid = int(env[ADOPT_PID])
        self.deadline_s = float(env[ADOPT_DEADLINE])
        self.started_wall = float(env[ADOPT_STARTED])
        self.result_path = self.dir / "result.json"
        self.log_path = self.dir / "prep.log"
        self.result: dict[str, Any] | None = None

    @staticmethod
    def from_env(env: dict[str, str] | None = None) -> Adopted | None:
        """The preparation the environment names, or None when it names none."""
        env = dict(os.environ if env is None else env)
        return Adopted(env) if env.get(ADOPT_DIR) and env.get(ADOPT_PID) else None

    def _running(self) -> bool:
        return _proc_state(self.pid) != "Z"

    def wait(self) -> dict[str, Any]:
        """As :meth:`Background.wait`: the result, a skip when the deadline (counted from the
        owner's start) passes first, an error when the preparation ended with none."""
        if self.result is None:
            end = time.monotonic() + max(0.0, self.started_wall + self.deadline_s + 60 - time.time())
            while not self.result_path.exists() and self._running() and time.monotonic() < end:
                time.sleep(0.5)
            try:
                self.result = json.loads(self.result_path.read_text())
            except (OSError, ValueError):
                self.result = ({"ok": False, "error": "the preparation exited with no result"} if not self._running()
                               else {"ok": False, "skip": f"the preparation took longer than {self.deadline_s:.0f} s"})
            self.result["waited_s"] = round(time.time() - self.started_wall, 1)
        return self.result

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:]) if self.log_path.exists() else ""

    def close(self) -> str | None:
        """Nothing: the owner stops the preparation."""
        return None


def _stop_dockerd(pid: int) -> str:
    """SIGTERM to the dockerd ``pid`` (if that pid still is a dockerd), waiting up to 30 s, then SIGKILL."""
    try:
        if pathlib.Path(f"/proc/{pid}/comm").read_text().strip() != "dockerd":
            return f"dockerd (pid {pid}) had already exited"
        os.kill(pid, signal.SIGTERM)
    except (OSError, ProcessLookupError):
        return f"dockerd (pid {pid}) had already exited"
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if not pathlib.Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid):
            return f"stopped dockerd (pid {pid}), which the compose test had started"
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    return f"killed dockerd (pid {pid}): it did not stop within 30 s of SIGTERM"


def _proc_state(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--result", type=pathlib.Path, required=True, help="write the result object here (JSON)")
    ap.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="the whole run's deadline")
    a = ap.parse_args(argv)
    global PID_FILE
    PID_FILE = a.result.with_name("dockerd.pid")
    result = prepare(a.deadline_s)
    tmp = a.result.with_name(a.result.name + ".part")
    tmp.write_text(json.dumps(result))
    tmp.replace(a.result)
    if result["ok"]:  # after the result: the test need not wait for it
        try:
            prune_images(Prep(120), keep=result["image"])
        except Unavailable as e:
            log(f"pruning old images: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
