"""fvae.bench's bookkeeping: rounds reduce to their median, and the table says so."""

from fvae import configs
from fvae.bench import training as bench


def result(images_per_sec, **extra):
    return {"model": "conv", "latent_dim": 32, "upsample": "subpixel", "batch_size": 128,
            "devices": 1, "images_per_sec": images_per_sec, "ms_per_step": 128e3 / images_per_sec,
            "compile_s": 1.0, "peak_memory_mb": 800.0, "useful_gflops": images_per_sec * 0.25,
            **extra}


def test_rounds_reduce_to_the_median_round():
    runs = [result(1000, round=0), {"error": ["killed"]}, result(1200, round=2),
            result(900, round=3)]
    row = bench.median_round(runs)
    assert row["round"] == 0 and row["images_per_sec"] == 1000
    assert sorted(row["rounds_images_per_sec"]) == [900, 1000, 1200]
    assert bench.median_round([result(1000, round=0), result(1100, round=1)])["round"] == 0
    assert bench.median_round([{"error": ["a"]}, {"error": ["b"]}]) == {"error": ["a"]}


def test_the_table_shows_the_spread_of_rounds():
    row = bench.median_round([result(1000), result(1200), result(900)])
    line = bench.format_table([row], peak=500.0).splitlines()[-1]
    assert "| 1000 (900-1200) |" in line and "| 50.0 |  |" in line  # 250 GFLOP/s of 500
    line = bench.format_table([result(1000, iwae_draws_per_sec=4321.2, iwae_useful_gflops=100.0)],
                              500.0).splitlines()[-1]
    assert line.endswith("| 1000 | 128.0 | 1.0 | 800 | 250.0 | 50.0 | 4321 (20%) |  |")
    line = bench.format_table([result(1000, epoch_seconds=212.34, epoch_eval_seconds=9.87)],
                              500.0).splitlines()[-1]
    assert line.endswith("| 50.0 |  | 212.3 (9.9) |")
    assert line.count("|") == bench.format_table([], 500.0).splitlines()[0].count("|")


def test_whole_epochs_are_timed_from_a_real_run():
    """A real training run is timed: its evaluation falls inside the timed epoch, the
    epoch inside the whole run (which also compiled)."""
    from conftest import tiny_config
    config = tiny_config("unused: time_epochs writes its own data")
    timing = bench.time_epochs(config, {"num_images": 64, "test_images": 24})
    assert 0 < timing["epoch_eval_seconds"] < timing["epoch_seconds"] \
        < timing["epochs_run_seconds"]


def test_the_benchmark_runs_end_to_end(tmp_path):
    """Two rounds of a tiny configuration in child processes, with the IWAE timing."""
    import json
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "fvae.bench", "--models", "keras", "--latent-dims",
                    "2", "--batch-sizes", "8", "--devices", "1", "--upsample", "subpixel",
                    "--steps", "2", "--num-images", "64", "--iwae-samples", "4",
                    "--iwae-images", "8", "--rounds", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    [row] = report["results"]
    assert report["matmul_peak_gflops"] > 0 and "error" not in row
    assert len(row["rounds_images_per_sec"]) == 2 and row["images_per_sec"] > 0
    assert row["iwae_draws_per_sec"] > 0 and row["peak_memory_mb"] > 0
    assert 0 < row["iwae_useful_gflops"] < 2 * report["matmul_peak_gflops"]
    from fvae import cpu  # which computed each layer, as measured here, and the host
    assert any(k.startswith("conv_transpose_bias_relu ") for k in row["kernel_choices"])
    assert set(row["kernel_choices"].values()) <= {*cpu.candidates(), "xla"}
    assert report["cpu"].count(",") >= 1


def test_useful_multiply_adds_of_the_study_model():
    """The encoder's and decoder's forward multiply-adds, counted by hand layer by layer:
    256.5 useful MFLOP per training image (forward and backward), as the study quotes."""
    from fvae import configs
    config = configs.get_base_config()
    config.model.latent_dim = 32
    encoder = (14 * 14 * 9 * 1 * 32 + 7 * 7 * 9 * 32 * 64 + 7 * 7 * 9 * 64 * 128
               + 6272 * 256 + 256 * 2 * 32)
    decoder = (32 * 6272 + 7 * 7 * 9 * 128 * 64 + 14 * 14 * 9 * 64 * 32
               + 2 * 2 * 28 * 28 * 9 * 32 * 32 + 28 * 28 * 9 * 32)
    assert bench.useful_macs(config.model) == (encoder, decoder)
    assert bench.useful_macs_per_image(config.model) * bench.TRAIN_FLOPS_PER_MAC == 256_485_120


def test_the_kernel_bench_measures_every_layer_of_the_step_afresh(tmp_path, monkeypatch):
    """fvae.bench.kernels: every kind of layer the kernels cover, each candidate timed
    (XLA among them), and the machine's table of choices left alone."""
    monkeypatch.delenv("FVAE_KERNEL_TILES", raising=False)
    monkeypatch.setenv("FVAE_CACHE_DIR", str(tmp_path))
    from fvae.bench import kernels
    from fvae.cpu import dispatch
    from fvae.cpu import kernels as cpu_kernels
    report = kernels.measure_layers("conv", 8)
    ops = {name.split()[0] for name in report["layers"]}
    assert {"conv3x3", "conv3x3_bias_add_relu", "conv3x3_weight_grad",
            "conv_transpose_bias_relu", "conv_transpose_weight_grad"} <= ops
    for record in report["layers"].values():
        assert set(record["ms"]) == {*cpu_kernels.candidates(), "xla"}
        assert record["choice"] in record["ms"]
    assert dispatch.read_table(cpu_kernels.table_path()) == {}
    assert kernels.table(report).count("\n") == len(report["layers"]) + 1


def test_the_profile_names_the_layer_of_each_op(tmp_path):
    """fvae.bench.profile: ops' times from a trace, each op's layer from the HLO."""
    import gzip
    import json

    from fvae.bench import profile
    hlo = ('  %ffi_call.3 = f32[8]{0} custom-call(%p), metadata={op_name="jit(train_chunk)'
           '/jvp(VAE)/VAE.decode/decoder/ResBlock_0/ffi_call" stack_frame_id=1}\n'
           '  ROOT %fusion.1 = f32[8]{0} fusion(%a), metadata={op_name="jit(f)/add"}\n')
    assert profile.op_layers(hlo) == {
        "ffi_call.3": "jvp(VAE)/VAE.decode/decoder/ResBlock_0/ffi_call", "fusion.1": "add"}
    trace = tmp_path / "plugins" / "profile" / "run" / "host.trace.json.gz"
    trace.parent.mkdir(parents=True)
    events = [{"ph": "X", "name": "ffi_call.3", "dur": 5}, {"ph": "X", "name": "ffi_call.3",
                                                            "dur": 7},
              {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 99},
              {"ph": "i", "name": "fusion.1"}]
    trace.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    assert profile.op_times(str(tmp_path)) == {"ffi_call.3": 12}
