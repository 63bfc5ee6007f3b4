"""Task code bundles: a task file or package sent with a job, as one deterministic zip.

The client packs ``--task PATH.py`` or ``--task DIR`` (a package: ``DIR/__init__.py``) into a zip
whose names are sorted and whose timestamps and modes are fixed, so the same code always gives
the same bytes and the same sha256 (``JobSpec.task_digest``). ``JobSpec.task`` then names what a
peer imports from it: ``mytask.py`` (the module ``mytask``) or ``mypkg/`` (the package
``mypkg``), optionally ``:NAME`` for a Task not called ``task``.

The coordinator checks a bundle's size and shape (:func:`check`) without importing it; a peer
checks it again and extracts it (:func:`extract`), treating the bytes as hostile. Standard library
only: the job client and the coordinator load neither torch nor numpy through this module.
"""
from __future__ import annotations

import ast
import hashlib
import io
import keyword
import os
import pathlib
import re
import stat
import sys
import zipfile
from dataclasses import dataclass

MAX_BUNDLE_BYTES = 4 << 20  # compressed: what the client sends and a coordinator keeps by default
MAX_CONFIGURABLE_BYTES = 7 << 20  # dml-coordinator --max-task-code-bytes: under gRPC's 8 MiB control messages
MAX_FILES = 256
MAX_UNPACKED_BYTES = 64 << 20  # all files together, uncompressed
MAX_NAME_BYTES = 200  # one path in the bundle
MAX_DEPTH = 8  # folders deep
DEFAULT_ATTR = "task"
# The zip's fixed metadata: the earliest date a zip can carry, regular files rw-r--r--, Unix.
_DATE = (1980, 1, 1, 0, 0, 0)
_MODE = (stat.S_IFREG | 0o644) << 16
_UNIX = 3
_LEVEL = 9
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# Names a task module may not take: they would replace a module dml or its users need.
_RESERVED = frozenset({"dml", "torch", "numpy", "grpc", "google", "typing_extensions"})


class BundleError(ValueError):
    """Task code that cannot be sent or run: the message says what and how to fix it."""


class BundleTooLarge(BundleError):
    """A bundle over a size limit."""


@dataclass(frozen=True)
class CodeRef:
    """What ``JobSpec.task`` names in a bundle: a module file or a package, and the Task's name."""

    module: str  # the import name: mytask, or mypkg
    package: bool  # mypkg/ (its __init__.py) rather than mytask.py
    attr: str = DEFAULT_ATTR

    @property
    def entry(self) -> str:
        """The bundle path of the file that is imported first."""
        return f"{self.module}/__init__.py" if self.package else f"{self.module}.py"

    def __str__(self) -> str:
        name = f"{self.module}/" if self.package else f"{self.module}.py"
        return name if self.attr == DEFAULT_ATTR else f"{name}:{self.attr}"


@dataclass(frozen=True)
class Bundle:
    """Packed task code: the zip's bytes, their sha256, and the reference to put in the spec."""

    data: bytes
    digest: str
    ref: CodeRef


def digest_of(data: bytes) -> str:
    """The sha256 of a bundle, as ``JobSpec.task_digest`` carries it (64 lowercase hex digits)."""
    return hashlib.sha256(data).hexdigest()


def module_name_error(name: str) -> str:
    """Why ``name`` cannot be a task module's import name ("" when it can)."""
    if not _IDENT.fullmatch(name) or keyword.iskeyword(name):
        return f"{name!r} is not a Python module name (letters, digits and _, not starting with a digit)"
    if name in _RESERVED or name in sys.stdlib_module_names:
        return f"{name!r} is the name of a module dml or Python itself uses: rename the task"
    return ""


def parse_ref(task: str) -> CodeRef:
    """The :class:`CodeRef` a code task's ``JobSpec.task`` names (``mytask.py``, ``mypkg/``, either
    with ``:NAME``). BundleError when it is neither."""
    entry, sep, attr = task.partition(":")
    if sep and not _IDENT.fullmatch(attr):
        raise BundleError(f"task {task!r}: {attr!r} after ':' is not a Python name")
    attr = attr or DEFAULT_ATTR
    if entry.endswith("/"):
        module, package = entry[:-1], True
    elif entry.endswith(".py"):
        module, package = entry[:-3], False
    else:
        raise BundleError(f"task {task!r} names no task code: expected MODULE.py or PACKAGE/ (optionally :NAME)")
    if err := module_name_error(module):
        raise BundleError(f"task {task!r}: {err}")
    return CodeRef(module, package, attr)


def is_path(task: str) -> bool:
    """Whether a ``--task`` argument names a file or package to send (rather than a built-in
    task or ``package.module:NAME`` from the peers' environment): before any ``:NAME`` it ends in
    ``.py`` or holds a ``/`` (a package in the working directory is ``./mypkg`` or ``mypkg/``)."""
    path, _, _ = _split_attr(task)
    return path.endswith(".py") or "/" in path or os.sep in path


def _split_attr(task: str) -> tuple[str, str, bool]:
    """(path, Task name, whether a name was given) of ``PATH[:NAME]``."""
    head, sep, tail = task.rpartition(":")
    if sep and _IDENT.fullmatch(tail) and head:
        return head, tail, True
    return task, DEFAULT_ATTR, False


# -- packing (the client) ----------------------------------------------------------------------
def pack_path(task: str) -> Bundle:
    """Packs ``PATH.py[:NAME]`` or ``DIR[:NAME]`` into a bundle, after checking that each Python
    file compiles and that the entry module defines the Task. BundleError says what is wrong
    (the file and line of a syntax error)."""
    text, attr, _ = _split_attr(task)
    path = pathlib.Path(text)
    if not path.exists():
        raise BundleError(f"task {text}: no such file or directory")
    if path.is_dir():
        files = _package_files(path)
        ref = CodeRef(path.resolve().name, True, attr)
    elif path.suffix == ".py":
        files = {path.name: path}
        ref = CodeRef(path.stem, False, attr)
    else:
        raise BundleError(f"task {text}: a task file ends in .py (or name a package directory)")
    if err := module_name_error(ref.module):
        raise BundleError(f"task {text}: {err}")
    contents = {name: _read(p) for name, p in files.items()}
    for name, src in contents.items():
        if name.endswith(".py"):
            _compile(src, files[name])
    _check_defines(contents[ref.entry], files[ref.entry], ref.attr)
    data = pack_files(contents)
    return Bundle(data, digest_of(data), ref)


def _package_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """The files of package ``root`` by bundle name (``pkg/...``), skipping dotfiles, dot
    folders and ``__pycache__``; BundleError for a folder that is not a package."""
    if not (root / "__init__.py").is_file():
        raise BundleError(f"task directory {root} is not a Python package: add {root / '__init__.py'} "
                          f"(holding the task, or importing it)")
    top = root.resolve().name
    out: dict[str, pathlib.Path] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for n in sorted(names):
            if n.startswith(".") or n.endswith((".pyc", ".pyo")):
                continue
            p = pathlib.Path(folder, n)
            if not p.is_file():
                continue  # a socket, a fifo or a dangling link: not code
            if p.is_symlink() and root.resolve() not in p.resolve().parents:
                raise BundleError(f"task directory {root}: {p.relative_to(root)} links outside it "
                                  f"(to {p.resolve()}); copy what the task needs into the package")
            name = "/".join((top, *p.relative_to(root).parts))
            out[name] = p
            if len(out) > MAX_FILES:
                raise BundleTooLarge(f"task directory {root} has more than {MAX_FILES} files")
    return out


def _read(p: pathlib.Path) -> bytes:
    try:
        if p.stat().st_size > MAX_UNPACKED_BYTES:
            raise BundleTooLarge(f"task file {p} is over {MAX_UNPACKED_BYTES >> 20} MiB")
        return p.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read task file {p}: {e.strerror or e}") from None


def _compile(src: bytes, p: pathlib.Path) -> None:
    try:
        compile(src, str(p), "exec", dont_inherit=True)
    except SyntaxError as e:
        where = f"{p}, line {e.lineno}" if e.lineno else str(p)
        raise BundleError(f"task file {where}: {type(e).__name__}: {e.msg}") from None
    except ValueError as e:  # null bytes
        raise BundleError(f"task file {p}: {e}") from None


def _check_defines(src: bytes, p: pathlib.Path, attr: str) -> None:
    """BundleError when the module's top level certainly never binds ``attr`` (a star import or a
    write to ``globals()`` may, so then the peer's import decides)."""
    tree = ast.parse(src, str(p))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            return
        if isinstance(node, ast.Name) and node.id == "globals":
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == attr:
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == attr:
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.split(".")[0]) == attr for a in node.names):
            return
    raise BundleError(f"task file {p} defines no {attr!r}: assign the dml.Task to {attr} at module level"
                      + ("" if attr != DEFAULT_ATTR else " (or name another: --task PATH:NAME)"))


def pack_files(contents: dict[str, bytes]) -> bytes:
    """The deterministic zip of ``contents`` (bundle name -> bytes): sorted names, fixed date,
    mode and compression, so equal contents give equal bytes. BundleError when over a limit."""
    if len(contents) > MAX_FILES:
        raise BundleTooLarge(f"task code has {len(contents)} files; at most {MAX_FILES} are sent")
    if sum(len(v) for v in contents.values()) > MAX_UNPACKED_BYTES:
        raise BundleTooLarge(f"task code is over {MAX_UNPACKED_BYTES >> 20} MiB uncompressed")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in sorted(contents):
            if err := name_error(name):
                raise BundleError(f"task code: {err}")
            info = zipfile.ZipInfo(name, date_time=_DATE)
            info.external_attr, info.create_system = _MODE, _UNIX
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, contents[name], compresslevel=_LEVEL)
    data = buf.getvalue()
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleTooLarge(f"task code is {_mib(len(data))} compressed, over the {_mib(MAX_BUNDLE_BYTES)} "
                             f"limit: keep data out of the task's folder (read it from ctx.data_dir)")
    return data


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


# -- checking and extracting (coordinator and peers) -------------------------------------------
def name_error(name: str) -> str:
    """Why ``name`` may not be a path in a bundle ("" if it may): relative, no ``..``, no empty
    or dot-led parts, no backslashes, bounded length and depth."""
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"a path in the bundle is empty or longer than {MAX_NAME_BYTES} bytes"
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or len(parts) > MAX_DEPTH + 1:
        return f"bundle path {name[:80]!r} is absolute, has a backslash or is nested too deep"
    for part in parts:
        if not _COMPONENT.fullmatch(part) or part in (".", ".."):
            return f"bundle path {name[:80]!r} has an unsafe part {part[:40]!r}"
    return ""


def check(data: bytes, max_bytes: int = MAX_BUNDLE_BYTES, ref: CodeRef | None = None) -> list[zipfile.ZipInfo]:
    """The members of bundle ``data`` once it passes every bound: at most ``max_bytes``
    (BundleTooLarge), a readable zip of at most :data:`MAX_FILES` regular files with safe,
    distinct names, :data:`MAX_UNPACKED_BYTES` in all, stored or deflated, and (``ref``) holding
    the entry module. Reads the zip's directory only: nothing is decompressed or imported."""
    if len(data) > max_bytes:
        raise BundleTooLarge(f"task code is {len(data)} bytes, over the limit of {max_bytes} bytes")
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        raise BundleError(f"task code is not a zip bundle: {e}") from None
    with z:
        infos = z.infolist()
    if len(infos) > MAX_FILES:
        raise BundleTooLarge(f"task code has {len(infos)} files; at most {MAX_FILES} are allowed")
    seen: set[str] = set()
    total = 0
    for info in infos:
        if err := name_error(info.filename):
            raise BundleError(f"task code: {err}")
        folded = info.filename.lower()
        if folded in seen:
            raise BundleError(f"task code has {info.filename!r} twice")
        seen.add(folded)
        mode = info.external_attr >> 16
        if info.is_dir() or stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise BundleError(f"task code: {info.filename!r} is not a regular file")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
            raise BundleError(f"task code: {info.filename!r} is encrypted or compressed in an unsupported way")
        total += info.file_size
        if total > MAX_UNPACKED_BYTES:
            raise BundleTooLarge(f"task code is over {MAX_UNPACKED_BYTES >> 20} MiB uncompressed")
    if ref is not None:
        if ref.entry.lower() not in seen:
            raise BundleError(f"task code holds no {ref.entry} (the job's task is {ref})")
        tops = {i.filename.split("/")[0] for i in infos}
        want = ref.module if ref.package else ref.entry
        if tops != {want}:
            raise BundleError(f"task code for {ref} holds other top-level files: {', '.join(sorted(tops - {want}))[:200]}")
    return infos


def extract(data: bytes, dest: pathlib.Path, ref: CodeRef, max_bytes: int = MAX_CONFIGURABLE_BYTES) -> None:
    """Checks bundle ``data`` (:func:`check`) and writes its files under ``dest`` (a folder that
    must not exist yet), never more bytes per file than its header declares. BundleError on any
    bound or a damaged member."""
    infos = check(data, max_bytes, ref)
    dest.mkdir(mode=0o700)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in infos:
            target = dest.joinpath(*info.filename.split("/"))
            if dest.resolve() not in target.resolve().parents:
                raise BundleError(f"task code: {info.filename!r} leaves the bundle's folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with z.open(info) as src, open(target, "xb") as out:
                    left = info.file_size
                    while chunk := src.read(min(1 << 16, left + 1)):
                        left -= len(chunk)
                        if left < 0:
                            raise BundleError(f"task code: {info.filename!r} is longer than it says")
                        out.write(chunk)
            except BundleError:
                raise
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:  # a bad CRC, a truncated stream
                raise BundleError(f"task code: cannot extract {info.filename!r}: {e}") from None
