"""GPTQ v1 exports read by real third-party readers: benchmarks/gptq_reader.py on the tiny Llama
variants (4/3/2/8 bits, groups of 32 and per channel, act-order g_idx, quantized lm_head,
asymmetric), in the readers' own virtual environment (GPTQModel 7.6.0 + optimum 2.3.0, no
hfcompress). Each reader's logits must lie within the 16-bit rounding floor of ours, except where
a reader is known not to read that case (see ``known_limitation`` in the script).

Skipped unless HFCOMPRESS_GPTQ_READER is the python of that environment (about 4 minutes to
create, see benchmarks/README.md, "GPTQ v1 in real readers"); the run itself takes about a minute.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READER = os.environ.get("HFCOMPRESS_GPTQ_READER")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not READER, reason="HFCOMPRESS_GPTQ_READER (the GPTQ reader venv's python) is not set"),
]


def test_gptq_export_reads_back_in_gptqmodel_and_transformers(tmp_path):
    assert Path(READER).exists(), f"HFCOMPRESS_GPTQ_READER={READER} does not exist"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gptq_reader.py"), "--python", READER, "--model", "tiny",
         "--work", str(tmp_path), "--json", str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = json.loads((tmp_path / "result.json").read_text())
    summary = "\n".join(result["summary"])
    assert result["all_as_expected"], summary

    main = result["items"]["w4g32"]["readers"]
    assert main["gptqmodel"]["kernels"] == {"TorchLinear": 14}, summary  # GPTQModel's own pure-torch kernel
    assert main["gptqmodel"]["within_floor"] and main["transformers"]["within_floor"], summary
    # The quantized lm_head is read by GPTQModel (15 quantized linears).
    assert result["items"]["w4g32-lm-head"]["readers"]["gptqmodel"]["kernels"] == {"TorchLinear": 15}, summary
    # act-order: desc_act and the permuted g_idx are honoured.
    assert result["items"]["w4g32-gptq-act-order"]["quantization_config"]["desc_act"] is True
    assert result["items"]["w4g32-gptq-act-order"]["readers"]["gptqmodel"]["within_floor"], summary
