"""One worker's engine: model, paged KV cache, scheduler, sampler."""
