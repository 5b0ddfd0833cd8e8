"""TeaCache: the gate's rescaling polynomial fitted on traces.

The method's modules: ``options`` (its calib fit options), ``method`` (fit, tune, describe), ``section`` (the
document's indicator and components: schema and checks), ``rescalers`` (the estimators), ``fit`` (point sets and
fits per component), ``forecast`` (the forecast choice), ``tune`` (the replay of the runtime's gate),
``components`` (the document), ``figure`` (the fit's PNG)."""

from calib.methods.base import CacheMethod
from calib.methods.teacache.options import TeacacheOptions

METHOD = CacheMethod(
    name="teacache",
    summary="the rescaler: TeaCache's gate with a polynomial rescaler fitted on the traces",
    options=TeacacheOptions,
    package=__name__,
    runtime="teacache",
    exports=("json", "poly1d", "sglang", "vllm-omni", "tensorrt-llm"),
)
