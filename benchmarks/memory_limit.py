"""Whether a local cluster survives a memory limit, with the committed copy in memory or on disk
(``dml-peer --committed-copy``). It runs ``benchmarks/round_overhead.py`` (a coordinator and its
peers on this machine, one job) inside a fresh memory cgroup capped at ``--limit-mb``, once per
mode, and prints per mode: the job's outcome, the OOM kills the cgroup counted, its peak usage
and the peers' peak RSS over baseline. The cap covers every process of the run together, as a
container's or a pod's memory limit does. Page cache counts against it too, but the kernel can
reclaim it; anonymous memory with no swap it can only kill. So a cap that a cluster keeping the
copy in memory exceeds is survived by one that keeps it on disk.

Needs root and a memory cgroup (v2 at /sys/fs/cgroup, or v1 at /sys/fs/cgroup/memory). Measured
here (2026-12-02, 4 peers, synthetic:10M, ``--sync grads``, 12 rounds): unlimited, the run peaked
at 1865 MB (memory) and 1872 MB (disk, its page cache included). Capped at 1650 MB, memory mode
had a peer OOM-killed mid-job, and disk mode finished with no kill and the same round time:

    sudo python benchmarks/memory_limit.py --limit-mb 1650 --params-m 10 --sync grads

Exit code 0 when every mode ran (whatever the outcome), 2 for bad flags or no cgroup to use."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
V2 = pathlib.Path("/sys/fs/cgroup")
V1 = pathlib.Path("/sys/fs/cgroup/memory")
MB = 1 << 20


class Cgroup:
    """A new memory cgroup with a limit; ``prefix`` runs a command inside it."""

    def __init__(self, name: str, limit_bytes: int) -> None:
        if (V2 / "cgroup.subtree_control").exists() and "memory" in (V2 / "cgroup.subtree_control").read_text().split():
            self.v2, self.path = True, V2 / name  # a child of the root gets memory.max only where this lists memory
        elif (V1 / "memory.limit_in_bytes").exists():
            self.v2, self.path = False, V1 / name
        else:
            raise OSError("no memory cgroup to use (neither v2 with the memory controller enabled for the root's "
                          "children nor v1 at /sys/fs/cgroup/memory)")
        self.path.mkdir(exist_ok=True)
        try:
            self._write("memory.max" if self.v2 else "memory.limit_in_bytes", str(limit_bytes))
            if not self.v2:
                self._write("memory.max_usage_in_bytes", "0")
        except OSError:
            self.remove()
            raise

    def _write(self, name: str, value: str) -> None:
        (self.path / name).write_text(value)

    def prefix(self) -> list[str]:
        """A command prefix that moves the shell into this cgroup, then execs the rest."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def peak_mb(self) -> float | None:
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) / MB if f.exists() else None

    def kill_all(self) -> None:
        """SIGKILLs every process still in the cgroup (a run cut at its timeout leaves its
        coordinator and peers behind)."""
        if self.v2 and (self.path / "cgroup.kill").exists():
            self._write("cgroup.kill", "1")
            return
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        """Kills what is left in the cgroup and removes it."""
        try:
            self.kill_all()
        except OSError:
            pass  # gone already, or never made
        for _ in range(50):  # the last processes may take a moment to leave
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_mode(a: argparse.Namespace, mode: str, logs: pathlib.Path) -> dict[str, Any]:
    cg = Cgroup(f"dml-memory-limit-{os.getpid()}-{mode}", a.limit_mb * MB)
    try:
        cmd = [*cg.prefix(), sys.executable, str(ROOT / "benchmarks" / "round_overhead.py"), "--params-m", str(a.params_m),
               "--tasks", "", "--sync", a.sync, "--peers", str(a.peers), "--rounds", str(a.rounds),
               "--committed-copy", mode, "--log-dir", str(logs / mode), "--json"]
        t0 = time.monotonic()
        row: dict[str, Any] = {}
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout_s, cwd=ROOT)
        except subprocess.TimeoutExpired:  # remove() kills the cluster it leaves in the cgroup
            ok, why = False, f"timed out after {a.timeout_s:g}s (--timeout-s)"
        else:
            ok = p.returncode == 0
            try:
                row = json.loads(p.stdout.splitlines()[0]) if ok and p.stdout.strip() else {}
            except ValueError:
                row = {}
            said = [x for x in p.stderr.splitlines() if x.startswith("round_overhead:") and "logs kept" not in x]
            why = "" if ok else (said or p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"committed_copy": mode, "limit_mb": a.limit_mb, "ok": ok, "failure": why,
                "oom_kills": cg.oom_kills(), "cgroup_peak_mb": cg.peak_mb(), "wall_s": round(time.monotonic() - t0, 1),
                "round_s": row.get("round_s"), "rss_over_baseline_x_model": row.get("rss_over_baseline_x_model")}
    finally:
        cg.remove()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit-mb", type=int, required=True, help="the memory cap of the whole run (every process), MB")
    p.add_argument("--params-m", type=float, default=10.0, help="model size in millions of parameters (default 10)")
    p.add_argument("--sync", choices=("params", "grads"), default="grads", help="the job's --sync (default grads)")
    p.add_argument("--peers", type=int, default=4, help="peer processes (default 4)")
    p.add_argument("--rounds", type=int, default=12, help="rounds of the job (default 12)")
    p.add_argument("--modes", default="memory,disk", help="committed-copy modes to run, in order (default memory,disk)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="the most one mode may take (default 600)")
    p.add_argument("--json", action="store_true", help="one JSON object per mode instead of the table")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if a.limit_mb < 64 or a.peers < 1 or a.rounds < 1 or not modes or set(modes) - {"memory", "disk"}:
        p.error("--limit-mb >= 64, --peers and --rounds >= 1, --modes from memory,disk")
    with tempfile.TemporaryDirectory(prefix="dml-memory-limit-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None) as d:
        rows = []
        for m in modes:
            try:
                rows.append(run_mode(a, m, pathlib.Path(d)))
            except OSError as e:
                print(f"memory_limit: {e}", file=sys.stderr)
                return 2
    if a.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"# synthetic:{a.params_m:g}M, {a.peers} peers, --sync {a.sync}, {a.rounds} rounds, all processes capped at {a.limit_mb} MB")
    print(f"{'copy':7} {'outcome':9} {'oom kills':>9} {'cgroup peak':>11} {'round_s':>8} {'rss x model':>11}")
    for r in rows:
        peak = f"{r['cgroup_peak_mb']:.0f} MB" if r["cgroup_peak_mb"] is not None else "-"
        print(f"{r['committed_copy']:7} {'done' if r['ok'] else 'FAILED':9} {r['oom_kills']:>9} {peak:>11} "
              f"{r['round_s'] if r['round_s'] is not None else '-':>8} {r['rss_over_baseline_x_model'] or '-':>11}"
              + (f"  ({r['failure']})" if r["failure"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
