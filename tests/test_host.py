"""The host a parity report was measured on (runtimes/host.py) and the warning when an int8 bundle runs elsewhere."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from tinyclip_edge.common.errors import UserError
from tinyclip_edge.common.formats.bundle import PARITY_NAME
from tinyclip_edge.export import ParityReport, export_bundle, run_parity
from tinyclip_edge.runtimes import host as H
from tinyclip_edge.runtimes import open_runtime
from tinyclip_edge.runtimes.bench import run_bench

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse4_1 avx avx2 fma
processor\t: 1
model name\t: another
flags\t\t: fpu avx512_vnni
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes asimddp
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    "flags, machine, isa",
    [
        ({"sse4_1", "avx2"}, "x86_64", "avx2"),
        ({"avx2", "avx512f", "avx512bw"}, "x86_64", "avx512"),
        ({"avx2", "avx512bw", "avx512_vnni"}, "x86_64", "avx512-vnni"),
        ({"avx2", "avx_vnni"}, "x86_64", "avx-vnni"),
        ({"avx512_vnni", "amx_int8"}, "x86_64", "amx"),
        ({"sse4_1"}, "AMD64", "x86-64"),
        ({"asimd", "asimddp"}, "aarch64", "arm64-dotprod"),
        ({"asimd", "asimddp", "i8mm"}, "aarch64", "arm64-i8mm"),
        ({"asimd"}, "arm64", "arm64"),
        (set(), "x86_64", "unknown"),
        ({"avx2"}, "riscv64", "unknown"),
    ],
)
def test_isa_class(flags, machine, isa):
    assert H.isa_class(flags, machine) == isa


def test_cpuinfo_reads_the_first_processor():
    assert H._cpuinfo(X86) == ("AMD EPYC 7B13 64-Core Processor", {"fpu", "sse4_1", "avx", "avx2", "fma"})
    model, flags = H._cpuinfo(ARM)
    assert model == "" and "asimddp" in flags and H.isa_class(flags, "aarch64") == "arm64-dotprod"


def test_probe_host_here_and_without_procfs(tmp_path, monkeypatch):
    here = H.probe_host()
    assert here.cpu and here.machine and set(here.flags) <= set(H.INT8_FLAGS)
    if H.CPUINFO.is_file() and here.machine in ("x86_64", "aarch64"):
        assert here.isa != H.UNKNOWN
    monkeypatch.setattr(H, "CPUINFO", tmp_path / "absent")  # what macOS or Windows offers: no /proc
    fallback = H.probe_host.__wrapped__()
    assert fallback.isa == H.UNKNOWN and fallback.flags == [] and fallback.cpu


def _parity(tmp_path, tiny_model_dir, precision="fp32"):
    bundle = export_bundle(tiny_model_dir, tmp_path / precision, precision=precision, progress=False)
    report = run_parity(bundle, data=None, progress=False)
    report.write(bundle)
    return bundle, report


def test_parity_records_the_host_and_old_reports_still_read(tmp_path, tiny_model_dir):
    bundle, report = _parity(tmp_path, tiny_model_dir)
    assert report.host == H.probe_host()
    data = json.loads((bundle / PARITY_NAME).read_text())
    assert data["format_version"] == 2 and data["host"]["isa"] == H.probe_host().isa
    assert data["host"]["onnxruntime"] == __import__("onnxruntime").__version__
    assert ParityReport.read(bundle).host == report.host  # round trip
    assert f"host: {report.host.cpu}" in report.to_markdown()
    old = {k: v for k, v in data.items() if k != "host"} | {"format_version": 1}  # written before hosts were recorded
    (bundle / PARITY_NAME).write_text(json.dumps(old))
    assert ParityReport.read(bundle).host is None
    broken = data | {"host": {"cpu": "x", "machine": "x86_64", "system": "Linux", "isa": "avx9000"}}
    (bundle / PARITY_NAME).write_text(json.dumps(broken))
    with pytest.raises(UserError, match="host.isa"):
        ParityReport.read(bundle)


def _measured_on(bundle, isa):
    """The bundle's real parity.json, as if parity had run on a CPU of another ISA class (written by the report's
    own writer, which records the new file in the bundle's manifest as a parity run does)."""
    report = ParityReport.read(bundle)
    report.host = dataclasses.replace(report.host, isa=isa, cpu="Some Other CPU")
    report.write(bundle)


class _NoIsaWarning:
    """Fails when the block warns about an ISA mismatch (other warnings, e.g. a library's, pass)."""

    def __enter__(self):
        self.ctx = warnings.catch_warnings(record=True)
        self.seen = self.ctx.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)
        assert not [w for w in self.seen if "parity was measured on" in str(w.message)]


def _other_isa():
    return "avx2" if H.probe_host().isa != "avx2" else "avx512-vnni"


@pytest.mark.skipif(H.probe_host().isa == H.UNKNOWN, reason="this host's ISA class cannot be read")
def test_int8_bundle_on_another_isa_warns_once(tmp_path, tiny_model_dir):
    bundle, _ = _parity(tmp_path, tiny_model_dir, "int8-dynamic")
    with _NoIsaWarning():  # measured here
        open_runtime(bundle).close()
    _measured_on(bundle, _other_isa())
    with pytest.warns(RuntimeWarning, match=f"parity was measured on {_other_isa()} \\(Some Other CPU\\)"):
        open_runtime(bundle).close()
    with _NoIsaWarning():  # once per process and bundle
        open_runtime(bundle).close()
        report = run_bench([bundle], iters=2, warmup=0, batches=(1,), tower="text", progress=False)
    assert any(f"measured on {_other_isa()}" in n for n in report.notes)  # bench keeps it in its report


@pytest.mark.skipif(H.probe_host().isa == H.UNKNOWN, reason="this host's ISA class cannot be read")
def test_no_isa_warning_for_float_bundles_or_without_a_host_record(tmp_path, tiny_model_dir):
    fp32, _ = _parity(tmp_path, tiny_model_dir)
    _measured_on(fp32, _other_isa())  # fp32 kernels do not saturate: nothing to say
    dyn = export_bundle(tiny_model_dir, tmp_path / "dyn", precision="int8-dynamic", progress=False)  # no parity yet
    with _NoIsaWarning():
        open_runtime(fp32).close()
        open_runtime(dyn).close()
        report = run_bench([dyn], iters=2, warmup=0, batches=(1,), tower="text", progress=False)
    assert not any("measured on" in n for n in report.notes)
    assert H.isa_mismatch(fp32, "int8") is not None  # the same record says so for an int8 bundle
    assert H.isa_mismatch(dyn, "int8-dynamic") is None
