"""mixbits: sensitivity-guided mixed-precision quantization of transformer language models.

    import mixbits
    qm = mixbits.quantize("smollm2-135m", target_bpw=4.25, quantizer="rtn")
    qm.evaluate(); qm.save("out/model"); mixbits.load("out/model")

See `mixbits.api`. Importing mixbits is cheap: torch and transformers load on first use.
"""

from mixbits import reproducible  # noqa: F401  first: MKL reads MKL_CBWR at its first call
from mixbits.api import QuantizedModel, load, quantize

__version__ = "0.1.0"

__all__ = ["QuantizedModel", "__version__", "load", "quantize"]
