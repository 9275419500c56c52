"""The collector's plan on a GPU machine, with every probe replaced by a recorder (no GPU here): which probes run,
in what order around the timed load, with which flash-attn features, and what a kernel the job does not use reads."""

from __future__ import annotations

from builder.core.attention_needs import attention_needs
from builder.selftest import checks_kernels, kernel_probes, readings


def test_quick_checks_the_environment_before_the_load_and_imports_only_the_jobs_kernels(recorder) -> None:
    r = readings.collect("quick", attention_needs(None), "/data", kernels=("sdpa", "bitsandbytes"))
    assert recorder.index("data_dir") < recorder.index("load") < recorder.index("bandwidth")
    assert "import bitsandbytes" in recorder and "import flash_attn" not in recorder and "flash_attn" not in recorder
    assert r["flash_attn"] == readings.NOT_NEEDED and r["kernels"] == ["sdpa", "bitsandbytes"]
    (finding,) = checks_kernels.flash_attn(r)
    assert finding.severity == "n/a" and "not tested, the job does not use it" in finding.message
    assert {"load", "import_bitsandbytes", "env", "data_dir"} <= set(r["timings"])


def test_quick_calls_flash_attn_only_with_the_features_the_model_needs(recorder, tmp_path) -> None:
    r = readings.collect("quick", attention_needs(None))
    assert r["flash_attn"]["args"][-1] == ()
    config = tmp_path / "config.json"
    config.write_text('{"head_dim": 128, "sliding_window": 4096, "num_attention_heads": 8}')
    r = readings.collect("quick", attention_needs(str(config)))
    assert r["flash_attn"]["args"][-1] == ("local",)
    r = readings.collect("full", attention_needs(None))
    assert r["flash_attn"]["args"][-1] == kernel_probes.FLASH_ATTN_FEATURES


def test_full_hashes_the_environment_after_the_gpus_speed_is_measured(recorder) -> None:
    readings.collect("full", attention_needs(None), "/data")
    assert recorder.index("bandwidth") < recorder.index("lockfile")
    assert {"import transformers", "import peft"} <= set(recorder)


def test_kernel_libraries_import_on_one_thread_in_the_probes_order(monkeypatch, recorder) -> None:
    """Two libraries importing torch._dynamo on two threads at once saw it half-initialised and failed the probes
    of a healthy H200: the imports run one after another on one thread that is not the collector's."""
    import threading

    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(readings, "_import_quietly", lambda m: seen.append((m, threading.get_ident())))
    readings.collect("full", attention_needs(None))
    modules = [m for m, _ in seen]
    assert modules[0] == "flash_attn" and "bitsandbytes" in modules and len(modules) == len(set(modules)) > 2
    assert len({t for _, t in seen}) == 1 and seen[0][1] != threading.get_ident()


def test_quick_leaves_liger_to_the_trainer_and_stops_at_the_backend_it_will_use(monkeypatch, recorder,
                                                                              healthy) -> None:
    """Importing Liger took 10-15 s of a 22 s quick run; the trainer checks Liger against torch before using it."""
    asked = {}
    monkeypatch.setattr(kernel_probes, "fused_layers", lambda *a, **k: asked.setdefault(k["liger"], k) and {})
    readings.collect("quick", attention_needs(None))
    readings.collect("full", attention_needs(None))
    assert asked[False]["every_backend"] is False and asked[True]["every_backend"] is True
    assert "import bitsandbytes" in recorder and not any(m.startswith("import liger") for m in recorder)
    healthy["fused_layers"] = {"liger": {"installed": True, "skipped": kernel_probes.LIGER_AT_START},
                                     "attention": {"flash_attn": 1e-3}}
    finding = checks_kernels.fused_layers(healthy)
    assert finding.severity == "ok" and "checked by the trainer when it starts" in finding.message
