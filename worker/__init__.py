"""One worker's engine: model, paged KV cache, scheduler, sampler, text; the Ray actor shell
and its part in disaggregated serving (`disagg/`)."""

# One file, one module: imported as `worker` (the checkout's top-level folder on sys.path) this
# package would load a second copy of every module beside `kvrelay.worker`, with its own classes and
# globals (isinstance fails, Ray unpickles the other copy). Only the `kvrelay/` link is allowed.
if __name__ != "kvrelay.worker":
    raise ImportError(
        f"import {__name__} as kvrelay.{__name__}: kvrelay's top-level folders load only through the kvrelay package"
    )
