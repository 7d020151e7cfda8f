"""One model type through a quantize stage and back: build tiny, compress, save, reload, compare.

:func:`quantize_roundtrip` is what ``benchmarks/architectures.py`` runs for every causal-LM type
and what the CI test runs for a representative subset. A type ends in one of four states:

- ``ok``: the reloaded model gives the same logits as the compressed one, and at least 90% of
  the decoder's linear/expert weight elements are quantized;
- ``refused``: hfcompress said clearly why not (a :class:`~hfcompress.errors.UserError`);
- ``partial``: it ran, but left more than 10% of the decoder in float;
- ``crash``: any other exception, or a reload that computes something else.

Types whose tiny model transformers itself cannot build or run are ``unbuildable`` (see
:func:`~hfcompress.testing.probe`), listed apart.
"""

from __future__ import annotations

import tempfile
import time
import traceback

import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ..errors import UserError
from ..integration.compress import compress
from ..quantization.coverage import FLOAT_SHARE_LIMIT, float_share
from .tiny import describe_error, tiny_inputs, tiny_model

__all__ = ["RECIPES", "quantize_roundtrip"]

RECIPES = {
    "gptq": {"stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}]},
    "rtn": {"stages": [{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]},
}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    return output.logits if hasattr(output, "logits") else output[0]


def _reload(model, directory: str):
    """What a user calls: ``AutoModelForCausalLM.from_pretrained`` (the class itself where the
    causal LM is built on a composite config's sub-config, as MusicGen's decoder is)."""
    if type(model.config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM.from_pretrained(directory)
    return type(model).from_pretrained(directory)


def quantize_roundtrip(model_type: str, method: str, windows: int = 4, seq_len: int = 32) -> dict:
    """Build the tiny ``model_type``, quantize it with ``method`` (``gptq`` or ``rtn``, 4-bit g32)
    on random token windows, save, reload and compare logits. Returns a result row (see module doc)."""
    start = time.perf_counter()
    row = {"type": model_type, "method": method, "status": "crash", "error": None, "float_share": None,
           "max_diff": None}
    try:
        try:
            model = tiny_model(model_type)
            languages = getattr(model.config, "languages", None)
            if languages and hasattr(model, "set_default_language"):  # X-MOD: as its documentation asks
                model.set_default_language(languages[0])
            inputs = tiny_inputs(model, batch=2, seq_len=seq_len)
            _logits(model, inputs)
        except Exception as error:  # transformers cannot build or run it tiny: not ours to judge
            row.update(status="unbuildable", error=describe_error(error))
            return row
        # Calibration windows are token ids, whatever the model's forward takes (a model that needs
        # other inputs is refused by the calibrated method; RTN needs no data).
        ids = tiny_inputs(model, batch=windows, seq_len=seq_len, seed=1).get("input_ids")
        calibration = ids if ids is not None else torch.randint(model.config.get_text_config().vocab_size,
                                                                (windows, seq_len))
        try:
            compress(model, RECIPES[method], calibration_data=calibration if method != "rtn" else None)
        except UserError as error:
            row.update(status="refused", error=describe_error(error))
            return row
        share = float_share(model)
        row["float_share"] = round(share.fraction, 4)
        expected = _logits(model, inputs)
        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            reloaded = _reload(model, directory).eval()
            got = _logits(reloaded, inputs)
        row["max_diff"] = float((got - expected).abs().max()) if got.shape == expected.shape else None
        if not torch.equal(got, expected):
            row["error"] = f"reload differs (max |diff| {row['max_diff']})"
        elif share.fraction > FLOAT_SHARE_LIMIT:
            row.update(status="partial", error=share.describe()[:300])
        else:
            row["status"] = "ok"
    except Exception as error:  # a crash is a result here: report it with where it happened
        frames = traceback.extract_tb(error.__traceback__)
        where = next((f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(frames)
                      if "hfcompress" in f.filename), "")
        row["error"] = f"{describe_error(error)} [{where}]"
    finally:
        row["seconds"] = round(time.perf_counter() - start, 2)
    return row
