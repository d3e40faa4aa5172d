"""Running functions: the process context, the per-invocation call, the registry of
functions, streams and consumers, the pull consumer, the publisher and the runner.

Sits on everything below it (core, infra, gpu, state). A function author needs only
:mod:`bus` itself, which re-exports the contract and these types.
"""
