"""python -m benchmarks.loadtest: option parsing, answer judging, verdicts and report on made-up results, and the
command itself for a few seconds against real servers this module starts (API keys on; one over TLS with a
certificate made here), single process and distributed (a master and two worker commands).

No speed is asserted: generous and impossible objectives only decide the exit status (DESIGN §7).
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import hashlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from benchmarks.inputs import InputSet, make_input_set
from benchmarks.loadtest import command, dicoms, options, report, runner, traffic
from benchmarks.loadtest.runner import ErrorCount, KindStats, Level, LevelResult
from benchmarks.servers import ServerSpec, free_port, start_server, stop_server, stop_server_process

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / "models" / "demo-synthetic"
KEY = "lt-" + os.urandom(16).hex()  # a fresh key per session: any trace of it in an output is a leak
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()
FAST = "--warmup 1s --duration 3s"  # a few seconds of load per level


# --- pure parts -----------------------------------------------------------------------------------------


def test_mix_is_normalised_and_unknown_kinds_are_refused():
    """--mix weights are relative shares; a kind the service has no request for, or a bad weight, is an error."""
    assert traffic.parse_mix("predict=80,sr=10,studies=10") == pytest.approx(
        {"predict": 0.8, "sr": 0.1, "studies": 0.1}
    )
    assert traffic.parse_mix("png=1,gsps=3") == pytest.approx({"png": 0.25, "gsps": 0.75})
    for bad in ("predict=80,xray=20", "predict", "predict=x", "predict=0", "predict=1,predict=2"):
        with pytest.raises(ValueError):
            traffic.parse_mix(bad)


def test_option_values_parse_like_locust_time_spans_and_rates():
    """Durations (60s, 1m30s, 2.5s), levels (1,2,4), rates (30/min, 2/s) and think times (2, 1-3) parse or raise."""
    assert [options.parse_duration(t) for t in ("60s", "1m30s", "90", "2.5s", "1h")] == [60, 90, 90, 2.5, 3600]
    assert options.parse_levels("1,2,4") == (1, 2, 4)
    assert options.parse_rates("30/min,2/s,3600/h") == (0.5, 2.0, 1.0)
    assert options.parse_think_time("1-3") == (1.0, 3.0) and options.parse_think_time("2s") == (2.0, 2.0)
    assert options.parse_warmup("0") == 0 and options.parse_size("1643x1349") == (1643, 1349)
    for parse, bad in (
        (options.parse_duration, "0s"),
        (options.parse_duration, "soon"),
        (options.parse_levels, "0,1"),
        (options.parse_rate, "30"),
        (options.parse_rate, "30/week"),
        (options.parse_think_time, "3-1"),
        (options.parse_size, "3x3"),
    ):
        with pytest.raises(ValueError):
            parse(bad)


def test_slo_limits_apply_per_request_kind():
    """--slo-p99-ms 800,studies=3000: studies get 3000 ms, every other kind 800 ms; the error rate is in percent."""
    slo = options.parse_slo("800,studies=3000", 0.5)
    assert (slo.p99_limit("predict"), slo.p99_limit("studies"), slo.max_error_rate) == (800, 3000, 0.005)
    assert options.parse_slo(None, 0.1).p99_limit("predict") is None
    for bad in ("fast", "x=100", "-5"):
        with pytest.raises(ValueError):
            options.parse_slo(bad, 0.1)


def test_judge_accepts_each_kinds_answer_and_names_every_failure():
    """A success is the kind's own answer (JSON, DICOM, PNG, all instances); a failure reads 'HTTP <status> <code>'."""
    dicom = b"\0" * 128 + b"DICM" + b"rest"
    assert traffic.judge("predict", 200, b'{"findings": []}', "application/json") is None
    assert traffic.judge("sr", 200, dicom, "application/dicom") is None
    assert traffic.judge("png", 200, traffic.PNG_MAGIC + b"...", "image/png") is None
    assert traffic.judge("studies", 200, json.dumps({"results": [{}, {}, {}]}).encode(), "application/json", 3) is None
    assert traffic.judge("sr", 200, b'{"findings": []}', "application/json").startswith("HTTP 200 - (unexpected body")
    overloaded = json.dumps({"error": {"code": "overloaded", "message": "The queue is full.", "request_id": "r1"}})
    assert (
        traffic.judge("predict", 429, overloaded.encode(), "application/json")
        == "HTTP 429 overloaded: The queue is full."
    )
    assert traffic.judge("png", 502, b"<html>bad gateway</html>", "text/html").startswith("HTTP 502 - (not the service")
    partial = json.dumps({"results": [{}], "failures": [{"index": 1, "code": "unusable_image"}]}).encode()
    assert (
        traffic.judge("studies", 202, partial, "application/json", 2)
        == "HTTP 202 unusable_image: 1 of 2 instances failed"
    )


def test_failures_are_counted_by_status_and_code_from_locusts_csv():
    """locust's failures CSV (its repr of our failure text) is regrouped by kind, HTTP status and error code."""
    rows = [
        ("predict", "CatchResponseError('HTTP 429 overloaded: The inference queue is full.')", 7),
        ("predict", "CatchResponseError('HTTP 429 overloaded: another message')", 2),
        ("sr", "CatchResponseError('HTTP 503 not_ready')", 1),
        ("studies", "ConnectionRefusedError(111, 'Connection refused')", 4),
    ]
    text = "Method,Name,Error,Occurrences\n" + "".join(
        f'POST,{name},"{error}",{count}\n' for name, error, count in rows
    )
    errors = runner.parse_failures(text)
    assert [(e.kind, e.status, e.code, e.count) for e in errors] == [
        ("predict", "429", "overloaded", 9),
        ("studies", "no answer", "ConnectionRefusedError", 4),
        ("sr", "503", "not_ready", 1),
    ]
    assert "The inference queue is full" in errors[0].example


def test_a_kind_seen_only_in_the_warm_up_is_not_judged(tmp_path):
    """After the warm-up reset locust keeps an empty row (N/A percentiles) for a kind not sent since: it is left
    out instead of failing the level with a missing p99."""
    header = (
        "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
        "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%"
    )
    rows = [
        "POST,png,0,0,0,0,0,0,0,0,0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A",
        "POST,predict,10,0,50,60,20,90,1000,2.5,0,50,60,60,70,80,90,90,90,90,90,90",
        ",Aggregated,10,0,50,60,20,90,1000,2.5,0,50,60,60,70,80,90,90,90,90,90,90",
    ]
    (tmp_path / "level-01_stats.csv").write_text("\n".join([header, *rows]) + "\n")
    window = {"measured_from": 100.0, "stopped_at": 104.0, "counters": {"images:predict": 10}}
    result = runner.read_level(Level(1, 1), tmp_path / "level-01", window)
    assert [k.kind for k in result.kinds] == ["predict"] and result.total.rps == 2.5
    assert report.check_level(result, options.parse_slo("1000", 0.1)).met


def test_stow_body_is_read_back_by_the_services_multipart_reader():
    """The `studies` body is the service's own idea of multipart/related: every instance comes back intact."""
    from service.api.upload import read_multipart

    instances = [b"\0" * 128 + b"DICM" + os.urandom(2000) for _ in range(3)]
    body = traffic.stow_body(instances)

    async def chunks():
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    parts = asyncio.run(read_multipart(chunks(), traffic.STOW_BOUNDARY, 1 << 20))
    assert [bytes(part.body) for part in parts] == instances
    assert {part.content_type for part in parts} == {"application/dicom"}


def test_users_of_every_worker_start_at_different_files():
    """User numbers are unique across worker processes, so up to N users start at N different files."""
    numbers = [traffic.global_user_number(local, worker, 3) for worker in range(3) for local in range(4)]
    assert sorted(numbers) == list(range(12))
    assert len({traffic.first_file(number, 12) for number in numbers}) == 12


def test_arrival_schedule_keeps_the_rate_and_hands_each_arrival_out_once():
    """Open loop: claimed arrival times are increasing and average the requested rate (Poisson, seeded)."""
    schedule = traffic.ArrivalSchedule(rate_per_s=2.0, seed=1, start=100.0)
    times = [schedule.claim() for _ in range(20_000)]
    assert all(b > a for a, b in itertools.pairwise(times))
    assert (times[-1] - 100.0) / len(times) == pytest.approx(0.5, rel=0.03)


def test_dicom_files_are_found_recursively_by_their_marker(tmp_path):
    """--dicoms: Part 10 files anywhere below the folder, whatever their names; other files and DICOMDIR are skipped."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    dicom = b"\0" * 128 + b"DICM" + b"x" * 10
    (tmp_path / "a" / "b" / "IM0001").write_bytes(dicom)
    (tmp_path / "z.dcm").write_bytes(dicom)
    (tmp_path / "DICOMDIR").write_bytes(dicom)
    (tmp_path / "notes.txt").write_text("not a DICOM")
    assert dicoms.dicom_files(tmp_path) == [tmp_path / "a" / "b" / "IM0001", tmp_path / "z.dcm"]
    loaded = dicoms.Inputs.load(tmp_path)
    assert loaded.body(3) == dicom and len(loaded) == 2


def test_phantoms_need_no_training_extras(tmp_path):
    """Without --dicoms the phantoms come from training.synthetic's default encodings with torch, torchvision,
    imagecodecs, pyjpegls and matplotlib all unimportable (only the service's own dependencies)."""
    script = f"""
import sys
for name in ("torch", "torchvision", "imagecodecs", "jpeg_ls", "matplotlib", "onnx", "onnxscript"):
    sys.modules[name] = None
from pathlib import Path
from benchmarks.loadtest import dicoms
folder = dicoms.make_phantoms(dicoms.phantom_set(3, 256, 208), cache=Path({str(tmp_path)!r}))
print(len(dicoms.dicom_files(folder)))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
    for path in dicoms.dicom_files(next(tmp_path.iterdir())):
        ds = pydicom.dcmread(path)
        assert (ds.Rows, ds.Columns) == (256, 208) and ds.SeriesDescription == "SYNTHETIC PHANTOM - NOT CLINICAL DATA"


def test_command_line_in_the_report_hides_the_key():
    """The recorded command replaces the --api-key value (both spellings) with REDACTED."""
    text = command.redacted_command(["--host", "http://h", "--api-key", "s3cret", "--api-key=s3cret2", "--users", "2"])
    assert "s3cret" not in text and text.count("REDACTED") == 2 and "--users 2" in text


def made_up_level(
    index: int, users: int, p99: float, failures: int = 0, late: int = 0, rate: float | None = None
) -> LevelResult:
    kinds = [
        KindStats("predict", 100, failures, 9.0, p99 / 3, p99 * 0.8, p99, p99 * 1.1, p99 / 2),
        KindStats("studies", 10, 0, 1.0, p99 / 2, p99 * 0.9, p99 * 1.2, p99 * 1.3, p99 / 2),
    ]
    total = KindStats("all", 110, failures, 10.0, p99 / 3, p99 * 0.8, p99 * 1.1, p99 * 1.3, p99 / 2)
    errors = [ErrorCount("predict", "429", "overloaded", failures, "HTTP 429 overloaded: full")] if failures else []
    return LevelResult(
        Level(index, users, rate),
        1000.0,
        1010.0,
        total,
        kinds,
        errors,
        images_per_s=12.0,
        generator_cpu_cores=0.2,
        generator_processes=1,
        counters={"arrivals": 100, "late_arrivals": late},
        max_lag_s=0.5 if late else 0.0,
    )


def test_levels_are_judged_on_p99_per_kind_errors_and_late_arrivals():
    """A level misses when a kind's p99 is over its limit, too many requests failed, none succeeded, or (open loop)
    arrivals had to wait for a free user."""
    slo = options.parse_slo("1000,studies=2000", 1.0)
    assert report.check_level(made_up_level(1, 1, p99=500), slo).met
    missed = report.check_level(made_up_level(2, 2, p99=1500), slo)
    assert not missed.met and missed.reasons == ("predict p99 1500 ms > 1000 ms",)
    assert "failed" in report.check_level(made_up_level(3, 4, p99=500, failures=5), slo).reasons[0]
    late = report.check_level(made_up_level(4, 8, p99=500, late=5, rate=1.0), slo)
    assert not late.met and "waited for a free user" in late.reasons[0]
    nothing = dataclass_replace_total(made_up_level(5, 8, p99=500), failures=110)
    assert "no request succeeded" in report.check_level(nothing, slo).reasons


def dataclass_replace_total(result: LevelResult, **changes) -> LevelResult:
    import dataclasses

    result.total = dataclasses.replace(result.total, **changes)
    return result


def test_report_files_from_made_up_results(tmp_path):
    """summary.md (verdict, capacity line, tables, errors), the CSVs, results.json and both plots are written."""
    made_up = report.Report(
        command="python -m benchmarks.loadtest --host http://h",
        host="http://h",
        started_at="2026-01-01T00:00:00+00:00",
        slo=options.parse_slo("1000", 0.1),
        levels=[made_up_level(1, 1, 300), made_up_level(2, 4, 2000, failures=3)],
        machine={"CPU": "Test CPU"},
        service={"URL": "http://h"},
        load={"Mix": "predict 100%"},
    )
    summary = report.write_report(made_up, tmp_path).read_text()
    assert "**FAIL**: 1 of 2 levels missed the objective." in summary
    assert "Most throughput within the objective: **10.00 requests/s**" in summary and "`overloaded`" in summary
    for name in ("levels.csv", "requests.csv", "errors.csv", "results.json", "throughput.png", "latency.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    levels = (tmp_path / "levels.csv").read_text().splitlines()
    assert len(levels) == 3 and levels[1].endswith("True,") and "False" in levels[2]
    assert json.loads((tmp_path / "results.json").read_text())["passed"] is False


def test_a_sweep_cut_short_is_never_a_pass():
    """Levels that all met the objective but fewer than planned (Ctrl-C, say) read INCOMPLETE, not PASS."""
    cut = report.Report(
        command="c",
        host="http://h",
        started_at="t",
        slo=options.parse_slo("1000", 0.1),
        levels=[made_up_level(1, 1, 300)],
        stopped_early="interrupted (Ctrl-C)",
        planned_levels=3,
    )
    assert not cut.passed
    assert "**INCOMPLETE**: 1 of 3 planned levels ran. Stopped early: interrupted (Ctrl-C)." in report.render_summary(
        cut
    )


# --- the command against real servers ------------------------------------------------------------------


def run_loadtest(options: str, key: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    """The command as a tester types it (`options` split like a shell would), the key given in the environment."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.loadtest", *shlex.split(options)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"CXR_LOADTEST_API_KEY": key},
    )


def assert_no_key(out: Path, *texts: str) -> None:
    """The key is nowhere: not in any file the run wrote (HTML, CSVs, logs included) nor in what it printed."""
    for text in texts:
        assert KEY not in text
    files = [path for path in out.rglob("*") if path.is_file()]
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


def server_env() -> dict[str, str]:
    return {
        "CXR_AUTH_ENABLED": "true",
        "CXR_API_KEY_SHA256S": json.dumps([f"loadtest:{DIGEST}"]),
        "CXR_MODELS": str(PACK),
        "CXR_MAX_BATCH_SIZE": "4",
    }


@pytest.fixture(scope="module")
def inputs_folder(tmp_path_factory) -> Path:
    """Four small phantoms, in a nested folder beside a file that is not DICOM (as --dicoms may be given)."""
    root = tmp_path_factory.mktemp("dicoms")
    spec = InputSet("lt", None, "mixed", count=4, rows=512, cols=420, bits_stored=None, photometric=None, first_seed=7)
    (root / "send" / "day1").mkdir(parents=True)
    for index, path in enumerate(make_input_set(spec, cache=root / "cache")):
        (root / "send" / "day1" / f"IM{index:04d}").write_bytes(path.read_bytes())
    (root / "send" / "README.txt").write_text("not a DICOM")
    return root / "send"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The service (demo pack) on a free loopback port, API keys on, logging one line per request."""
    command = [sys.executable, "-m", "service", "--port", "{port}", "--log-level", "info"]
    running = start_server(
        ServerSpec("cxr", "service", command, "auth on", env=server_env()), tmp_path_factory.mktemp("server-logs")
    )
    yield running
    stop_server(running)


def request_times(log_path: Path) -> list[float]:
    """time.time() of each prediction request the server logged (its access line, written when answered)."""
    pattern = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO service: POST /v1/(predict|studies) ")
    times = []
    for line in log_path.read_text().splitlines():
        if found := pattern.match(line):
            stamp = datetime.datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S").timestamp()
            times.append(stamp + int(found[2]) / 1000)
    return times


def assert_window_counts_match_the_server(out: Path, level: int, log_path: Path) -> None:
    """The requests counted in a level are the ones the server answered inside its measured window: the warm-up's
    are not added, the last seconds' not lost (only requests in flight at either edge may differ, one per user)."""
    window = json.loads((out / "locust" / f"level-{level:02d}_window.json").read_text())
    rows = list(csv.DictReader((out / "levels.csv").open()))
    counted = int(rows[level - 1]["requests"])
    served = [t for t in request_times(log_path) if window["measured_from"] <= t <= window["stopped_at"]]
    assert abs(counted - len(served)) <= int(rows[level - 1]["users"]) + 2, (counted, len(served))


@pytest.mark.parametrize("kind", traffic.KINDS)
def test_every_request_kind_gets_the_answer_the_load_test_expects(server, inputs_folder, kind):
    """Each kind, sent exactly as the locustfile sends it (path, headers, STOW body), is a success for judge()."""
    bodies = [path.read_bytes() for path in dicoms.dicom_files(inputs_folder)[:3]]
    spec = traffic.REQUESTS[kind]
    body = traffic.stow_body(bodies) if kind == "studies" else bodies[0]
    headers = spec.headers | {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(server.base_url + spec.path, content=body, headers=headers, timeout=120)
    verdict = traffic.judge(kind, response.status_code, response.content, response.headers["content-type"], 3)
    assert verdict is None, verdict


def test_generous_objective_passes_and_writes_the_report(server, inputs_folder, tmp_path):
    """Every kind of request for two levels with a generous p99: exit 0, the report, locust's HTML, counts that match
    the server's own log, and the key (from the environment) nowhere."""
    out = tmp_path / "out"
    done = run_loadtest(
        f"--host {server.base_url} --sweep 1,2 {FAST} --dicoms {inputs_folder} --slo-p99-ms 60000 "
        f"--mix predict=40,sr=15,gsps=15,png=15,studies=15 --slo-error-rate 0 --out {out}",
        key=KEY,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    assert "**PASS**: all 2 levels met the objective." in summary and "No request failed" in summary
    assert "demo-synthetic" in summary and "4 DICOM files from" in summary
    kinds = {row["kind"] for row in csv.DictReader((out / "requests.csv").open())}
    assert "all" in kinds and len(kinds) > 1 and kinds <= {"all", *traffic.KINDS}  # which kinds: the draw's luck
    for name in (
        "levels.csv",
        "errors.csv",
        "results.json",
        "throughput.png",
        "latency.png",
        "locust/level-01.html",
        "locust/level-02.html",
        "locust/level-02_stats.csv",
    ):
        assert (out / name).is_file(), name
    for level in (1, 2):
        assert_window_counts_match_the_server(out, level, server.log_path)
    assert_no_key(out, done.stdout, done.stderr)


def test_impossible_objective_exits_1(server, inputs_folder, tmp_path):
    """A p99 limit of 1 ms cannot be met: exit 1, FAIL with the reason; the key given as --api-key is not recorded."""
    out = tmp_path / "out"
    done = run_loadtest(
        f"--host {server.base_url} --users 1 {FAST} --dicoms {inputs_folder} --slo-p99-ms 1 "
        f"--api-key {KEY} --out {out} --html last"
    )
    assert done.returncode == 1, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    assert "**FAIL**: 1 of 1 levels missed the objective." in summary and "p99" in summary and "> 1 ms" in summary
    assert "--api-key REDACTED" in summary
    assert_no_key(out, done.stdout, done.stderr)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("wrong-" + os.urandom(8).hex(), "refused the API key (HTTP 403 forbidden)"),
        ("", "requires an API key (HTTP 401 unauthorized)"),
    ],
    ids=["wrong-key", "no-key"],
)
def test_wrong_or_missing_key_exits_2_with_one_clear_line(server, inputs_folder, tmp_path, key, expected):
    """A refused or missing key stops the test before any load: exit 2, one line on stderr, no traceback."""
    done = run_loadtest(
        f"--host {server.base_url} --users 1 {FAST} --dicoms {inputs_folder} --out {tmp_path / 'out'}", key=key
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and expected in done.stderr and "Traceback" not in done.stderr
    assert key == "" or key not in done.stdout + done.stderr
    assert not (tmp_path / "out" / "summary.md").exists()


def test_unreachable_host_exits_2(inputs_folder, tmp_path):
    """Nothing listening on the port: exit 2 and 'cannot reach' in one line."""
    done = run_loadtest(
        f"--host http://127.0.0.1:{free_port()} --users 1 {FAST} --dicoms {inputs_folder} --out {tmp_path / 'out'}"
    )
    assert done.returncode == 2 and "cannot reach" in done.stderr and "Traceback" not in done.stderr


def test_distributed_master_with_two_worker_commands(server, inputs_folder, tmp_path):
    """--master waits for two `--worker` commands; the counts match the server's log as in a single process, and the
    workers exit by themselves once the master says the sweep is over."""
    port, out = free_port(), tmp_path / "out"
    worker = [
        sys.executable,
        "-m",
        "benchmarks.loadtest",
        "--worker",
        "--master-host",
        "127.0.0.1",
        "--master-port",
        str(port),
        "--dicoms",
        str(inputs_folder),
    ]
    workers = [
        subprocess.Popen(
            worker,
            cwd=ROOT,
            env=os.environ | {"CXR_LOADTEST_API_KEY": KEY},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        done = run_loadtest(
            f"--host {server.base_url} --users 4 --warmup 2s --duration 4s --dicoms {inputs_folder} "
            f"--slo-p99-ms 60000 --master --expect-workers 2 --master-bind-host 127.0.0.1 "
            f"--master-bind-port {port} --out {out}",
            key=KEY,
        )
        outputs = [process.communicate(timeout=60)[0] for process in workers]
    finally:
        for process in workers:
            stop_server_process(process, grace_s=1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [process.returncode for process in workers] == [0, 0], outputs
    assert all("the master finished its sweep" in text for text in outputs)
    window = json.loads((out / "locust" / "level-01_window.json").read_text())
    assert (window["workers"], window["workers_flushed"], window["counters"]["generator_processes"]) == (2, 2, 3)
    assert_window_counts_match_the_server(out, 1, server.log_path)
    assert_no_key(out, done.stdout, done.stderr, *outputs)


# --- TLS ------------------------------------------------------------------------------------------------------


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signs for 127.0.0.1 (PEM files: CA, server certificate, server key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loadtest test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """uvicorn serving the app over TLS itself (the README's factory command), API keys on; yields (URL, CA file)."""
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(folder)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "service.api.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ssl-keyfile",
            str(key),
            "--ssl-certfile",
            str(cert),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=os.environ | server_env(),
        stdout=(folder / "server.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"https://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", verify=ssl.create_default_context(cafile=ca), timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        stop_server_process(process, grace_s=1)
        pytest.fail(f"the TLS server never became ready: {(folder / 'server.log').read_text()[-2000:]}")
    yield url, ca
    stop_server_process(process)


def test_tls_unknown_ca_exits_2_and_says_how_to_fix_it(tls_server, inputs_folder, tmp_path):
    """A certificate from a CA the client does not trust: exit 2, naming --ca-bundle and --insecure."""
    url, _ = tls_server
    done = run_loadtest(f"--host {url} --users 1 {FAST} --dicoms {inputs_folder} --out {tmp_path / 'out'}", key=KEY)
    assert done.returncode == 2
    assert "cannot verify the TLS certificate" in done.stderr and "--ca-bundle" in done.stderr
    assert "Traceback" not in done.stderr


def test_tls_with_ca_bundle_in_open_loop(tls_server, inputs_folder, tmp_path):
    """https:// verified with --ca-bundle, requests arriving at a fixed rate (open loop): exit 0, arrivals counted."""
    url, ca = tls_server
    out = tmp_path / "out"
    done = run_loadtest(
        f"--host {url} --ca-bundle {ca} --arrival-rate 180/min --users 32 {FAST} --dicoms {inputs_folder} "
        f"--slo-p99-ms 60000 --out {out}",
        key=KEY,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    window = json.loads((out / "locust" / "level-01_window.json").read_text())
    assert window["counters"]["arrivals"] > 0
    summary = (out / "summary.md").read_text()
    assert "certificate verified against" in summary and "open loop" in summary and "180/min" in summary
    assert_no_key(out, done.stdout, done.stderr)


def test_tls_insecure_skips_verification(tls_server, inputs_folder, tmp_path):
    """--insecure reaches the same server without the CA file (and the report says the certificate was not verified)."""
    url, _ = tls_server
    out = tmp_path / "out"
    done = run_loadtest(
        f"--host {url} --insecure --users 1 {FAST} --dicoms {inputs_folder} --out {out} --html last",
        key=KEY,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "certificate **not verified** (--insecure)" in (out / "summary.md").read_text()
