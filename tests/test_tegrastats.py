"""tegrastats lines of several Jetson generations (written from the documented formats) and the device parsers."""

from __future__ import annotations

import pytest

from tinyclip_edge.runtimes.devices import (
    cpu_facts,
    device_facts,
    jetpack_from_l4t,
    library_versions,
    parse_cpuinfo_model,
    parse_l4t_release,
    parse_nvpmodel,
)
from tinyclip_edge.runtimes.tegrastats import PowerSample, TegraStats, parse_rails, total_power_mw, window_mean_mw

# JetPack 4 on a Jetson Nano: board input rail POM_5V_IN, no units, RAM/SWAP/IRAM fields that look like rails
NANO = (
    "RAM 2108/3956MB (lfb 64x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [11%@1479,3%@1479,4%@1479,2%@1479] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@21.5C CPU@24C "
    "PMIC@100C GPU@22C AO@30C thermal@23C POM_5V_IN 2000/2100 POM_5V_GPU 0/0 POM_5V_CPU 407/407"
)
# JetPack 4 on a TX2: module input VDD_IN among the VDD_SYS_* rails
TX2 = (
    "RAM 2397/7851MB (lfb 1058x4MB) SWAP 0/3926MB (cached 0MB) CPU [3%@345,off,off,2%@345,1%@345,2%@345] "
    "EMC_FREQ 0%@1866 GR3D_FREQ 0%@114 APE 150 PLL@34C MCPU@34C PMIC@100C Tboard@30C GPU@32C BCPU@34C "
    "thermal@33.2C Tdiode@31.5C VDD_SYS_GPU 152/152 VDD_SYS_SOC 609/609 VDD_4V0_WIFI 0/0 VDD_IN 2437/2437 "
    "VDD_SYS_CPU 152/152 VDD_SYS_DDR 410/410"
)
# AGX Xavier (JetPack 4/5): no input rail, rails named GPU/CPU/SOC/CV/VDDRQ/SYS5V (same names as temperatures!)
XAVIER = (
    "RAM 3453/31919MB (lfb 6246x4MB) SWAP 0/15959MB (cached 0MB) CPU [2%@1190,1%@1190,off,off] "
    "EMC_FREQ 0% GR3D_FREQ 0% AUX@31C CPU@33C thermal@32.55C Tboard@32C AO@32.5C GPU@32C Tdiode@34.75C "
    "PMIC@50C GPU 0/0 CPU 311/311 SOC 1244/1244 CV 0/0 VDDRQ 311/311 SYS5V 1619/1619"
)
# Orin Nano / NX (JetPack 5/6): timestamp prefix, mW units, VDD_IN
ORIN_NX = (
    "11-23-2026 06:52:35 RAM 3051/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) CPU [2%@729,0%@729,1%@729,"
    "0%@729,off,off] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] VIC_FREQ 729 APE 200 CPU@48.5C SOC2@45.9C "
    "VDD_IN 5012mW/5012mW VDD_CPU_GPU_CV 598mW/601mW VDD_SOC 1435mW/1436mW"
)
# AGX Orin (JetPack 5/6): no VDD_IN; rails summed
ORIN_AGX = (
    "RAM 2462/30536MB (lfb 6693x4MB) SWAP 0/15268MB (cached 0MB) CPU [1%@729,2%@729] EMC_FREQ 0%@2133 "
    "GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 CV0@-256C CPU@46.343C VDD_GPU_SOC 2380mW/2390mW "
    "VDD_CPU_CV 396mW/396mW VIN_SYS_5V0 2524mW/2524mW VDDQ_VDD2_1V8AO 503mW/503mW"
)


@pytest.mark.parametrize(
    "line, rail, watts_mw",
    [
        (NANO, "POM_5V_IN", 2000.0),
        (TX2, "VDD_IN", 2437.0),
        (ORIN_NX, "VDD_IN", 5012.0),
    ],
)
def test_input_rail_is_preferred(line, rail, watts_mw):
    rails = parse_rails(line)
    assert rail in rails
    assert total_power_mw(rails) == (watts_mw, rail)


def test_units_and_averages_are_read():
    rails = parse_rails(ORIN_NX)
    assert rails["VDD_CPU_GPU_CV"] == (598.0, 601.0)
    assert parse_rails(NANO)["POM_5V_IN"] == (2000.0, 2100.0)


@pytest.mark.parametrize("line", [NANO, TX2, XAVIER, ORIN_NX, ORIN_AGX])
def test_memory_fields_and_temperatures_are_not_power(line):
    rails = parse_rails(line)
    assert not {"RAM", "SWAP", "IRAM", "EMC_FREQ", "GR3D_FREQ", "APE"} & set(rails)
    assert all(v >= 0 for cur, avg in rails.values() for v in (cur, avg))


def test_modules_without_input_rail_sum_their_rails():
    xavier = parse_rails(XAVIER)
    assert set(xavier) == {"GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"}
    total, how = total_power_mw(xavier)
    assert total == 0 + 311 + 1244 + 0 + 311 + 1619 and how.startswith("sum of")
    orin = parse_rails(ORIN_AGX)
    assert total_power_mw(orin)[0] == 2380 + 396 + 2524 + 503


def test_lines_without_rails():
    assert parse_rails("RAM 100/200MB SWAP 0/0MB CPU [1%@100]") == {}
    assert total_power_mw({}) is None


def test_sampler_reports_missing_tool():
    assert TegraStats.available("definitely-not-tegrastats") is False


def test_jetson_release_parsers():
    text = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023"
    assert parse_l4t_release(text) == "35.4.1"
    assert jetpack_from_l4t("35.4.1").startswith("5.1.2")
    assert jetpack_from_l4t("99.0") is None
    assert parse_l4t_release("garbage") is None
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert parse_nvpmodel("NVPM WARN: ...\nNV Power Mode: 15W\n2") == {"name": "15W", "id": 2}


def test_device_facts_on_this_cpu():
    facts = device_facts("cpu")
    cpu = facts["cpu"]
    assert cpu["cores"] >= 1 and cpu["model"]
    assert facts["libraries"]["numpy"] and facts["libraries"]["tinyclip_edge"]
    assert "gpu" not in facts
    assert parse_cpuinfo_model("processor\t: 0\nmodel name\t: AMD  EPYC 7B13\n") == "AMD EPYC 7B13"
    assert cpu_facts()["arch"]
    assert "torch" in library_versions()


def fake_tegrastats(directory, line: str = ORIN_NX):
    """An executable named tegrastats that prints a captured line every --interval ms, like the real tool."""
    script = directory / "tegrastats"
    script.write_text(
        "#!/bin/sh\n"
        'ms=1000; [ "$1" = "--interval" ] && ms=$2\n'
        's=$(awk "BEGIN{print $ms/1000}")\n'
        f"while true; do echo '{line}'; sleep $s; done\n"
    )
    script.chmod(0o755)
    return script


def test_sampler_runs_the_tool_and_averages_a_window(tmp_path):
    import time

    script = fake_tegrastats(tmp_path)
    with TegraStats(50, command=str(script)) as ts:
        assert ts.wait_for_samples(3)
        t0 = time.perf_counter()
        time.sleep(0.3)
        watts, n, rail = ts.mean_power_w(t0, time.perf_counter())
    assert rail == "VDD_IN" and n >= 2
    assert watts == pytest.approx(5.012)
    assert ts.mean_power_w(0.0, 0.0) is None  # a window before the tool started has no samples


def _stream(watts_by_end_time: dict[float, float]) -> list[PowerSample]:
    """Synthetic tegrastats samples: a line at time t reports the mean power of the interval ending at t."""
    return [PowerSample(t, w * 1000, "VDD_IN") for t, w in sorted(watts_by_end_time.items())]


def test_energy_window_excludes_samples_past_its_end():
    # 100 ms lines: 1 W while the window [0, 0.5] runs, 10 W afterwards
    samples = _stream({0.1: 1, 0.2: 1, 0.3: 1, 0.4: 1, 0.5: 1, 0.6: 10, 0.7: 10})
    mw, n, rail = window_mean_mw(samples, 0.0, 0.5, 0.1)
    assert mw == pytest.approx(1000) and n == 5 and rail == "VDD_IN"
    ts = TegraStats(100)
    ts.samples = samples
    assert ts.mean_power_w(0.0, 0.5)[0] == pytest.approx(1.0)


def test_energy_window_weights_partial_overlaps():
    samples = _stream({0.1: 2, 0.2: 4, 0.3: 6, 0.4: 8})
    # [0.15, 0.35]: half of (0.1,0.2] at 4 W, all of (0.2,0.3] at 6 W, half of (0.3,0.4] at 8 W
    mw, n, _ = window_mean_mw(samples, 0.15, 0.35, 0.1)
    assert mw == pytest.approx((0.05 * 4 + 0.1 * 6 + 0.05 * 8) / 0.2 * 1000) and n == 3
    # irregular gaps: each line covers the time since the previous one
    uneven = _stream({0.1: 1, 0.4: 4})
    assert window_mean_mw(uneven, 0.1, 0.4, 0.1)[0] == pytest.approx(4000)
    assert window_mean_mw(uneven, 0.0, 0.4, 0.1)[0] == pytest.approx((0.1 * 1 + 0.3 * 4) / 0.4 * 1000)
    assert window_mean_mw(samples, 0.5, 0.9, 0.1) is None and window_mean_mw([], 0, 1, 0.1) is None
