"""The benchmark's pure parts: parsing, target rules, rendering, machine description. No load, no network,
no peer venv; numbers here are made up and never asserted about the code's speed."""

from __future__ import annotations

import dataclasses
import json
import os
import py_compile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import inputs, loadgen, machine, memory, peer_env, procfs, report, sampling, throughput
from benchmarks.inprocess import BatchRate, best_rate, timed_batches
from benchmarks.report import Footprint, HttpLevel, Results

ROOT = Path(__file__).resolve().parent.parent

LOCUST_CSV = """Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,\
Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
POST,predict,120,2,410,433.2,120.5,1503.4,1424.5,6.1,0.1,410,450,470,500,800,950,1200,1400,1500,1500,1500
,Aggregated,120,2,410,433.2,120.5,1503.4,1424.5,6.1,0.1,410,450,470,500,800,950,1200,1400,1500,1500,1500
"""


def level(
    service: str, users: int, rps: float, p99: float, input_set: str = "j2k", failures: int = 0, requests: int = 100
) -> HttpLevel:
    return HttpLevel(
        service=service,
        input_set=input_set,
        users=users,
        requests=requests,
        failures=failures,
        rps=rps,
        p50_ms=p99 / 2,
        p95_ms=p99 * 0.9,
        p99_ms=p99,
        measured_s=15.0,
        server_cpu_cores=1.8,
        locust_cpu_cores=0.2,
    )


def fake_results() -> Results:
    sets = [dataclasses.asdict(spec) | {"files": spec.count, "mean_mib": 4.2} for spec in inputs.INPUT_SETS]
    results = Results(
        command="python -m benchmarks.throughput --quick",
        mode="quick",
        machine={"CPU": "Test CPU", "Cores": "2"},
        plan=dataclasses.asdict(throughput.QUICK) | {"decode_workers": 2},
        input_sets=sets,
        services={
            "ours": {"title": "ours", "configuration": "batcher"},
            "naive": {"title": "naive FastAPI", "configuration": "per request"},
            "ray-serve": {"title": "Ray Serve", "configuration": "serve.batch"},
        },
        started_at="2026-01-01T00:00:00+00:00",
        duration_s=60.0,
    )
    for name in ("uncompressed", "j2k"):
        results.pipeline += [BatchRate(name, 1, 5.0, 10, 2.0), BatchRate(name, 16, 10.0, 32, 3.2)]
        results.http += [
            level("ours", 1, 4.0, 300, name),
            level("ours", 16, 9.5, 2000, name),
            level("naive", 1, 3.0, 400, name),
            level("naive", 16, 4.0, 5000, name, failures=3),
        ]
    results.model_only = [BatchRate("model-only", 1, 20.0, 60, 3.0), BatchRate("model-only", 16, 40.0, 160, 4.0)]
    results.footprints = [Footprint("ours", 2.5, 5, 250, 200, 600, 500, 580, 480)]
    results.skipped = {"ray-serve": "the peers' venv could not be set up (offline)"}
    return results


def test_modules_import_and_peer_files_compile():
    """Every benchmark module imports (no work at import); the files run elsewhere (locust, Ray) compile."""
    import benchmarks.peers.naive  # noqa: F401  (imports FastAPI only, like the service)

    for path in ("benchmarks/locustfile.py", "benchmarks/peers/ray_serve.py"):
        py_compile.compile(str(ROOT / path), doraise=True)


def test_parse_locust_stats_reads_the_aggregated_row_by_header():
    """The Aggregated row is read by column name: counts, percentiles and locust's own rate."""
    stats = loadgen.parse_locust_stats(LOCUST_CSV)
    assert (stats.requests, stats.failures) == (120, 2)
    assert (stats.p50_ms, stats.p95_ms, stats.p99_ms) == (410, 950, 1400)
    assert stats.requests_per_s == pytest.approx(6.1)
    with pytest.raises(ValueError):
        loadgen.parse_locust_stats(LOCUST_CSV, name="missing")


def test_locust_command_is_headless_with_equal_users_and_spawn_rate(tmp_path):
    """The command is the documented one: --headless -u N -r N --run-time Ts --csv PREFIX."""
    command = loadgen.locust_command("http://127.0.0.1:1", 8, 20, tmp_path / "u008")
    text = " ".join(command)
    assert "--headless" in command and "-u 8 -r 8" in text and "--run-time 20s" in text
    assert f"--csv {tmp_path / 'u008'}" in text


def test_pipeline_ratio_target():
    """Our best clean HTTP level against the pipeline's best batch size, at the 0.9 threshold."""
    http = [level("ours", 1, 4.0, 300), level("ours", 16, 9.5, 2000), level("ours", 32, 12.0, 3000, failures=1)]
    pipeline = [BatchRate("j2k", 16, 10.0, 32, 3.2)]
    check = report.check_pipeline_ratio(http, pipeline, "j2k")
    assert check.met is True and "ratio 0.95" in check.detail  # the level with a failure does not count
    assert report.check_pipeline_ratio(http, [BatchRate("j2k", 16, 11.0, 32, 3.2)], "j2k").met is False
    assert report.check_pipeline_ratio(http, pipeline, "uncompressed").met is None


def test_peer_target_needs_the_peers_peak_rate_at_no_worse_p99():
    """Met only by a level of ours with rate >= the peer's peak and p99 <= the peer's p99 at that peak."""
    peer = [level("naive", 1, 3.0, 400), level("naive", 16, 4.0, 5000)]
    ours_fast = [level("ours", 1, 4.0, 300), level("ours", 16, 9.5, 2000)]
    assert report.check_peer(ours_fast + peer, "naive", "j2k", "naive").met is True
    ours_slow_tail = [level("ours", 1, 2.0, 300), level("ours", 16, 9.5, 6000)]
    assert report.check_peer(ours_slow_tail + peer, "naive", "j2k", "naive").met is False
    assert report.check_peer(peer, "naive", "j2k", "naive").met is None


def test_rough_levels_decide_no_verdict():
    """A level with too few answers (or a p50 near the window) is left out: its rate neither meets a target for us
    nor sets the peer's peak; only rough levels give no verdict."""
    pipeline = [BatchRate("j2k", 16, 10.0, 32, 3.2)]
    rough_fast = level("ours", 64, 50.0, 300, requests=12)
    assert report.is_rough(rough_fast)
    clean = [level("ours", 1, 4.0, 300), rough_fast]
    check = report.check_pipeline_ratio(clean, pipeline, "j2k")
    assert check.met is False and "concurrency 1" in check.detail
    assert report.check_pipeline_ratio([rough_fast], pipeline, "j2k").met is None
    peer = [level("naive", 1, 3.0, 400), level("naive", 64, 40.0, 300, requests=10)]
    assert report.check_peer([level("ours", 1, 4.0, 300), *peer], "naive", "j2k", "naive").met is True
    assert report.check_peer([rough_fast, *peer[:1]], "naive", "j2k", "naive").met is None


def test_render_summary_from_fake_measurements():
    """The summary shows the machine, every target with its verdict, the tables and the skipped peer."""
    text = report.render_summary(fake_results(), ["throughput.png"])
    assert "| CPU | Test CPU |" in text
    assert text.count("HTTP throughput ≥ 0.9 × in-process pipeline") == 2
    assert "**met**" in text and "not evaluated" in text  # Ray Serve was skipped: nothing to compare
    assert "Ray Serve was not (fully) measured" in text
    assert "| 16 | 9.50 (1000 / 1800 / 2000) | 4.00 (2500 / 4500 / 5000) ⚠ 3 failed |" in text
    assert "**10.00**" in text  # the best batch size is marked
    assert "![throughput](throughput.png)" in text


def test_results_round_trip_through_json():
    """results.json holds everything the summary needs: rendering from it gives the same text."""
    results = fake_results()
    again = report.results_from_json(json.loads(json.dumps(dataclasses.asdict(results))))
    assert report.render_summary(again) == report.render_summary(results)


def test_plots_are_written(tmp_path):
    """Each plot function writes a PNG from fake measurements."""
    pytest.importorskip("matplotlib")
    results = fake_results()
    for plot in (report.plot_throughput, report.plot_latency, report.plot_inprocess):
        path = plot(results, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes().startswith(b"\x89PNG")


def test_machine_description_parsers():
    """CPU model, memory and OS name come from /proc and /etc/os-release text."""
    assert machine.cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    assert machine.memory_total_gib("MemTotal:       24576000 kB\n") == pytest.approx(23.44, abs=0.01)
    assert (
        machine.os_name('NAME="Debian"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
        == "Debian GNU/Linux 12 (bookworm)"
    )


def test_describe_machine_names_pack_runtime_and_commit():
    """The description carries the pack's shas, the ONNX Runtime version and provider, and the commit."""
    manifest = json.loads((ROOT / "models" / "demo-synthetic" / "manifest.json").read_text())
    described = machine.describe_machine(manifest, ["CPUExecutionProvider"], machine.load_average())
    assert {"CPU", "Cores", "Memory", "OS", "Python", "ONNX Runtime", "Model pack", "Git commit"} <= set(described)
    assert manifest["detector"]["sha256"][:12] in described["Model pack"]
    assert "in use: CPUExecutionProvider" in described["ONNX Runtime"]


def test_proc_parsers():
    """utime + stime are read after the last ')' (names may hold spaces); status fields in KiB."""
    stat = "42 (odd ) name) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 1 0 10 1000 200"
    assert procfs.cpu_ticks(stat) == 300
    assert procfs.status_kib("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS") == 1234
    assert procfs.status_kib("Name:\tzombie\n", "VmRSS") == 0
    own = procfs.tree_memory(os.getpid())
    assert own.rss_kib > 0 and own.processes >= 1


def test_cpu_cores_between_uses_the_bracketing_samples():
    """CPU in a window = CPU-time difference of the samples around it over their time difference."""
    samples = [sampling.TreeSample(at, cpu, 0, 0, 1) for at, cpu in ((0, 0), (10, 5), (20, 20), (30, 30))]
    assert sampling.cpu_cores_between(samples, 11, 19) == pytest.approx(1.5)  # samples at 10 and 20
    assert np.isnan(sampling.cpu_cores_between(samples, 25, 40))  # no sample after the end yet


def test_quarter_growth():
    """The last quarter's median against the first's; above the limit counts as growing."""
    flat = memory.quarter_growth([100.0, 101.0, 99.0, 100.0, 100.0, 102.0, 100.0, 101.0])
    assert not flat.grows and abs(flat.percent) < 2
    growing = memory.quarter_growth([100.0] * 4 + [120.0] * 4)
    assert growing.grows and growing.percent == pytest.approx(20.0)


def test_memory_report_states_the_verdict():
    """The memory report says whether memory grows, with both quarters' medians."""
    samples = [memory.MemorySample(i * 100, i * 10.0, 500_000 + i, 400_000) for i in range(1, 9)]
    rss = memory.quarter_growth([s.rss_kib for s in samples])
    text = memory.render_memory_report(
        "python -m benchmarks.memory", {"CPU": "x"}, "now", 800, 8, ["j2k"], {200: 800}, samples, rss, rss, "ours"
    )
    assert "**Memory does not grow**" in text and "0 not 200" in text


def test_timed_batches_warms_up_then_measures():
    """One unmeasured warm-up call, then at least min_batches measured ones."""
    calls = []
    images, seconds = timed_batches(lambda: calls.append(1) or 4, seconds=0.0, min_batches=3)
    assert len(calls) == 4 and images == 12 and seconds >= 0
    assert best_rate([BatchRate("j2k", 1, 2.0, 4, 2), BatchRate("j2k", 8, 5.0, 16, 3)], "j2k").batch_size == 8


def test_plans_and_budget():
    """The full plan sweeps the asked levels and batch sizes within the ~25 min budget; quick is shorter."""
    assert throughput.FULL.levels == (1, 2, 4, 8, 16, 32, 64)
    assert throughput.FULL.batch_sizes == (1, 2, 4, 8, 16, 32)
    assert throughput.estimated_minutes(throughput.FULL, 3, 2) < 25
    assert throughput.estimated_minutes(throughput.QUICK, 3, 2) < throughput.estimated_minutes(throughput.FULL, 3, 2)


def test_peers_get_the_services_batching_settings():
    """Ray Serve is configured with our batcher's max batch, delay, queue and decode worker count."""
    from service.settings import Settings

    settings = Settings(max_batch_size=8, max_queue_delay_ms=4, max_queue_size=100, decode_workers=3)
    specs = throughput.service_specs(settings, ROOT / "models" / "demo-synthetic", Path("/peer/python"), 1)
    ray = " ".join(specs["ray-serve"].command)
    assert "--max-batch-size 8" in ray and "--batch-wait-timeout-s 0.004" in ray
    assert "--max-ongoing-requests 100" in ray and "--decode-replicas 3" in ray
    assert set(specs) == {"ours", "naive", "ray-serve"}


def test_peer_venv_pins_the_compute_path_to_this_environment():
    """The peer venv installs numpy/ONNX Runtime at this environment's versions; the key tracks them."""
    pins = peer_env.pinned_versions(("numpy", "surely-not-installed-package"))
    assert pins == [f"numpy=={np.__version__}"]
    assert peer_env.requirements_key(["ray"], pins) != peer_env.requirements_key(["ray"], [])


def test_prediction_json_matches_the_services_schema():
    """A peer's answer, built by the shared postprocess, validates as the service's Prediction."""
    from benchmarks.peers.common import prediction_json, response_body
    from service.dicom.pipeline import prepare
    from service.inference.modelpack import ModelPack
    from service.settings import Settings
    from training.synthetic import dicom_bytes, synthesize_instance

    pack = ModelPack.load(ROOT / "models" / "demo-synthetic")
    ds, _ = synthesize_instance(seed=3, rows=320, cols=256, difficulty="easy")
    prepared = prepare(dicom_bytes(ds), pack.input_specs)
    locations, classes = 6, len(pack.local_labels)
    boxes = np.tile(np.array([[10, 10, 60, 80]], dtype=np.float32), (locations, 1))
    scores = np.full((locations, classes), 0.99, dtype=np.float32)
    probabilities = np.full(len(pack.global_labels), 0.7, dtype=np.float32)
    answer = response_body(
        prediction_json(
            prepared, (boxes, scores, probabilities), pack, Settings(models=pack.path), "r1", {"inference": 1.0}
        )
    )
    assert answer["request_id"] == "r1" and answer["instance"]["rows"] == 320
    assert answer["findings"] and len(answer["diseases"]) == len(pack.global_labels)
    assert {"decode", "preprocess", "inference", "postprocess"} <= set(answer["timing_ms"])


def test_profile_reads_py_spy_collapsed_stacks():
    """benchmarks.profile: samples per thread id, thread names without pool suffixes, each frame once per stack."""
    from benchmarks.profile import read_collapsed

    raw = (
        "thread (11): MainThread;run (uvicorn/main.py:10);read_body (service/api/upload.py:51) 7\n"
        "thread (11): MainThread;run (uvicorn/main.py:10);run (uvicorn/main.py:12) 3\n"
        "thread (12): decode-native_0;prepare (service/dicom/pipeline.py:65) 5\n"
        "thread (13): decode-native_1;prepare (service/dicom/pipeline.py:70) 2\n"
        "not a stack line\n"
    )
    profile = read_collapsed(raw)
    assert profile.samples_by_thread == {11: 10, 12: 5, 13: 2}
    assert profile.names == {11: "MainThread", 12: "decode-native", 13: "decode-native"}
    assert profile.inclusive["MainThread"]["run (uvicorn/main.py)"] == 10  # recursion counted once per sample
    assert profile.inclusive["decode-native"]["prepare (service/dicom/pipeline.py)"] == 7
