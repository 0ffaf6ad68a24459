"""Workloads: the demo served by ``nalar up``, reference workloads, load generators and benchmarks.

Where things live (the top layer beside ``cli``; it never imports ``cli``):

    demo.py            the demo served by ``nalar up``: an agent that fans out to two tools
    analyst.py         the stateful workload: an investor's follow-up questions in long sessions
    router.py          the imbalanced workload: a classifier sends each query down one of two branches
    swe.py             the recursive workload: a MetaGPT-style software company, with failures and re-entry
    models.py          the model actors of the reference workloads, one class per model pool
    tools.py           the tools they call (search, documentation, market data) over ``corpora/``
    spec.py            ``WorkloadSpec``: what a workload tells ``nalar bench``
    bench.py           ``nalar bench WHAT``: dispatch to the scripts below
    bench_calls.py     calls against raw nats-py request/reply
    bench_state.py     durable state-changing calls, raw LMDB, migration
    bench_futures.py   many pending calls and what each pending future costs
    bench_control.py   the cost of control with many futures in flight
    bench_workload.py  a reference workload under Poisson load, nalar against a baseline
    bench_actors.py    the actors and raw responder the benchmarks serve
    bench_util.py      helpers: child processes that say when they are ready, RSS, medians
    bench_plots.py     PNG plots of ``bench_workload`` results (matplotlib optional)
"""
