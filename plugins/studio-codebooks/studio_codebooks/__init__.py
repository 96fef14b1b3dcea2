"""An example quantizer plug-in: non-uniform 4-bit codebooks.

    nf4     QLoRA's normal-float levels, one absmax scale per group (no calibration)
    kmeans  SqueezeLLM's non-uniform levels: a weighted k-means table per output channel or
            per group, each weight weighted by its input channel's energy (the Hessian
            diagonal), from the calibration text

Install it next to the studio with `pip install -e plugins/studio-codebooks`; the methods then
appear in `compression-studio methods`, `quantize --method nf4|kmeans`, the Quantize tab, the
plan editor and the sensitivity menu. The entry point (pyproject.toml) names QUANTIZERS.
"""
from studio_codebooks.kmeans import QUANTIZER as KMEANS
from studio_codebooks.nf4 import QUANTIZER as NF4

QUANTIZERS = [NF4, KMEANS]
