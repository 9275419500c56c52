"""Health checks over NVML readings (before, during and after load): ECC, remapped rows, retired pages, the
driver's recovery action, clock-event reasons under load, PCIe link, temperature margin, power limit.
A card that does not support a query gets n/a, never ok."""

from __future__ import annotations

from typing import Any

from builder.selftest.findings import Finding, fail, gpu_reading, na, nvml_devices, ok, warn
from builder.selftest.probes import LOAD, NVML_AFTER

REPLACE = (
    "the GPU memory is failing: on a rented instance move to another machine/GPU and tell the provider; "
    "on your own hardware run `nvidia-smi -q -d ECC,ROW_REMAPPER` and contact the vendor"
)
RESET = "reset the GPU (`nvidia-smi -r -i N` as root, or reboot); on a rented instance restart it or migrate"

# Clock-event reason bits (nvmlClocksEventReason*): these mean the hardware is slowing itself down.
HW_SLOWDOWN, SW_THERMAL, HW_THERMAL, HW_POWER_BRAKE, SW_POWER_CAP = 0x8, 0x20, 0x40, 0x80, 0x4
HW_REASONS = {
    HW_SLOWDOWN: "hardware slowdown",
    HW_THERMAL: "hardware thermal slowdown",
    HW_POWER_BRAKE: "power-brake slowdown",
}
# NVIDIA's retirement limit: a card with this many retired pages is due for replacement.
RETIRED_PAGES_LIMIT = 60
RECOVERY_ACTIONS = {0: "none", 1: "GPU reset", 2: "node reboot", 3: "drain P2P", 4: "drain and reset"}
TEMP_MARGIN_FAIL_C, TEMP_MARGIN_WARN_C = 5, 10
POWER_LIMIT_WARN = 0.95


def _per_device(r: dict[str, Any], judge: Any) -> list[Finding]:
    devices = nvml_devices(r)
    if not devices:
        return [na("no GPU to query", "see the nvidia_driver finding")]
    return [judge(d, f"GPU {d['index']}") for d in devices]


def _after(r: dict[str, Any], index: int) -> dict[str, Any]:
    for d in nvml_devices(r, NVML_AFTER):
        if d["index"] == index:
            return d
    return {}


def ecc(r: dict[str, Any]) -> list[Finding]:
    def judge(d: dict[str, Any], gpu: str) -> Finding:
        e = d.get("ecc") or {}
        if e.get("mode") is None or e.get("uncorrected_volatile") is None:
            return na(f"{gpu}: {d['name']} does not report ECC (GeForce cards have none)")
        if not e["mode"][0]:
            return warn(f"{gpu}: ECC is off", "enable it: `nvidia-smi -i N -e 1` as root, then reset the GPU")
        after = (_after(r, d["index"]).get("ecc") or {}).get("uncorrected_volatile")
        if after is not None and after > e["uncorrected_volatile"]:
            return fail(
                f"{gpu}: {after - e['uncorrected_volatile']} uncorrectable ECC error(s) during the test", REPLACE
            )
        if e["uncorrected_volatile"]:
            return fail(f"{gpu}: {e['uncorrected_volatile']} uncorrectable ECC error(s) since the last reset", REPLACE)
        if e.get("uncorrected_aggregate"):
            return warn(
                f"{gpu}: {e['uncorrected_aggregate']} uncorrectable ECC error(s) in the card's lifetime, "
                "none since the last reset",
                "watch the remapped_rows finding; " + REPLACE,
            )
        return ok(f"{gpu}: ECC on, no uncorrectable errors (volatile or aggregate)")

    return _per_device(r, judge)


def remapped_rows(r: dict[str, Any]) -> list[Finding]:
    def judge(d: dict[str, Any], gpu: str) -> Finding:
        readings = [x for x in (d.get("remapped_rows"), _after(r, d["index"]).get("remapped_rows")) if x]
        if not readings:
            return na(f"{gpu}: {d['name']} has no row remapping (pre-Ampere or GeForce)")
        rows = {
            "failure": any(x["failure"] for x in readings),
            "pending": any(x["pending"] for x in readings),
            **{k: max(x[k] for x in readings) for k in ("correctable", "uncorrectable")},
        }
        if rows["failure"]:
            return fail(f"{gpu}: a row remapping failed", REPLACE)
        if rows["pending"]:
            return fail(f"{gpu}: a row remapping is pending; the bad row is in use until a reset", RESET)
        return ok(
            f"{gpu}: no remapping pending or failed ({rows['uncorrectable']} rows remapped for uncorrectable "
            f"errors, {rows['correctable']} for correctable)"
        )

    return _per_device(r, judge)


def retired_pages(r: dict[str, Any]) -> list[Finding]:
    def judge(d: dict[str, Any], gpu: str) -> Finding:
        pages = d.get("retired_pages")
        if pages is None:
            return na(f"{gpu}: {d['name']} does not retire pages (Ampere and newer remap rows instead)")
        total = (pages.get("double_bit") or 0) + (pages.get("single_bit") or 0)
        if pages.get("pending"):
            return fail(f"{gpu}: a page retirement is pending", RESET)
        if total >= RETIRED_PAGES_LIMIT:
            return fail(f"{gpu}: {total} retired pages (limit {RETIRED_PAGES_LIMIT})", REPLACE)
        return ok(f"{gpu}: {total} retired pages, none pending")

    return _per_device(r, judge)


def recovery_action(r: dict[str, Any]) -> list[Finding]:
    def judge(d: dict[str, Any], gpu: str) -> Finding:
        actions = [a for a in (d.get("recovery_action"), _after(r, d["index"]).get("recovery_action")) if a is not None]
        if not actions:
            return na(f"{gpu}: this driver does not report a recovery action")
        action = max(actions)
        if action == 0:
            return ok(f"{gpu}: the driver asks for no recovery action")
        name = RECOVERY_ACTIONS.get(action, f"action {action}")
        return fail(
            f"{gpu}: the driver asks for recovery: {name}",
            RESET
            if action == 1
            else f"{name} is needed: on a rented instance migrate or ask the provider; otherwise do it now",
        )

    return _per_device(r, judge)


def _load_samples(r: dict[str, Any]) -> list[dict[str, Any]]:
    load = gpu_reading(r, LOAD)
    return [s for s in (load or {}).get("samples") or [] if isinstance(s, dict)]


def clock_events(r: dict[str, Any]) -> Finding:
    samples = [s for s in _load_samples(r) if s.get("clocks_event_reasons") is not None]
    if not samples:
        return na("no NVML samples under load (no GPU, or the driver does not report clock-event reasons)")
    seen = 0
    for s in samples:
        seen |= s["clocks_event_reasons"]
    hw = [name for bit, name in HW_REASONS.items() if seen & bit]
    if hw:
        return fail(
            f"under load the GPU slowed itself: {', '.join(hw)} ({len(samples)} samples)",
            "check cooling and power delivery (`nvidia-smi -q -d PERFORMANCE`); on a rented instance "
            "move to another machine",
        )
    if seen & SW_THERMAL:
        return warn(
            "under load the driver throttled for temperature (software thermal slowdown)",
            "check airflow and fan speed; the job will run slower than it should",
        )
    note = " (power cap reached, normal for a matmul load)" if seen & SW_POWER_CAP else ""
    return ok(f"no hardware, thermal or power-brake slowdown in {len(samples)} samples under load{note}")


def pcie(r: dict[str, Any]) -> list[Finding]:
    samples = [s for s in _load_samples(r) if s.get("pcie_width") is not None]

    def judge(d: dict[str, Any], gpu: str) -> Finding:
        max_gen, max_width = d.get("pcie_max_gen"), d.get("pcie_max_width")
        if max_gen is None or max_width is None or not samples or d["index"] != 0:
            return na(f"{gpu}: PCIe link not sampled under load (load runs on GPU 0) or not reported")
        gen = max(s["pcie_gen"] for s in samples)
        width = max(s["pcie_width"] for s in samples)
        link = f"PCIe gen{gen} x{width} under load (max gen{max_gen} x{max_width})"
        if width < max_width:
            return fail(
                f"{gpu}: {link}: the link is narrower than the slot allows",
                "reseat the card or move to another machine: host<->GPU copies run at a fraction of speed",
            )
        if gen < max_gen:
            return warn(
                f"{gpu}: {link}: the link trained below its generation",
                "check BIOS PCIe settings / riser; on a rented instance move to another machine",
            )
        return ok(f"{gpu}: {link}")

    return _per_device(r, judge)


def temperature(r: dict[str, Any]) -> list[Finding]:
    samples = [s["temperature_c"] for s in _load_samples(r) if s.get("temperature_c") is not None]

    def judge(d: dict[str, Any], gpu: str) -> Finding:
        limit = (d.get("temperature_thresholds") or {}).get("slowdown")
        temps = samples if d["index"] == 0 and samples else [(d.get("idle") or {}).get("temperature_c")]
        if limit is None or temps[0] is None:
            return na(f"{gpu}: temperature or its slowdown threshold not reported")
        hottest = max(temps)
        margin = limit - hottest
        text = f"{gpu}: {hottest} C {'under load' if temps is samples else 'idle'}, slowdown at {limit} C"
        if margin < TEMP_MARGIN_FAIL_C:
            return fail(f"{text}: {margin} C margin", "improve cooling; the GPU will throttle during the job")
        if margin < TEMP_MARGIN_WARN_C:
            return warn(f"{text}: only {margin} C margin", "check airflow and fans before a long job")
        return ok(f"{text} ({margin} C margin)")

    return _per_device(r, judge)


def power_limit(r: dict[str, Any]) -> list[Finding]:
    def judge(d: dict[str, Any], gpu: str) -> Finding:
        enforced, default = d.get("power_limit_enforced_mw"), d.get("power_limit_default_mw")
        if not enforced or not default:
            return na(f"{gpu}: power limits not reported")
        text = f"{gpu}: power limit {enforced / 1000:.0f} W of the default {default / 1000:.0f} W"
        if enforced < POWER_LIMIT_WARN * default:
            return warn(
                f"{text}: the card is power-capped and will run slower",
                "`nvidia-smi -i N -pl <default>` as root; a rented card capped by the provider stays so",
            )
        return ok(text)

    return _per_device(r, judge)
