"""The serving layer: the router core with its gRPC and OpenAI HTTP adapters, the Ray worker pools,
config, `kvrelay serve`, the Python client, and the load-test harness (`bench/`)."""

# One file, one module: imported as `cluster` (the checkout's top-level folder on sys.path) this
# package would load a second copy of every module beside `kvrelay.cluster`, with its own classes and
# globals (isinstance fails, Ray unpickles the other copy). Only the `kvrelay/` link is allowed.
if __name__ != "kvrelay.cluster":
    raise ImportError(
        f"import {__name__} as kvrelay.{__name__}: kvrelay's top-level folders load only through the kvrelay package"
    )
