"""The benchmark scripts are run by hand, not by CI: at least they must compile and refuse bad
flags with exit code 2 (a syntax error once slipped into one)."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import py_compile
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_benchmark_compiles(script: str, tmp_path: pathlib.Path) -> None:
    py_compile.compile(str(BENCH / script), cfile=str(tmp_path / "x.pyc"), doraise=True)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_allreduce_flags() -> None:
    mod = _load("allreduce")
    a = mod.parse_args([])
    assert a.world_sizes == [2, 3, 4] and a.sizes_mb == [1.0, 64.0, 256.0] and a.codecs == ["fp32"]
    a = mod.parse_args(["--codecs", "fp32,bf16,int8", "--data-planes", "tcp,grpc", "--verify", "first"])
    assert a.codecs == ["fp32", "bf16", "int8"] and a.data_planes == ["tcp", "grpc"]
    for bad in (["--codecs", "fp64"], ["--data-planes", "udp"], ["--world-sizes", "1"], ["--repeats", "0"],
                ["--chunk-elems", str(2 << 20)]):
        with pytest.raises(SystemExit) as e:
            mod.parse_args(bad)
        assert e.value.code == 2, bad


def test_allreduce_link_mbit_flag(capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("allreduce")
    assert mod.parse_args([]).link_mbit == 0  # loopback unless asked
    a = mod.parse_args(["--link-mbit", "1000", "--egress-only", "--link-probe-s", "0"])
    assert a.link_mbit == 1000 and a.egress_only and a.link_probe_s == 0
    for bad in (["--link-mbit", "-1"], ["--link-mbit", "nan"], ["--link-mbit", "fast"], ["--link-probe-s", "-1"]):
        with pytest.raises(SystemExit) as e:
            mod.parse_args(bad)
        assert e.value.code == 2, bad
    assert "--link-mbit must be 0 (loopback) or a positive rate" in capsys.readouterr().err


def test_allreduce_link_mbit_refused_without_root(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("allreduce")
    monkeypatch.setattr(mod.os, "geteuid", lambda: 1000)
    assert mod.main(["--link-mbit", "1000", "--world-sizes", "2", "--sizes-mb", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "Traceback" not in err
    monkeypatch.setattr(mod.os, "geteuid", lambda: 0)
    monkeypatch.setattr(mod.netem.shutil, "which", lambda name: None if name == "tc" else "/usr/sbin/ip")
    assert mod.main(["--link-mbit", "1000", "--world-sizes", "2", "--sizes-mb", "1"]) == 2
    assert "tc not found" in capsys.readouterr().err


def test_netem_ring_floor() -> None:
    netem = _load("netem")
    size = 64 << 20
    # N=4: every rank sends 2(N-1)/N = 1.5 x the buffer; 1 Gbit/s = 1.25e8 bytes/s
    assert netem.ring_floor_s(4, size, 1000) == pytest.approx(1.5 * size / 1.25e8)
    assert netem.ring_floor_s(2, size, 10000) == pytest.approx(size / 1.25e9)
    # bf16 halves the wire bytes and the floor, int8 quarters them
    assert netem.ring_floor_s(4, size // 2, 1000) == pytest.approx(netem.ring_floor_s(4, size, 1000) / 2)
    assert netem.ring_floor_s(4, size // 4, 1000) == pytest.approx(netem.ring_floor_s(4, size, 1000) / 4)
    with pytest.raises(ValueError):
        netem.ring_floor_s(4, size, 0)


def test_netem_commands() -> None:
    netem = _load("netem")
    assert netem.tbf_burst_bytes(1000) == 125000 and netem.tbf_burst_bytes(10) == 64 * 1024
    tbf = ["tbf", "rate", "1000mbit", "burst", "125000", "latency", "50ms"]
    cmds = netem.setup_commands(4242, 2, 1000)
    assert cmds == [
        ["ip", "link", "add", "dmlb4242", "type", "bridge"],
        ["ip", "link", "set", "dmlb4242", "up"],
        ["ip", "netns", "add", "dmlb-4242-0"],
        ["ip", "link", "add", "dmlb4242r0", "type", "veth", "peer", "name", "eth0", "netns", "dmlb-4242-0"],
        ["ip", "link", "set", "dmlb4242r0", "master", "dmlb4242"],
        ["ip", "link", "set", "dmlb4242r0", "up"],
        ["ip", "-n", "dmlb-4242-0", "link", "set", "lo", "up"],
        ["ip", "-n", "dmlb-4242-0", "addr", "add", "10.213.0.1/24", "dev", "eth0"],
        ["ip", "-n", "dmlb-4242-0", "link", "set", "eth0", "up"],
        ["tc", "-n", "dmlb-4242-0", "qdisc", "add", "dev", "eth0", "root", *tbf],
        ["tc", "qdisc", "add", "dev", "dmlb4242r0", "root", *tbf],
        ["ip", "netns", "add", "dmlb-4242-1"],
        ["ip", "link", "add", "dmlb4242r1", "type", "veth", "peer", "name", "eth0", "netns", "dmlb-4242-1"],
        ["ip", "link", "set", "dmlb4242r1", "master", "dmlb4242"],
        ["ip", "link", "set", "dmlb4242r1", "up"],
        ["ip", "-n", "dmlb-4242-1", "link", "set", "lo", "up"],
        ["ip", "-n", "dmlb-4242-1", "addr", "add", "10.213.0.2/24", "dev", "eth0"],
        ["ip", "-n", "dmlb-4242-1", "link", "set", "eth0", "up"],
        ["tc", "-n", "dmlb-4242-1", "qdisc", "add", "dev", "eth0", "root", *tbf],
        ["tc", "qdisc", "add", "dev", "dmlb4242r1", "root", *tbf],
    ]
    # N ranks: one namespace, one veth into the bridge, one address and one shaper per direction each
    cmds = netem.setup_commands(4194304, 4, 10000)
    assert [c[3] for c in cmds if c[:3] == ["ip", "netns", "add"]] == [f"dmlb-4194304-{r}" for r in range(4)]
    assert [c[5] for c in cmds if c[3:5] == ["addr", "add"]] == [f"10.213.0.{r + 1}/24" for r in range(4)]
    shaped = [c for c in cmds if c[0] == "tc"]
    assert len(shaped) == 8
    assert all(c[-7:] == ["tbf", "rate", "10000mbit", "burst", "1250000", "latency", "50ms"] for c in shaped)
    assert all(len(c[3]) <= 15 for c in cmds if c[1:3] == ["link", "add"])  # interface names
    egress = netem.setup_commands(4242, 3, 100, egress_only=True)
    assert [c for c in egress if c[0] == "tc"] == [
        ["tc", "-n", f"dmlb-4242-{r}", "qdisc", "add", "dev", "eth0", "root",
         "tbf", "rate", "100mbit", "burst", "65536", "latency", "50ms"] for r in range(3)]
    for bad in (0, netem.MAX_RANKS + 1):
        with pytest.raises(ValueError):
            netem.setup_commands(4242, bad, 1000)
    assert netem.teardown_commands(4242, 2) == [
        ["ip", "netns", "del", "dmlb-4242-0"], ["ip", "netns", "del", "dmlb-4242-1"],
        ["ip", "link", "del", "dmlb4242r0"], ["ip", "link", "del", "dmlb4242r1"],
        ["ip", "link", "del", "dmlb4242"]]


def test_netem_leftovers_only_of_dead_runs() -> None:
    netem = _load("netem")
    netns = ["dmlb-11-0", "dmlb-11-1", "dmlb-22-0", "other-11-0", "dmlb-x-0"]
    links = ["lo", "eth0", "dmlb11", "dmlb11r0", "dmlb11r1", "dmlb22", "dmlb22r0", "dmlbx"]
    cmds = netem.leftover_commands(netns, links, alive=lambda pid: pid == 22)
    assert cmds == [["ip", "netns", "del", "dmlb-11-0"], ["ip", "netns", "del", "dmlb-11-1"],
                    ["ip", "link", "del", "dmlb11r0"], ["ip", "link", "del", "dmlb11r1"],
                    ["ip", "link", "del", "dmlb11"]]



def test_netem_forward_rule_and_its_leftovers() -> None:
    """dockerd sets FORWARD's policy to DROP, and with br_netfilter loaded the LAN's bridged packets
    traverse that chain: the LAN inserts its own ACCEPT rule and deletes the very same rule."""
    netem = _load("netem")
    rule = ["-i", "dmlb4242", "-o", "dmlb4242", "-j", "ACCEPT"]
    assert netem.forward_commands(4242) == [["iptables", "-w", "10", "-I", "FORWARD", "1", *rule]]
    assert netem.forward_teardown_commands(4242) == [["iptables", "-w", "10", "-D", "FORWARD", *rule]]
    rules = ["-P FORWARD DROP", "-A FORWARD -j DOCKER-USER", "-A FORWARD -i dmlb11 -o dmlb11 -j ACCEPT",
             "-A FORWARD -i dmlb22 -o dmlb22 -j ACCEPT", "-A FORWARD -i dmlb11 -o dmlb33 -j ACCEPT",
             "-A FORWARD -i docker0 -o docker0 -j ACCEPT"]
    assert netem.leftover_forward_commands(rules, alive=lambda pid: pid == 22) == [
        ["iptables", "-w", "10", "-D", "FORWARD", "-i", "dmlb11", "-o", "dmlb11", "-j", "ACCEPT"]]


def test_netem_lan_brings_and_removes_its_forward_rule(monkeypatch) -> None:
    netem = _load("netem")
    ran: list[list[str]] = []

    def fake_run(cmd, check=True, fail=()):
        ran.append(cmd)
        if any(cmd[:len(f)] == f for f in fail):
            if check:
                raise netem.NetemError("failed")
            return netem.subprocess.CompletedProcess(cmd, 1, "", "")
        return netem.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(netem, "leftovers", lambda: [])
    insert = netem.forward_commands(7)[0]
    delete = netem.forward_teardown_commands(7)[0]
    # iptables present: the rule goes in after the LAN is built and comes out with it.
    monkeypatch.setattr(netem.shutil, "which", lambda name: "/usr/sbin/" + name)
    monkeypatch.setattr(netem, "_run", fake_run)
    lan = netem.Lan(2, 100, pid=7).open()
    assert ran[-1] == insert and lan.forwarding
    lan.close()
    assert ran[-1] == delete and ran.count(delete) == 1
    # No iptables: nothing filters the bridge, nothing is inserted or deleted.
    ran.clear()
    monkeypatch.setattr(netem.shutil, "which", lambda name: None if name == "iptables" else "/usr/sbin/" + name)
    netem.Lan(2, 100, pid=7).open().close()
    assert insert not in ran and delete not in ran
    # iptables that cannot even list FORWARD (no netfilter tables): nothing to open, not an error.
    monkeypatch.setattr(netem.shutil, "which", lambda name: "/usr/sbin/" + name)
    monkeypatch.setattr(netem, "_run", lambda cmd, check=True: fake_run(cmd, check, fail=(["iptables"],)))
    lan = netem.Lan(2, 100, pid=7).open()
    assert not lan.forwarding
    lan.close()
    # A FORWARD chain that lists but refuses the rule: the LAN would drop every packet, so open()
    # fails, and what it built is torn down.
    ran.clear()
    monkeypatch.setattr(netem, "_run", lambda cmd, check=True: fake_run(cmd, check, fail=(insert,)))
    with pytest.raises(netem.NetemError):
        netem.Lan(2, 100, pid=7).open()
    assert ["ip", "link", "del", "dmlb7"] in ran and delete not in ran

def test_netem_bridge_address_commands(monkeypatch) -> None:
    """With ``bridge_addr`` the root namespace gets an address on the bridge (a coordinator there
    is reachable from every rank), right after the bridge is up; it is deleted before the bridge."""
    netem = _load("netem")
    plain = netem.setup_commands(4242, 2, 1000)
    cmds = netem.setup_commands(4242, 2, 1000, bridge_addr=netem.BRIDGE_ADDR)
    add = ["ip", "addr", "add", "10.213.0.254/24", "dev", "dmlb4242"]
    assert cmds[:3] == [["ip", "link", "add", "dmlb4242", "type", "bridge"], ["ip", "link", "set", "dmlb4242", "up"], add]
    assert cmds[3:] == plain[2:] and add not in plain
    for bad in ("10.213.0.1", "10.9.0.254"):  # a rank's address, or off the subnet
        with pytest.raises(ValueError):
            netem.setup_commands(4242, 2, 1000, bridge_addr=bad)
    delete = ["ip", "addr", "del", "10.213.0.254/24", "dev", "dmlb4242"]
    down = netem.teardown_commands(4242, 2, bridge_addr=netem.BRIDGE_ADDR)
    assert down[-2:] == [delete, ["ip", "link", "del", "dmlb4242"]]
    assert down[:-2] == netem.teardown_commands(4242, 2)[:-1] and delete not in netem.teardown_commands(4242, 2)
    # Lan passes it through both ways.
    ran: list[list[str]] = []
    monkeypatch.setattr(netem, "leftovers", lambda: [])
    monkeypatch.setattr(netem.shutil, "which", lambda name: None if name == "iptables" else "/usr/sbin/" + name)
    monkeypatch.setattr(netem, "_run", lambda cmd, check=True: ran.append(cmd) or netem.subprocess.CompletedProcess(cmd, 0, "", ""))
    lan = netem.Lan(2, 1000, pid=4242, bridge_addr=netem.BRIDGE_ADDR).open()
    assert add in ran and "10.213.0.254 on the bridge" in lan.describe()
    lan.close()
    assert ran[-2:] == [delete, ["ip", "link", "del", "dmlb4242"]]


# -- chaos.py: what it reads from the job API and how it reports it --------------------------
T0 = 1_700_000_000.0  # a Unix time; every time below is T0 + seconds


@pytest.fixture(scope="module")
def chaos():
    with pytest.MonkeyPatch.context() as mp:  # the script sets a gRPC variable at import
        mp.delenv("GRPC_ENABLE_FORK_SUPPORT", raising=False)
        yield _load("chaos")


def _ms(s: float) -> int:
    return round((T0 + s) * 1000)


def _peer_log(path: pathlib.Path, lines: list[tuple[float, str]]) -> str:
    """A peer log as dml-peer writes it (local-time asctime with milliseconds)."""
    import datetime

    out = []
    for s, msg in lines:
        d = datetime.datetime.fromtimestamp(T0 + s)
        out.append(f"{d:%Y-%m-%d %H:%M:%S},{d.microsecond // 1000:03d} INFO peer dml.peer.runner: {msg}")
    path.write_text("\n".join(out) + "\n")
    return str(path)


def _job(evictions=(), epochs=(), rolled_back=0, total=None):
    from dml.v1 import jobs_pb2

    job = jobs_pb2.JobStatus(job_id="job-1", state=jobs_pb2.JobStatus().state, rolled_back_rounds=rolled_back,
                             evictions_total=len(evictions) if total is None else total)
    for pid, cause, s, reporter, detail in evictions:
        job.evictions.add(peer_id=pid, cause=jobs_pb2.EvictionCause.Value(f"EVICTION_CAUSE_{cause}"), reporter=reporter,
                          unix_ms=_ms(s), detail=detail)
    for n, (peers, s) in enumerate(epochs, start=1):
        job.epochs.add(epoch=n, peers=peers, started_unix_ms=_ms(s), round=1)
    return job


def _resp(job, commits: list[float], samples: int = 100, shards: int = 2, size: int = 250):
    """GetJob's answer with a history of rounds 1..N committed at ``commits`` (seconds); each
    round consumes the next ``samples`` samples of each of ``shards`` shards of ``size``."""
    from dml.v1 import jobs_pb2

    resp = jobs_pb2.GetJobResponse(job=job)
    cursor = {s: (1, 0) for s in range(shards)}
    for rnd, s in enumerate(commits, start=1):
        h = resp.history.add(round=rnd, epoch=1, samples=samples * shards, digest=f"d{rnd}", committed_unix_ms=_ms(s),
                             test_accuracy=0.5 + rnd / 1000, data_epoch=1, members=shards)
        for shard in range(shards):
            m = h.consumed.add(peer_id=f"peer-{shard}")
            ep, at = cursor[shard]
            stop = min(at + samples, size)
            m.ranges.add(shard_id=shard, data_epoch=ep, start=at, stop=stop)
            cursor[shard] = (ep + 1, 0) if stop >= size else (ep, stop)
            h.data_epoch = ep
    return resp


def _obs(chaos, s: float, rnd: int, ok: bool = True, peers=("peer-a",), latency: float = 0.01):
    return chaos.Obs(T0 + s, ok, rnd, 1, tuple(peers), 0, "RUNNING" if ok else "", f"d{rnd}" if ok else "",
                     _ms(s) if ok else 0, "" if ok else "UNAVAILABLE", latency)


def test_chaos_measures_a_killed_peer_from_evictions_epochs_and_commit_times(chaos, tmp_path):
    job = _job(evictions=[("peer-b", "NEIGHBOUR_REPORT", 10.4, "peer-a", "failed mid-exchange"),
                          ("peer-c", "HEARTBEAT_TIMEOUT", 12.0, "", "no heartbeat for 2150 ms"),
                          ("peer-d", "HEARTBEAT_TIMEOUT", 30.0, "", "no heartbeat for 2150 ms")],
               epochs=[(["peer-a", "peer-b", "peer-c", "peer-d"], 0.0), (["peer-a", "peer-c", "peer-d"], 10.4),
                       (["peer-a", "peer-d"], 12.0), (["peer-a", "peer-d", "peer-e"], 13.0)])
    resp = _resp(job, [1.0, 5.0, 10.0, 10.9, 11.5])
    log = _peer_log(tmp_path / "peer-1.1.log", [(10.6, "peer peer-e: registered at 127.0.0.1:4242 with coordinator x")])
    ev = chaos.Event("sigkill", T0 + 10.0, victim="peer-1", victim_id="peer-b", log=log, t_restarted=T0 + 10.01)
    chaos.analyse(ev, [], resp, until=T0 + 25.0)
    assert ev.detection_s == pytest.approx(0.4, abs=1e-3)
    assert ev.how == "neighbour report by peer-a (failed mid-exchange)"
    assert ev.recovery_s == pytest.approx(0.5, abs=1e-3)  # eviction at +10.4 to the commit at +10.9
    assert ev.new_id == "peer-e" and ev.rejoin_s == pytest.approx(3.0, abs=1e-3)
    # Another peer evicted within 10 s of the failure is collateral; one 20 s later is not.
    assert ev.collateral == ["peer-c (heartbeat timeout (no heartbeat for 2150 ms)) at +2.00s"]
    assert chaos.measured(ev)


def test_chaos_measures_a_stopped_peer_from_its_sigcont(chaos, tmp_path):
    job = _job(evictions=[("peer-c", "HEARTBEAT_TIMEOUT", 12.1, "", "no heartbeat for 2100 ms")],
               epochs=[(["peer-a", "peer-c"], 0.0), (["peer-a"], 12.1), (["peer-a", "peer-f"], 17.0)])
    resp = _resp(job, [1.0, 12.6])
    log = _peer_log(tmp_path / "peer-2.log", [(-100.0, "peer peer-c: registered at 127.0.0.1:1 with coordinator x"),
                                              (14.5, "peer peer-c: evicted by the coordinator; will re-register"),
                                              (16.5, "peer peer-f: registered at 127.0.0.1:1 with coordinator x")])
    ev = chaos.Event("sigstop", T0 + 10.0, victim="peer-2", victim_id="peer-c", log=log, t_cont=T0 + 14.0)
    chaos.analyse(ev, [], resp)
    assert ev.detection_s == pytest.approx(2.1, abs=1e-3) and ev.how.startswith("heartbeat timeout")
    assert ev.recovery_s == pytest.approx(0.5, abs=1e-3)
    assert ev.new_id == "peer-f" and ev.rejoin_s == pytest.approx(3.0, abs=1e-3)  # from SIGCONT at +14
    assert ev.collateral == []


def test_chaos_leaves_a_failure_unmeasured_without_its_eviction(chaos, tmp_path):
    resp = _resp(_job(epochs=[(["peer-a", "peer-b"], 0.0)]), [1.0, 11.0])
    ev = chaos.Event("sigkill", T0 + 10.0, victim="peer-0", victim_id="peer-b", log=str(tmp_path / "none.log"))
    chaos.analyse(ev, [], resp)
    assert ev.detection_s is None and ev.recovery_s is None and ev.rejoin_s is None and not chaos.measured(ev)


def test_chaos_measures_a_coordinator_kill_from_its_answer_and_the_heartbeats(chaos, tmp_path):
    resp = _resp(_job(), [1.0, 9.9, 12.0, 12.5])
    obs = ([_obs(chaos, 9.95, 2)] + [_obs(chaos, 10.0 + i / 10, 0, ok=False) for i in range(12)]
           + [_obs(chaos, 11.2, 2, latency=0.3), _obs(chaos, 11.3, 2, latency=0.05), _obs(chaos, 12.05, 3)])
    back = _peer_log(tmp_path / "peer-0.log", [(10.5, "peer peer-a: heartbeat failed (UNAVAILABLE); retrying"),
                                               (11.6, "peer peer-a: coordinator reachable again")])
    quiet = _peer_log(tmp_path / "peer-1.log", [(5.0, "peer peer-b: registered at 127.0.0.1:2 with coordinator x")])
    ev = chaos.Event("coordinator", T0 + 10.0, victim="coordinator", round_before=2, digest_before="d2",
                     members={"peer-0": back, "peer-1": quiet}, t_restarted=T0 + 11.0)
    chaos.analyse(ev, obs, resp)
    assert ev.answer_s == pytest.approx(1.2, abs=1e-3) and ev.round_after_restart == 2
    assert ev.detection_s == pytest.approx(1.6, abs=1e-3) == ev.reattach_s  # the last heartbeat back
    assert ev.recovery_s == pytest.approx(0.4, abs=1e-3)  # to the commit at +12.0
    assert ev.slowest_poll_s == pytest.approx(0.3)
    # A member whose heartbeat failed and has not come back: not measured yet, and said why.
    _peer_log(tmp_path / "peer-0.log", [(10.5, "peer peer-a: heartbeat failed (UNAVAILABLE); retrying")])
    ev2 = chaos.Event("coordinator", T0 + 10.0, victim="coordinator", members={"peer-0": back}, t_restarted=T0 + 11.0)
    chaos.analyse(ev2, obs, resp)
    assert ev2.detection_s is None and ev2.recovery_s is None and ev2.note == "no heartbeat back yet from ['peer-0']"


def _sizes() -> list[int]:
    return [250, 250]


def test_chaos_measure_reads_rounds_ledger_rollbacks_epochs_and_evictions_from_getjob(chaos):
    job = _job(evictions=[("peer-x", "ROUND_DEADLINE", 0.5, "", ""), ("peer-b", "SELF_REPORT", 20.0, "", "local failure"),
                          ("peer-c", "REPLACED", 70.0, "", "")],
               epochs=[(["peer-a", "peer-b"], 0.0), (["peer-a"], 20.0), (["peer-a", "peer-c"], 40.0),
                       (["peer-a"], 70.0)], rolled_back=3, total=300)
    commits = [10.0 + i for i in range(8)] + [30.0, 31.0, 65.0]  # rounds 1..11; the window is 10 .. 70
    resp = _resp(job, commits)
    obs = [_obs(chaos, s + 0.01, r) for r, s in enumerate(commits, start=1)]
    ev = chaos.Event("sigkill", T0 + 20.0, victim="peer-1", victim_id="peer-b", detection_s=0.2, recovery_s=1.0,
                     rejoin_s=3.0)
    m = chaos.measure("chaos", [ev], obs, resp, T0 + 10.0, T0 + 70.0, [], _sizes())
    assert m["rounds_lost"] == 0 and m["round_numbers_ok"] and m["rounds_rewritten"] == []
    assert m["ledger_violations"] == 0
    assert m["rolled_back_rounds"] == 3
    assert m["membership_epochs"] == 4 and m["membership_epochs_begun_in_window"] == 3
    assert m["evictions_in_window"] == ["+10.00s peer-b (self report (local failure))"]
    assert m["evictions_total"] == 300
    assert m["rounds_committed_in_window"] == 10 and m["final_round"] == 11
    assert m["window_samples"] == 10 * 200 and m["goodput_samples_per_s"] == pytest.approx(2000 / 60)
    assert m["longest_commit_gap_s"] == pytest.approx(34.0)  # +31 .. +65
    assert m["final_test_accuracy"] == pytest.approx(0.511)
    assert m["data_epochs"] == 4  # 3 rounds a pass (100 + 100 + 50 of 250 samples per shard)
    assert m["detection_p95_s"] == pytest.approx(0.2) and m["unmeasured_failures"] == 0


def test_chaos_measure_counts_lost_rewritten_and_double_used(chaos):
    resp = _resp(_job(), [10.0 + i for i in range(6)])
    del resp.history[2]  # round 3 missing
    resp.history[0].consumed[0].ranges[0].start = 50  # shard 0 skips its first 50 samples
    obs = [_obs(chaos, 10.5, 1), _obs(chaos, 11.5, 2)]
    obs[1].digest = "other"  # round 2 was seen committed with another digest
    obs.append(_obs(chaos, 12.5, 1))  # and the committed round went back
    kill = chaos.Event("coordinator", T0 + 12.0, round_before=2, digest_before="d2", round_after_restart=1)
    m = chaos.measure("chaos", [kill], obs, resp, T0 + 10.0, T0 + 20.0, [], _sizes())
    assert m["round_gaps"] == [3] and m["rounds_rewritten"] == [2] and not m["round_numbers_ok"]
    assert len(m["round_regressions"]) == 1
    kc = m["coordinator_kill_checks"]
    assert kc == [{"round_before_kill": 2, "in_final_history_same_digest": True, "round_after_restart": 1,
                   "not_behind_after_restart": False}]
    assert m["rounds_lost"] == 3  # rounds 2 and 3, and the restart behind the kill
    assert m["ledger_violations"] >= 1 and "skipped" in m["ledger_excerpt"][0]


def test_chaos_report_and_table(chaos):
    resp = _resp(_job(rolled_back=1, epochs=[(["peer-a", "peer-b"], 0.0)]), [10.0 + i for i in range(30)])
    obs = [_obs(chaos, 10.0 + i + 0.01, i + 1) for i in range(30)]
    events = [chaos.Event("sigkill", T0 + 15.0, victim="peer-0", victim_id="peer-b", detection_s=0.3, recovery_s=0.7,
                          rejoin_s=2.0, how="neighbour report by peer-a"),
              chaos.Event("coordinator", T0 + 25.0, victim="coordinator", round_before=15, digest_before="d15",
                          round_after_restart=15, detection_s=1.5, recovery_s=0.5)]
    c = chaos.measure("chaos", events, obs, resp, T0 + 10.0, T0 + 40.0, [], _sizes())
    b = chaos.measure("failure-free", [], obs, resp, T0 + 10.0, T0 + 40.0, [], _sizes())
    for r in (c, b):
        r.update(logs="/tmp/x", log_findings={}, load_1min_start_end=[0.5, 0.6])
    a = chaos.parse_args(["--duration-s", "30"])
    out = chaos.report(c, b, a, pathlib.Path("/tmp/w"))
    assert out["met"]["rounds_lost"] and out["met"]["ledger"] and out["met"]["detection"]
    assert out["met"]["goodput_ratio"] == pytest.approx(1.0)
    back = json.loads(json.dumps(out, default=str))
    assert back["chaos"]["rolled_back_rounds"] == 1 and back["chaos"]["events"][0]["evicted_by"] == "neighbour report by peer-a"
    assert "_events" not in back["chaos"]
    text = chaos.table(c, b, a, out["met"])
    assert "detection p50 / p95 (s)" in text and "0.30 / 1.50" in text
    assert "rolled_back_rounds" in text and "ledger violations" in text
    skipped = chaos.skipped_baseline(c)
    assert "failure-free" in chaos.table(c, skipped, a, chaos.report(c, skipped, a, pathlib.Path("/tmp/w"))["met"])


def test_chaos_flags(chaos):
    a = chaos.parse_args([])
    assert a.peers == 4 and a.duration_s == 180 and a.every_s == 15 and a.kinds == list(chaos.KINDS)
    assert a.stop_s > 2  # longer than the peer timeout
    assert chaos.parse_args(["--kinds", "sigkill, coordinator"]).kinds == ["sigkill", "coordinator"]
    for bad in (["--peers", "1"], ["--kinds", "reboot"], ["--kinds", ","], ["--duration-s", "0"], ["--every-s", "-1"],
                ["--stop-s", "0"], ["--settle-s", "-1"], ["--duration-s", "nan"]):
        with pytest.raises(SystemExit) as e:
            chaos.parse_args(bad)
        assert e.value.code == 2, bad


def test_chaos_peer_side_facts_from_the_peer_logs(chaos, tmp_path):
    from dml.client.cluster import registrations

    log = _peer_log(tmp_path / "p.log", [(1.0, "peer peer-a: registered at 127.0.0.1:5 with coordinator x"),
                                         (2.0, "peer peer-a: heartbeat failed (UNAVAILABLE); retrying"),
                                         (3.0, "peer peer-a: evicted by the coordinator; will re-register"),
                                         (3.5, "peer peer-g: registered at 127.0.0.1:5 with coordinator x")])
    regs = registrations(pathlib.Path(log))
    assert [(r.peer_id, r.address) for r in regs] == [("peer-a", "127.0.0.1:5"), ("peer-g", "127.0.0.1:5")]
    assert regs[1].wall == pytest.approx(T0 + 3.5, abs=1e-3)
    assert chaos.heartbeat_back(pathlib.Path(log), T0 + 1.5, T0 + 2.5) == (True, pytest.approx(T0 + 3.0, abs=1e-3))
    assert chaos.heartbeat_back(pathlib.Path(log), T0 + 1.5, T0 + 1.9) == (False, None)  # failed after this outage
    (tmp_path / "coordinator.log").write_text("x\nTraceback (most recent call last):\n  boom\n")
    found = chaos.scan_logs(tmp_path, T0 + 100)
    assert found["traceback"]["count"] == 1 and "critical" not in found


def test_noniid_rows_differ_only_in_their_own_flags() -> None:
    mod = _load("noniid")
    a, base, specs = mod.parse_args(["--skew", "dirichlet:0.3", "--prox-mu", "0.1", "--rounds", "7", "--seed", "5"])
    assert list(specs) == list(mod.ROWS) and a.peers == 4 and a.min_peers == 4 and base.task == "digits-cnn"
    got = {k: s for k, (_, s) in specs.items()}
    assert {(s.seed, s.rounds, s.local_steps, s.batch_size, s.learning_rate, s.num_shards, s.task)
            for s in got.values()} == {(5, 7, base.local_steps, base.batch_size, base.learning_rate, base.num_shards,
                                        "digits-cnn")}
    assert got["iid"].sharding == "iid" and all(got[k].sharding == "dirichlet:0.3" for k in mod.ROWS if k != "iid")
    assert (got["prox"].prox_mu, got["outer"].outer_optimizer, got["grads"].sync) == (0.1, "nesterov", "grads")
    assert all(s.prox_mu == 0 for k, s in got.items() if k != "prox")
    assert all(s.outer_optimizer == "none" for k, s in got.items() if k != "outer")
    assert all(s.sync == "params" for k, s in got.items() if k != "grads")
    _, _, some = mod.parse_args(["--rows", "iid,outer"])
    assert list(some) == ["iid", "outer"] and some["outer"][1].sharding == "classes:2"
    for bad in (["--rows", "fedavg"], ["--rows", ","], ["--repeats", "0"], ["--skew", "bogus"]):
        with pytest.raises(SystemExit) as e:
            mod.parse_args(bad)
        assert e.value.code == 2, bad


def test_data_plane_flags_and_a_tiny_run(capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("data_plane")
    for bad in (["--rows", "3"], ["--features", "0"], ["--batch", "0"]):
        with pytest.raises(SystemExit) as e:
            mod.main(bad)
        assert e.value.code == 2, bad
    capsys.readouterr()
    assert mod.main(["--rows", "2000", "--features", "4", "--batch", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    modes = {r["mode"]: r for r in out["results"]}
    assert list(modes) == ["numpy", "memmap", "store fetch", "store hit"]
    assert len({r["checksum"] for r in out["results"]}) == 1  # every way read the same rows
    assert modes["store fetch"]["bytes_fetched"] > 0 and modes["store hit"]["bytes_fetched"] == 0


def test_federated_flags() -> None:
    mod = _load("federated")
    a = mod.parse_args([])
    assert (a.peers, a.rounds, a.local_steps) == (4, 50, 4)
    for bad in (["--peers", "1"], ["--peers", "11"], ["--rounds", "0"], ["--local-steps", "0"], ["--timeout-s", "0"]):
        with pytest.raises(SystemExit) as e:
            mod.parse_args(bad)
        assert e.value.code == 2, bad


def test_memory_limit_flags_and_its_cgroup(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("memory_limit")
    for bad in ([], ["--limit-mb", "10"], ["--limit-mb", "1000", "--modes", "swap"], ["--limit-mb", "1000", "--peers", "0"]):
        with pytest.raises(SystemExit) as e:
            mod.main(bad)
        assert e.value.code == 2, bad
    # A v1 hierarchy in a temp dir: the limit is written, the OOM kills and the peak read back.
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")
    monkeypatch.setattr(mod, "V2", tmp_path / "no-v2")
    monkeypatch.setattr(mod, "V1", v1)
    cg = mod.Cgroup("x", 1650 * mod.MB)
    assert (v1 / "x" / "memory.limit_in_bytes").read_text() == str(1650 * mod.MB)
    (v1 / "x" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (v1 / "x" / "memory.max_usage_in_bytes").write_text(str(1600 * mod.MB))
    assert cg.oom_kills() == 3 and cg.peak_mb() == 1600.0
    assert cg.prefix()[:2] == ["sh", "-c"] and str(v1 / "x" / "cgroup.procs") in cg.prefix()[2]
    # What a run cut at its timeout leaves in the cgroup is killed before the cgroup goes.
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (v1 / "x" / "cgroup.procs").write_text(f"{left.pid}\n")
        cg.kill_all()
        assert left.wait(10) == -9
    finally:
        left.kill()
        left.wait()
    # No memory cgroup at all: exit 2 with the reason, not a traceback.
    monkeypatch.setattr(mod, "V1", tmp_path / "no-v1")
    assert mod.main(["--limit-mb", "1000"]) == 2
    assert "no memory cgroup" in capsys.readouterr().err


def test_channel_setup_times_both_modes_over_plain_and_tls(capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("channel_setup")
    assert mod.main(["--rounds", "3", "--repeats", "1", "--tls", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["transport"], r["mode"]) for r in rows] == [("plain", "new"), ("plain", "kept"), ("tls", "new"), ("tls", "kept")]
    assert all(r["wall_ms"] > 0 and r["cpu_ms"] >= 0 and len(r["cpu_ms_each"]) == 1 for r in rows)
    with pytest.raises(SystemExit) as e:
        mod.main(["--rounds", "0"])
    assert e.value.code == 2
