"""The three command line tools as people expect them, checked on their real parsers: every
option's help shows its default, --version, range messages that name the job spec's bounds,
malformed addresses refused as bad input, the history table, a quiet end on a closed pipe, and
the peer's few log lines while its coordinator is unreachable."""
from __future__ import annotations

import argparse
import logging
import os
import pathlib
import subprocess
import sys

import grpc
import pytest

from dml import __version__
from dml.client import api, cli
from dml.common import args as cliargs
from dml.common import rpc
from dml.common import spec as specmod
from dml.v1 import jobs_pb2, types_pb2

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    from dml.coordinator import cli as coord_cli
    from dml.peer import cli as peer_cli

    top = cli.build_parser()
    out = [("dml", top), ("dml-coordinator", coord_cli.build_parser()), ("dml-peer", peer_cli.build_parser())]
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += [(f"dml {name}", sp) for name, sp in action.choices.items()]
    return out


SWITCHES = (argparse._HelpAction, argparse._VersionAction, argparse._StoreTrueAction, argparse._StoreFalseAction,
            argparse._SubParsersAction)


@pytest.mark.parametrize("name,parser", _parsers(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_option_shows_its_default(name: str, parser: argparse.ArgumentParser) -> None:
    fmt = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, SWITCHES) or not action.option_strings:
            continue
        text = fmt._expand_help(action) if action.help else ""
        assert "default" in text or "required" in text, f"{name} {action.option_strings[0]}: {text!r}"


def test_help_shows_the_actual_default_value() -> None:
    text = cli.build_parser()._subparsers._group_actions[0].choices["submit"].format_help()  # type: ignore[union-attr]
    assert f"(default: {specmod.JobSpec().rounds})" in " ".join(text.split())


@pytest.mark.parametrize("prog,module", [("dml", "dml.client.cli"), ("dml-coordinator", "dml.coordinator.cli"),
                                         ("dml-peer", "dml.peer.cli")])
def test_version(prog: str, module: str, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    mod = importlib.import_module(module)
    parser = mod.build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {__version__}"


def _submit_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["submit", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv,words", [
    (["--rounds", "-1"], f"--rounds: must be between 1 and {specmod.MAX_ROUNDS}, got -1"),
    (["--rounds", "0"], f"--rounds: must be between 1 and {specmod.MAX_ROUNDS}, got 0"),
    (["--rounds", str(specmod.MAX_ROUNDS + 1)], f"between 1 and {specmod.MAX_ROUNDS}"),
    (["--local-steps", "0"], f"--local-steps: must be between 1 and {specmod.MAX_SAMPLES_PER_ROUND}"),
    (["--batch-size", "5000000000"], f"--batch-size: must be between 1 and {specmod.MAX_SAMPLES_PER_ROUND}"),
    (["--lr", "0"], f"--lr: must be in (0, {specmod.MAX_LEARNING_RATE:g})"),
    (["--lr", "100"], "must be in (0, 100)"),
    (["--gossip-timeout-ms", "50"],
     f"must be between {specmod.MIN_GOSSIP_TIMEOUT_MS} and {specmod.MAX_GOSSIP_TIMEOUT_MS}, got 50"),
    (["--peer-grace-s", str(specmod.MAX_PEER_GRACE_S + 1)], f"between 1 and {specmod.MAX_PEER_GRACE_S}"),
    (["--num-shards", "-2"], "--num-shards: must be at least 1, got -2"),
    (["--eval-every", str(2**32)], "--eval-every: must be at most 4294967295"),
    (["--min-peers", "0"], "--min-peers: must be at least 1, got 0"),
    (["--seed", "-1"], f"--seed: must be between 0 and {2**63 - 1}"),
    (["--rounds", "many"], "invalid int value: 'many'"),
])
def test_range_messages_name_the_real_bounds(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _submit_error(argv, capsys)
    assert words in err, err
    assert "4294967295" not in err or "at most" in err, err


def test_zero_still_means_the_default_where_it_always_did() -> None:
    a = cli.build_parser().parse_args(["submit", "--num-shards", "0", "--eval-every", "0", "--checkpoint-every", "0",
                                       "--peer-grace-s", "0", "--gossip-timeout-ms", "0"])
    d = specmod.JobSpec()
    got = cli.spec_from_args(a)
    assert (got.num_shards, got.eval_every_rounds, got.checkpoint_every_rounds, got.peer_grace_s,
            got.gossip_timeout_ms) == (d.num_shards, d.eval_every_rounds, d.checkpoint_every_rounds, d.peer_grace_s,
                                       d.gossip_timeout_ms)
    assert cli.spec_from_args(cli.build_parser().parse_args(["submit"])) == d


@pytest.mark.parametrize("address,want", [
    ("127.0.0.1:50051", ("127.0.0.1", 50051)), ("coordinator:1", ("coordinator", 1)),
    ("localhost:65535", ("localhost", 65535)), ("[::1]:50051", ("[::1]", 50051)),
])
def test_parse_address_accepts_host_port(address: str, want: tuple[str, int]) -> None:
    assert rpc.parse_address(address) == want


@pytest.mark.parametrize("address", ["host:notaport", "nohostport", "host:0", "host:65536", "host:-1", ":50051",
                                     "host:", "::1:50051", "[]:5", "a b:5", "host:5x", ""])
def test_parse_address_refuses_the_rest(address: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        rpc.parse_address(address)


@pytest.mark.parametrize("address", ["host:notaport", "nohostport", "127.0.0.1:70000"])
def test_a_malformed_address_is_bad_input(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    from dml.peer import cli as peer_cli

    for parse in (lambda: cli.build_parser().parse_args(["status", "--coordinator", address]),
                  lambda: peer_cli.build_config(["--coordinator", address, "--device", "cpu"])):
        with pytest.raises(SystemExit) as e:
            parse()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "HOST:PORT" in err and address in err and err.count("\n") == 1, err
    with pytest.raises(api.ApiError) as ae:
        api.JobClient(address)
    assert ae.value.code == api.BAD_INPUT and "HOST:PORT" in str(ae.value)


def test_status_history_table() -> None:
    rounds = [types_pb2.RoundMetrics(round=1, epoch=1, members=2, samples=64, train_loss=2.25, test_accuracy=0.5,
                                     test_loss=2.0, test_evaluated=True, duration_ms=120, train_ms=40, exchange_ms=30),
              types_pb2.RoundMetrics(round=2, epoch=2, members=1, samples=128, train_loss=2.0, test_accuracy=0.5,
                                     test_evaluated=False, duration_ms=90, train_ms=35, exchange_ms=0)]
    lines = cli.history_table(rounds)
    assert lines[0].split() == ["ROUND", "EPOCH", "PEERS", "SAMPLES", "LOSS", "ACC", "TEST_LOSS", "ROUND_MS",
                                "TRAIN_MS", "EXCH_MS"]
    assert lines[1].split() == ["1", "1", "2", "64", "2.2500", "0.5000", "2.0000", "120", "40", "30"]
    assert lines[2].split() == ["2", "2", "1", "128", "2.0000", "-", "-", "90", "35", "0"]  # no evaluation
    assert cli.history_table(rounds, gossip=True)[0].split()[-1] == "CONSENSUS"


class _Unavailable(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


def test_not_found_is_bad_input_and_unreachable_is_a_failure() -> None:
    class NotFound(_Unavailable):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.NOT_FOUND

        def details(self) -> str:
            return "job job-x not found"

    e = api.api_error(NotFound(), "h:1")
    assert (e.code, str(e)) == (api.BAD_INPUT, "job job-x not found")
    e = api.api_error(_Unavailable(), "h:1")
    assert e.code == api.FAILED and "cannot reach coordinator at h:1" in str(e)


def _fake_clock(now: list[float]) -> type:
    """A stop event whose waiting advances the fake clock ``now[0]`` (it is never set)."""

    class Clock:
        def is_set(self) -> bool:
            return False

        def wait(self, s: float) -> bool:
            now[0] += s
            return False

    return Clock


def test_an_unreachable_coordinator_is_logged_a_few_times_a_minute(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Ten simulated minutes of retries against a dead address: a line when it starts, then one
    every LOG_EVERY_S, each asking to check the address; one line when it answers again."""
    from dml.peer import client as pc

    now = [1000.0]
    monkeypatch.setattr(pc.time, "monotonic", lambda: now[0])
    Clock = _fake_clock(now)

    cc = pc.ControlClient("127.0.0.1:1", Clock())  # type: ignore[arg-type]
    minutes = 10
    calls = [0]

    def fn() -> str:
        calls[0] += 1
        if now[0] < 1000.0 + minutes * 60:
            raise _Unavailable()
        return "ok"

    try:
        with caplog.at_level(logging.DEBUG, logger=pc.__name__):
            assert cc.call(fn, "register") == "ok"
    finally:
        cc.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert calls[0] > minutes * 60  # retries stay frequent: a restarted coordinator is found at once
    every = minutes * 60 / pc.LOG_EVERY_S  # lines at 0, LOG_EVERY_S, 2 LOG_EVERY_S, ... (retries land just after)
    assert every <= len(warnings) <= every + 1, warnings
    assert len(warnings) <= 4 * minutes
    assert all("127.0.0.1:1" in w and "check" in w for w in warnings), warnings
    assert "cannot reach the coordinator" in warnings[0] and "still cannot reach" in warnings[1]
    again = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(again) == 1 and "answers again" in again[0]


def test_a_refused_coordinator_is_logged_naming_the_peer_whichever_call_met_it_first(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A coordinator of another cluster answers: the client logs one line for all its calls
    (then one every LOG_EVERY_S), so whichever call met it first (here the round loop's report,
    not the heartbeat) must say which peer refuses it; the heartbeat's refusal just after adds
    no line."""
    from dml.common.version import PROTOCOL_VERSION
    from dml.peer import client as pc
    from dml.v1 import control_pb2

    now = [1000.0]
    monkeypatch.setattr(pc.time, "monotonic", lambda: now[0])
    Clock = _fake_clock(now)

    class Stub:  # the coordinator of cluster-a registers the peer
        def RegisterPeer(self, req: control_pb2.RegisterPeerRequest, timeout: float) -> control_pb2.RegisterPeerResponse:  # noqa: N802
            return control_pb2.RegisterPeerResponse(peer_id="peer-7", cluster_id="cluster-a", heartbeat_interval_ms=200,
                                                    protocol_version=PROTOCOL_VERSION)

    cc = pc.ControlClient("127.0.0.1:1", Clock())  # type: ignore[arg-type]
    cc.stub = Stub()  # type: ignore[assignment]
    refusals = [3]

    def report() -> str:  # another cluster's coordinator refuses the first three attempts
        if refusals[0]:
            refusals[0] -= 1
            raise pc.WrongCluster("cluster-b")
        return "ok"

    try:
        cc.register("127.0.0.1:9", "cpu", 0)
        with caplog.at_level(logging.INFO, logger=pc.__name__):
            assert cc.call(report, "report round") == "ok"
            cc.note_wrong_cluster("heartbeat", "cluster-b")
    finally:
        cc.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("peer peer-7: report round: refusing the coordinator at 127.0.0.1:1: it belongs to "
                                "cluster cluster-b, this peer to cluster cluster-a"), errors


def _to_closed_pipe(argv: list[str], unbuffered: bool) -> subprocess.CompletedProcess[str]:
    """Runs ``python argv`` with stdout a pipe whose reader is gone (what `| head` leaves)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, *argv], stdout=w, stderr=subprocess.PIPE, text=True, timeout=60,
                              cwd=ROOT, env=env)
    finally:
        os.close(w)


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_closed_pipe_ends_quietly(unbuffered: bool) -> None:
    """Output into a closed pipe: exit 141 (as SIGPIPE would), nothing on stderr, whether the
    write fails at once (unbuffered) or at the last flush."""
    code = "from dml.common.args import run_quietly; run_quietly(lambda: print('one line') or 0)"
    out = _to_closed_pipe(["-c", code], unbuffered)
    assert out.returncode == 141 and out.stderr == "", out.stderr
    for argv in (["--help"], ["submit", "--help"], ["--version"]):
        out = _to_closed_pipe(["-m", "dml.client.cli", *argv], unbuffered)
        assert out.returncode in (0, 141) and out.stderr == "", (argv, out.stderr)


def test_int_in_and_float_in() -> None:
    assert cliargs.int_in(1, 5)("5") == 5
    assert cliargs.int_in(1, None, 7)("0") == 7
    assert cliargs.float_in(0, 1, lo_open=False)("0") == 0.0
    for bad in ("nan", "inf", "-0.5", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\[0, 1\]"):
            cliargs.float_in(0, 1, lo_open=False)(bad)


def test_dml_peer_cluster_id_is_32_hex_digits_or_unset(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from dml.peer import cli as peer_cli

    monkeypatch.delenv("DML_CLUSTER_ID", raising=False)
    cid = "0123456789abcdef" * 2
    assert peer_cli.build_parser().parse_args([]).cluster_id == ""
    assert peer_cli.build_parser().parse_args(["--cluster-id", cid.upper()]).cluster_id == cid
    monkeypatch.setenv("DML_CLUSTER_ID", cid)
    assert peer_cli.build_parser().parse_args([]).cluster_id == cid
    with pytest.raises(SystemExit) as e:
        peer_cli.build_parser().parse_args(["--cluster-id", "not-an-id"])
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--cluster-id: a cluster id is 32 hex digits" in line


def test_sharding_flags_reach_the_spec_and_the_peer_config(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from dml.peer import cli as peer_cli

    a = cli.build_parser().parse_args(["submit", "--sharding", "classes:2", "--min-shard-samples", "40"])
    spec = cli.spec_from_args(a)
    assert (spec.sharding, spec.min_shard_samples) == ("classes:2", 40)
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["submit", "--min-shard-samples", "0"])
    assert e.value.code == 2 and "at least 1" in capsys.readouterr().err
    cfg, _ = peer_cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu", "--max-samples", "500"])
    assert cfg.max_samples == 500
    monkeypatch.setenv("DML_MAX_SAMPLES", "70")
    assert peer_cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu"])[0].max_samples == 70
    with pytest.raises(SystemExit) as e:
        peer_cli.build_config(["--coordinator", "127.0.0.1:1", "--device", "cpu", "--max-samples", "-1"])
    assert e.value.code == 2 and "--max-samples" in capsys.readouterr().err


def test_dml_peer_cache_flags_reach_the_peer_config(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from dml.peer import cli as peer_cli

    monkeypatch.delenv("DML_CACHE_DIR", raising=False)
    monkeypatch.delenv("DML_CACHE_MAX_GB", raising=False)
    monkeypatch.chdir(tmp_path)
    base = ["--coordinator", "127.0.0.1:1", "--device", "cpu"]
    cfg, _ = peer_cli.build_config(base)
    assert cfg.cache_dir == tmp_path.resolve() / ".dml-cache" and cfg.cache_max_bytes == 0
    cfg, _ = peer_cli.build_config([*base, "--cache-dir", "c", "--cache-max-gb", "1.5"])
    assert cfg.cache_dir == tmp_path.resolve() / "c" and cfg.cache_max_bytes == 1_500_000_000
    monkeypatch.setenv("DML_CACHE_MAX_GB", "0.25")
    assert peer_cli.build_config(base)[0].cache_max_bytes == 250_000_000
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit) as e:
            peer_cli.build_config([*base, "--cache-max-gb", bad])
        assert e.value.code == 2 and "--cache-max-gb" in capsys.readouterr().err


def test_shards_table_and_id_ranges() -> None:
    assert cli.id_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8" and cli.id_ranges([]) == "-"
    d = {"job_id": "j", "train_samples": 30, "num_classes": 3, "unassigned": [3],
         "peers": [{"peer_id": "pa", "shards": [0, 1], "samples": 20, "label_counts": [10, 0, 10]},
                   {"peer_id": "pb", "shards": [2], "samples": 5, "label_counts": None}]}
    lines = cli.shards_table(d)
    assert lines[1].split()[:4] == ["pa", "2", "20", "0-1"] and lines[1].endswith("0:10 2:10")
    assert lines[2].split() == ["pb", "1", "5", "2", "-"]
    assert lines[3] == "2 peers hold 25 of 30 training samples (3 labels)"
    assert lines[4].startswith("unassigned: 1 shards (3)")


def test_shards_table_shows_each_members_data_source_bytes_fetched_hits_and_cached_shards() -> None:
    data = {"source": "store", "label": "store: fetched", "bytes_fetched": 3 << 20, "chunks_fetched": 3,
            "cache_hits": 1, "damaged_refetched": 0, "cached_shards": [0, 1, 2], "cache_free_bytes": None}
    d = {"job_id": "j", "train_samples": 30, "num_classes": 0, "unassigned": [],
         "peers": [{"peer_id": "pa", "shards": [0, 1], "samples": 20, "label_counts": None, "data": data},
                   {"peer_id": "pb", "shards": [2], "samples": 10, "label_counts": None, "data": None}]}
    lines = cli.shards_table(d)
    assert lines[0].split()[:9] == ["PEER", "SHARDS", "SAMPLES", "SHARD_IDS", "DATA", "FETCHED", "CHUNKS", "HITS", "CACHED"]
    assert lines[1].split() == ["pa", "2", "20", "0-1", "store:", "fetched", "3.0", "MiB", "3", "1", "0-2", "-"]
    assert lines[2].split() == ["pb", "1", "10", "2", "-", "-", "-", "-", "-", "-"], "not reported"
    assert [api.data_source_label("store", 0), api.data_source_label("store", 1), api.data_source_label("local", 0)] \
        == ["store: cache", "store: fetched", "local"]


@pytest.mark.parametrize("argv", [["--coordinator", "nohostport"], ["--coordinator", "127.0.0.1:1", "--device", "tpu"],
                                  ["--coordinator", "127.0.0.1:1", "--chunk-elems", "-1"]])
def test_dml_peer_answers_a_bad_flag_before_loading_torch(argv: list[str]) -> None:
    """A mistyped flag gets its exit 2 at once, not after torch's seconds of start-up."""
    code = ("import sys\nfrom dml.peer import cli\ntry:\n    cli.build_config(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr)


def test_pool_flags_reach_the_spec_and_the_peer_config(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from dml.peer import cli as peer_cli

    spec = cli.spec_from_args(cli.build_parser().parse_args(["submit", "--pool", "gpu", "--max-peers", "3"]))
    assert (spec.pool, spec.max_peers) == ("gpu", 3)
    assert (cli.spec_from_args(cli.build_parser().parse_args(["submit"])).pool, spec.__class__().max_peers) == ("", 0)
    for bad in (["--pool", "../x"], ["--max-peers", "-1"]):
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args(["submit", *bad])
        assert e.value.code == 2 and bad[0] in capsys.readouterr().err
    base = ["--coordinator", "127.0.0.1:1", "--device", "cpu"]
    assert peer_cli.build_config(base)[0].pool == "default"
    assert peer_cli.build_config([*base, "--pool", "a100"])[0].pool == "a100"
    monkeypatch.setenv("DML_POOL", "edge-1")
    assert peer_cli.build_config(base)[0].pool == "edge-1"
    with pytest.raises(SystemExit) as e:
        peer_cli.build_config([*base, "--pool", "a b"])
    assert e.value.code == 2 and "pool name" in capsys.readouterr().err


def test_peers_table() -> None:
    row = {"peer_id": "peer-1", "address": "10.0.0.1:5000", "pool": "a", "device": "cpu", "memory_bytes": 2 << 30,
           "samples_per_s": 1234.5, "max_samples": None, "state": "training", "job_id": "job-1",
           "utilisation": {"training": 0.5, "exchanging": 0.25, "idle": 0.25}, "registered_unix_ms": 1}
    idle = dict(row, peer_id="peer-2", memory_bytes=None, samples_per_s=None, state="idle", job_id="",
                utilisation={"training": 0.0, "exchanging": 0.0, "idle": 1.0})
    lines = cli.peers_table([row, idle])
    assert lines[1].split() == ["peer-1", "a", "cpu", "2.0", "GiB", "1234", "training", "job-1", "50%", "25%", "25%",
                                "10.0.0.1:5000"]
    assert lines[2].split()[2:9] == ["cpu", "-", "-", "idle", "-", "0%", "0%"]
    assert lines[-1].startswith("2 peers")


def test_placement_flags_reach_the_spec_and_sharding_flags_are_refused_for_local_jobs(
        capsys: pytest.CaptureFixture[str]) -> None:
    parse = cli.build_parser().parse_args
    spec = cli.spec_from_args(parse(["submit", "--placement", "local", "--local-data", "clinic"]))
    assert (spec.placement, spec.local_data, spec.num_shards) == ("local", "clinic", 0)
    assert cli.spec_from_args(parse(["submit"])).placement == "shared"
    for argv, words in ((["--placement", "local"], "needs --local-data"),
                        (["--local-data", "clinic"], "use it with --placement local"),
                        (["--placement", "local", "--local-data", "c", "--num-shards", "8"], "--num-shards"),
                        (["--placement", "local", "--local-data", "c", "--sharding", "classes:2"], "--sharding"),
                        (["--placement", "local", "--local-data", "c", "--dataset", "d"], "--dataset"),
                        (["--placement", "local", "--local-data", "c", "--min-shard-samples", "3"], "--min-shard")):
        assert cli.cmd_submit(parse(["submit", *argv])) == 2, argv  # before any call: no coordinator here
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    for bad in (["--placement", "nfs"], ["--local-data", "../etc"]):
        with pytest.raises(SystemExit) as e:
            parse(["submit", *bad])
        assert e.value.code == 2


def test_dml_peer_data_flags_reach_the_peer_config(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dml.peer import cli as peer_cli

    (tmp_path / "a").mkdir()
    (tmp_path / "b.csv").write_text("x,y\n")
    base = ["--coordinator", "127.0.0.1:1", "--device", "cpu"]
    cfg = peer_cli.build_config([*base, "--data", f"clinic={tmp_path / 'a'}", "--data", f"b.v2={tmp_path / 'b.csv'}"])[0]
    assert cfg.local_data == (("clinic", tmp_path / "a"), ("b.v2", tmp_path / "b.csv"))
    assert peer_cli.build_config(base)[0].local_data == ()
    for bad, words in (([f"../x={tmp_path}"], "not allowed"), ([f"c={tmp_path / 'nope'}"], "no such folder or file"),
                       (["clinic"], "want NAME=PATH"), ([f"c={tmp_path}", "--data", f"c={tmp_path / 'a'}"], "each NAME once")):
        with pytest.raises(SystemExit) as e:
            peer_cli.build_config([*base, "--data", *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err, err


def test_dml_peer_answers_a_bad_data_flag_before_loading_torch(tmp_path: pathlib.Path) -> None:
    code = ("import sys\nfrom dml.peer import cli\ntry:\n    cli.build_config(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, "--coordinator", "127.0.0.1:1", "--data", f"x={tmp_path}/no"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_status_line_says_how_much_local_data_is_present() -> None:
    st = jobs_pb2.JobStatus(job_id="job-1", state=types_pb2.JOB_STATE_RUNNING, round=3,
                            spec=types_pb2.JobSpec(rounds=10, placement="local", local_data="c"),
                            data_present_samples=750, data_seen_samples=1000, data_sources_present=3,
                            data_sources_seen=4)
    assert "data present 75% (750 of 1000 samples, 3 of 4 peers)" in cli.status_line(st)
    assert "data present" not in cli.status_line(jobs_pb2.JobStatus(job_id="j", spec=types_pb2.JobSpec(rounds=1)))
    row = {"peer_id": "peer-1", "address": "10.0.0.1:5000", "pool": "a", "device": "cpu", "memory_bytes": None,
           "samples_per_s": None, "max_samples": None, "state": "idle", "job_id": "",
           "utilisation": {"training": 0.0, "exchanging": 0.0, "idle": 1.0}, "registered_unix_ms": 1,
           "local_datasets": ["clinic", "xray"]}
    assert cli.peers_table([row])[1].endswith("data clinic,xray")
