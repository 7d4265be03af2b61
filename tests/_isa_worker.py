"""Run ONNX graphs through ONNX Runtime's CPU provider (one thread) and save their outputs; the ISA test runs this
under ``qemu-x86_64 -cpu Haswell`` (an AVX2 CPU without VNNI) so that only this small script is emulated.

    python _isa_worker.py JOB.json   # {"runs": [[graph, input.npy, output.npy], ...], "exact": bool}

``exact``: ONNX Runtime's ``session.x64quantprecision`` (u8 x u8 products on x86 CPUs without VNNI, which cannot
saturate): the exact integer arithmetic that a VNNI CPU computes, on any x86 CPU."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort


def main(job_file: str) -> None:
    job = json.load(open(job_file))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if job.get("exact"):
        opts.add_session_config_entry("session.x64quantprecision", "1")
    for graph, inp, out in job["runs"]:
        sess = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        np.save(out, sess.run(None, {sess.get_inputs()[0].name: np.load(inp)})[0])


if __name__ == "__main__":
    main(sys.argv[1])
