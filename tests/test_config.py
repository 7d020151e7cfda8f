"""CompressionConfig: serialization round trip and refusal of what it cannot read."""

import pytest

from hfcompress.config import CompressionConfig
from hfcompress.errors import CheckpointError
from hfcompress.quantization.qlinear import LinearFormat


def test_round_trip_keeps_recipe_formats_and_metrics():
    config = CompressionConfig(recipe="w4-rtn", base_model="org/model", metrics={"perplexity": 12.5})
    config.modules["a.q_proj"] = LinearFormat(4, 128, True)
    config.modules["a.k_proj"] = LinearFormat(4, 128, True)
    config.modules["a.down_proj"] = LinearFormat(8, -1, False)
    data = config.to_dict()
    assert data["quant_method"] == "hfcompress" and len(data["quantized"]) == 2
    again = CompressionConfig.from_dict(data)
    assert again == config and again.modules == config.modules


def test_unknown_keys_and_newer_formats_are_refused():
    with pytest.raises(CheckpointError, match="unknown key"):
        CompressionConfig.from_dict({"quant_method": "hfcompress", "bitz": 4})
    with pytest.raises(CheckpointError, match="upgrade hfcompress"):
        CompressionConfig.from_dict({"quant_method": "hfcompress", "format_version": 99})
    with pytest.raises(CheckpointError, match="bits: 5"):
        CompressionConfig.from_dict({"quant_method": "hfcompress", "recipe": {"stages": [{"quantize": {"bits": 5}}]}})
